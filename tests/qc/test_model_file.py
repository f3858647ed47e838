"""wh_errmap.model_file: an exact round trip, and one line naming the file for each way a
model file can be wrong."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import write_nifti
from wh_errmap import __version__
from wh_errmap.errors import UserError
from wh_errmap.qc.model_file import FORMAT_VERSION, MAGIC, load_model, save_model

CONFIG = {"preprocess": {"spacing": [2.0, 2.0, 2.0]}, "model": {"width1": 4, "norm": "batch"}}
LABELS = {"convention": "mmwhs", "classes": {"1": "LV", "2": "Myo"}}
TRAINING = {"source": "phantom", "cases": ["1001", "1002"], "intensity": {"mean": 0.5}}
PROVENANCE = {"workdir": "/runs/a", "step": 2, "total_steps": 2, "created": "2026-01-01"}


def variables() -> dict:
  """A small tree like flax's: nested dicts of float32 arrays, one a jax array."""
  rng = np.random.default_rng(0)
  return {"params": {"conv1a": {"kernel": rng.normal(size=(3, 3, 3, 1, 4)).astype(np.float32),
                                "bias": jnp.arange(4, dtype=jnp.float32)},
                     "head": {"kernel": rng.normal(size=(1, 1, 1, 4, 2)).astype(np.float32)}},
          "batch_stats": {"bn": {"mean": np.zeros(4, np.float32),
                                 "var": np.full(4, 0.25, np.float32)}}}


def save(path):
  return save_model(path, variables(), CONFIG, LABELS, TRAINING, 1, PROVENANCE)


def error_of(path) -> str:
  """load_model's message for `path`, checked to be one line naming the file."""
  with pytest.raises(UserError) as info:
    load_model(path)
  message = str(info.value)
  assert "\n" not in message and str(path) in message, message
  return message


def test_round_trip_is_exact(tmp_path):
  path = save(tmp_path / "fold1.whqc")
  assert path == tmp_path / "fold1.whqc"
  assert [p.name for p in tmp_path.iterdir()] == ["fold1.whqc"]  # no temporary left over
  model = load_model(path)
  expected = variables()
  assert (model.config, model.labels, model.training, model.fold, model.provenance) == (
      CONFIG, LABELS, TRAINING, 1, PROVENANCE)
  got_leaves = sorted((".".join(k), v) for k, v in _leaves(model.variables))
  want_leaves = sorted((".".join(k), np.asarray(v)) for k, v in _leaves(expected))
  assert [k for k, _ in got_leaves] == [k for k, _ in want_leaves]
  for (key, got), (_, want) in zip(got_leaves, want_leaves):
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want)
  assert len(model.sha256) == 64
  assert load_model(save(tmp_path / "again.bin")).sha256 == model.sha256  # any name


def test_numpy_values_in_the_metadata_are_stored_as_json(tmp_path):
  training = {"volume_ml": np.float32(0.5), "histogram": np.array([0.25, 0.75]),
              "cases": np.int64(3), "shape": (2, 3)}
  path = save_model(tmp_path / "m.whqc", variables(), CONFIG, LABELS, training, np.int64(0),
                    PROVENANCE)
  model = load_model(path)
  assert model.training == {"volume_ml": 0.5, "histogram": [0.25, 0.75], "cases": 3,
                            "shape": [2, 3]}
  assert model.fold == 0 and type(model.fold) is int


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def test_the_header_is_readable_text(tmp_path):
  lines = save(tmp_path / "m.whqc").read_bytes().split(b"\n", 3)
  assert lines[0] + b"\n" == MAGIC
  header = json.loads(lines[1])
  assert header["format_version"] == FORMAT_VERSION
  assert header["wh_errmap_version"] == __version__
  assert json.loads(lines[2])["fold"] == 1


def test_missing_file_and_folder(tmp_path):
  assert "does not exist" in error_of(tmp_path / "nope.whqc")
  assert "is a folder" in error_of(tmp_path)


def test_not_a_model_file(tmp_path):
  garbage = tmp_path / "garbage.whqc"
  garbage.write_bytes(b"\x00\x01garbage" * 100)
  assert "not a wh_errmap model file" in error_of(garbage)
  image = write_nifti(tmp_path / "image.nii.gz", np.zeros((4, 4, 4), np.float32))
  assert "looks like an image" in error_of(image)
  plain = write_nifti(tmp_path / "image.nii", np.zeros((4, 4, 4), np.float32))
  assert "looks like an image" in error_of(plain)
  empty = tmp_path / "empty.whqc"
  empty.write_bytes(b"")
  assert "truncated" in error_of(empty)


@pytest.mark.parametrize("keep", [10, 40, -1])
def test_truncated(tmp_path, keep):
  path = save(tmp_path / "m.whqc")
  data = path.read_bytes()
  path.write_bytes(data[:keep])
  assert "truncated" in error_of(path)


def test_extra_bytes_at_the_end(tmp_path):
  path = save(tmp_path / "m.whqc")
  path.write_bytes(path.read_bytes() + b"\0")
  assert "damaged" in error_of(path)


@pytest.mark.parametrize("where", ["body", "metadata"])
def test_a_flipped_byte_fails_the_checksum(tmp_path, where):
  path = save(tmp_path / "m.whqc")
  data = bytearray(path.read_bytes())
  metadata_start = data.index(b"\n", len(MAGIC)) + 1
  index = len(data) - 100 if where == "body" else metadata_start + 5
  data[index] ^= 0x01
  path.write_bytes(bytes(data))
  message = error_of(path)
  assert "the file is damaged: its checksum" in message and "does not match" in message


def _rewrite_header(path, change):
  data = path.read_bytes()
  end = data.index(b"\n", len(MAGIC))
  header = json.loads(data[len(MAGIC):end])
  change(header)
  path.write_bytes(MAGIC + json.dumps(header).encode() + data[end:])


def test_another_format_version(tmp_path):
  path = save(tmp_path / "m.whqc")
  _rewrite_header(path, lambda h: h.update(format_version=2, wh_errmap_version="9.0.0"))
  message = error_of(path)
  assert "format version 2" in message and f"reads version {FORMAT_VERSION}" in message
  assert "9.0.0" in message and "export the model again" in message


def test_unreadable_header(tmp_path):
  path = save(tmp_path / "m.whqc")
  data = path.read_bytes()
  path.write_bytes(MAGIC + b"{not json" + data[data.index(b"\n", len(MAGIC)):])
  assert "header cannot be read" in error_of(path)
  _rewrite_header(path := save(tmp_path / "m.whqc"), lambda h: h.update(body_length="many"))
  assert "body_length" in error_of(path)
  path.write_bytes(MAGIC + b"x" * 70_000)
  assert "header cannot be read" in error_of(path)
