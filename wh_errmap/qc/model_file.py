"""One versioned file holding a trained predictor: its weights and what it needs to be used.

Layout (suggested name: `NAME.whqc`; any name is accepted):

  line 1  MAGIC, the 16 bytes `WH_ERRMAP-MODEL\\n`
  line 2  the header: one line of JSON, ended by `\\n`, with
          format ("wh_errmap-model"), format_version, wh_errmap_version (the writer's),
          metadata_length, body_length and sha256
  then    the metadata: metadata_length bytes of JSON (ended by `\\n`) with config, labels,
          training, fold and provenance
  then    the body: body_length bytes, `flax.serialization.msgpack_serialize` of the
          variables ({"params": ..., "batch_stats": ...}, numpy arrays)

sha256 is the hex digest of metadata + body as stored, so damage to either is caught; the
first three parts are text (`head -n 3 NAME.whqc` shows them). A reader refuses a
format_version it does not know before reading further: a later version may lay out the
rest differently.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from wh_errmap import __version__
from wh_errmap.errors import UserError
from wh_errmap.utils.atomic import atomic_path

FORMAT = "wh_errmap-model"
FORMAT_VERSION = 1
MAGIC = b"WH_ERRMAP-MODEL\n"
SUFFIX = ".whqc"
# A header is a few hundred bytes; a file without a line break this early is not ours.
_MAX_HEADER_BYTES = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_MAGICS = (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0")


@dataclasses.dataclass(frozen=True)
class ModelFile:
  """A model file's contents. Arrays are read-only numpy arrays."""
  variables: dict    # {"params": pytree of arrays, "batch_stats": pytree of arrays}
  config: dict       # the run's config as JSON (preprocessing + model)
  labels: dict       # the label convention the predictor was trained with
  training: dict     # the training data: source, cases, statistics for out-of-distribution checks
  fold: int          # the cross-validation fold whose predictor this is
  provenance: dict   # run workdir, checkpoint step, total steps, wh_errmap version, created time
  sha256: str        # the stored checksum of metadata + body (identifies the model)


def save_model(path: str | os.PathLike, variables: Any, config: dict, labels: dict,
               training: dict, fold: int, provenance: dict) -> Path:
  """Writes a model file atomically (a crash leaves no partial file under `path`).

  variables: flax variables, a (Frozen)dict of jax or numpy arrays. The metadata dicts are
  stored as JSON: tuples come back as lists, numpy scalars and arrays as numbers and lists.
  Returns `path` as a Path.
  """
  path = Path(path)
  arrays = jax.device_get(serialization.to_state_dict(variables))
  body = serialization.msgpack_serialize(arrays)
  metadata = (json.dumps({"config": config, "labels": labels, "training": training,
                          "fold": int(fold), "provenance": provenance}, default=_json_value)
              + "\n").encode()
  header = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "wh_errmap_version": __version__, "metadata_length": len(metadata),
            "body_length": len(body), "sha256": hashlib.sha256(metadata + body).hexdigest()}
  with atomic_path(path, SUFFIX) as tmp, open(tmp, "wb") as f:
    f.write(MAGIC)
    f.write((json.dumps(header) + "\n").encode())
    f.write(metadata)
    f.write(body)
  return path


def _json_value(value: Any) -> Any:
  """numpy values in the metadata (statistics of the training data) as plain JSON."""
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  raise TypeError(f"model file metadata: {type(value).__name__} {value!r} cannot be stored "
                  f"as JSON")


def _not_a_model(path: Path, data: bytes) -> UserError:
  """The error for a file whose first bytes `data` are not MAGIC, naming what it looks like."""
  if MAGIC.startswith(data):
    return UserError(f"model file {path}: the file is truncated ({len(data)} bytes, not even "
                     f"a header); export the model again")
  if data.startswith(_GZIP_MAGIC) or data[344:348] in _NIFTI_MAGICS:
    looks = " (it looks like an image, e.g. a NIfTI file)"
  else:
    looks = ""
  return UserError(f"{path} is not a wh_errmap model file{looks}: a model file is written by "
                   f"--experiment=export_model")


def _read_header(path: Path, data: bytes) -> tuple[dict, int]:
  """The header after MAGIC, checked for format and version; and where the metadata starts."""
  end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER_BYTES)
  if end < 0:
    if len(data) < len(MAGIC) + _MAX_HEADER_BYTES:
      raise UserError(f"model file {path}: the file is truncated within its header; export "
                      f"the model again")
    raise UserError(f"model file {path}: the header cannot be read (no end of line in the "
                    f"first {_MAX_HEADER_BYTES} bytes); the file is damaged")
  try:
    header = json.loads(data[len(MAGIC):end])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"model file {path}: the header cannot be read ({e}); the file is "
                    f"damaged") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise UserError(f"model file {path}: the header does not describe a {FORMAT} file; the "
                    f"file is damaged")
  version = header.get("format_version")
  if version != FORMAT_VERSION:
    writer = header.get("wh_errmap_version", "an unknown version")
    raise UserError(
        f"model file {path} has format version {version!r} (written by wh_errmap {writer}); "
        f"this wh_errmap ({__version__}) reads version {FORMAT_VERSION}: export the model "
        f"again with this wh_errmap (--experiment=export_model), or use wh_errmap {writer}")
  for key in ("metadata_length", "body_length"):
    if not isinstance(header.get(key), int) or header[key] < 0:
      raise UserError(f"model file {path}: the header's {key} is {header.get(key)!r}, not a "
                      f"byte count; the file is damaged")
  if not isinstance(header.get("sha256"), str):
    raise UserError(f"model file {path}: the header has no sha256; the file is damaged")
  return header, end + 1


def load_model(path: str | os.PathLike) -> ModelFile:
  """Reads and verifies a model file written by `save_model`.

  Raises UserError, one line naming the file, if it is missing, a folder, not a model file,
  truncated or damaged (checksum), or of another format version.
  """
  path = Path(path)
  if path.is_dir():
    raise UserError(f"model file {path} is a folder, not a model file (a run's folder is "
                    f"given with --workdir)")
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise UserError(f"model file {path} does not exist") from None
  if not data.startswith(MAGIC):
    raise _not_a_model(path, data[:512])
  header, start = _read_header(path, data)
  expected = start + header["metadata_length"] + header["body_length"]
  if len(data) < expected:
    raise UserError(f"model file {path}: the file is truncated ({len(data)} of {expected} "
                    f"bytes); copy or export it again")
  if len(data) > expected:
    raise UserError(f"model file {path}: the file is damaged: {len(data) - expected} bytes "
                    f"after the end of the model; copy or export it again")
  payload = data[start:]
  digest = hashlib.sha256(payload).hexdigest()
  if digest != header["sha256"]:
    raise UserError(f"model file {path}: the file is damaged: its checksum (sha256 {digest}) "
                    f"does not match the one recorded ({header['sha256']}); copy or export "
                    f"it again")
  metadata_length = header["metadata_length"]
  try:
    metadata = json.loads(payload[:metadata_length])
    variables = serialization.msgpack_restore(payload[metadata_length:])
    return ModelFile(variables=variables, config=metadata["config"], labels=metadata["labels"],
                     training=metadata["training"], fold=int(metadata["fold"]),
                     provenance=metadata["provenance"], sha256=header["sha256"])
  except Exception as e:  # noqa: BLE001  (checksum right, contents not: a faulty writer)
    problem = " ".join(f"{type(e).__name__}: {e}".split())
    raise UserError(f"model file {path}: the contents cannot be read although the checksum "
                    f"matches ({problem}); export the model again") from None
