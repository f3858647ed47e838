"""QC of a cohort: shards, their merge and its refusals, and a folder run killed and resumed."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from experiments import predict, qc_merge
from tests.conftest import ROOT, cpu_env
from tests.qc.test_folder import KnownPredictor
from tests.train.tiny import tiny_config
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.errors import UserError
from wh_errmap.qc.cohort import assess_many, parse_shard, shard_pairs
from wh_errmap.qc.folder import OUTPUT_SUFFIXES
from wh_errmap.qc.pairing import pair_folder, pair_name
from wh_errmap.qc.predictor import load_predictor


@pytest.mark.parametrize("text, expected", [
    ("", None), ("0/1", (0, 1)), ("0/4", (0, 4)), ("3/4", (3, 4)), (" 2 / 5 ", (2, 5))])
def test_a_shard_is_i_of_n_counted_from_0(text, expected):
  assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "5/4", "0/0", "1/0", "-1/4", "1", "a/b", "1/2/3",
                                  "1.0/2"])
def test_a_shard_outside_0_to_n_minus_1_is_refused_naming_the_flag(text):
  with pytest.raises(UserError, match=r"--shard=.*i"):
    parse_shard(text)


def test_a_shard_of_a_single_pair_is_refused(monkeypatch, cohort, tmp_path):
  images, masks = cohort
  with pytest.raises(UserError, match="--shard=0/2 splits a folder's pairs; --image=.* a file"):
    run_known(monkeypatch, (images / "p0_image.nii.gz", masks / "p0_label.nii.gz"),
              tmp_path / "out", shard="0/2")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_shards_take_every_pair_exactly_once_in_sizes_within_one(count):
  rng = np.random.default_rng(count)
  pairs = [(f"/img/c{k:03d}_image.nii.gz", f"/msk/c{k:03d}_label.nii.gz") for k in range(11)]
  shards = [shard_pairs([pairs[i] for i in rng.permutation(11)], i, count)
            for i in range(count)]
  taken = [p for shard in shards for p in shard]
  assert sorted(taken) == sorted(pairs) and len(taken) == len(set(taken))
  sizes = [len(s) for s in shards]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 11
  # The same split from any listing order (another machine's directory order).
  assert [shard_pairs(list(reversed(pairs)), i, count) for i in range(count)] == shards


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """images/ and masks/ of 5 small phantom pairs (3 different cases)."""
  folder = tmp_path_factory.mktemp("cohort")
  images, masks = folder / "images", folder / "masks"
  images.mkdir()
  masks.mkdir()
  for k in range(5):
    image, label, affine = make_phantom_case(seed=5, index=k % 3, spacing_scale=2.0)
    nib.save(nib.Nifti1Image(image, affine), str(images / f"p{k}_image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(masks / f"p{k}_label.nii.gz"))
  return images, masks


def known_predictor(source="known"):
  return KnownPredictor(None, None, tiny_config(), source, 0, 1, 1)


def run_known(monkeypatch, cohort, out, predictor=None, **fields):
  """predict on the cohort folder with a KnownPredictor (no model to train or compile)."""
  monkeypatch.setattr(predict, "load_predictor",
                      lambda *args, **kwargs: predictor or known_predictor())
  config = predict.get_config()
  config.image, config.mask, config.output_dir = str(cohort[0]), str(cohort[1]), str(out)
  config.figures = False
  for field, value in fields.items():
    setattr(config, field, value)
  predict.run(config, "unused")


def run_merge(*folders, **fields):
  config = qc_merge.get_config()
  config.results = ",".join(map(str, folders))
  for field, value in fields.items():
    setattr(config, field, value)
  qc_merge.run(config, "unused")


def table(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def test_shards_in_one_folder_or_several_merge_to_the_single_runs_table(monkeypatch, cohort,
                                                                        tmp_path):
  run_known(monkeypatch, cohort, tmp_path / "single")
  single = table(tmp_path / "single" / "qc.tsv")
  assert len(single) == 5
  # Three shards into one folder: no shard writes the folder's table.
  for i in range(3):
    run_known(monkeypatch, cohort, tmp_path / "shared", shard=f"{i}/3")
  assert not (tmp_path / "shared" / "qc.tsv").exists()
  manifests = [json.loads((tmp_path / "shared" / f"shard-{i}-of-3.json").read_text())
               for i in range(3)]
  assessed = [p for m in manifests for p in m["assessed"]]
  assert sorted(assessed) == sorted(r["pair"] for r in single)   # each pair exactly once
  run_merge(tmp_path / "shared")
  assert table(tmp_path / "shared" / "qc.tsv") == single
  # Two shards in two folders, merged into a third, with a gallery linking both.
  for i in range(2):
    run_known(monkeypatch, cohort, tmp_path / f"part{i}", shard=f"{i}/2", figures=True)
  run_merge(tmp_path / "part0", tmp_path / "part1", output_dir=str(tmp_path / "all"))
  assert table(tmp_path / "all" / "qc.tsv") == single
  summary = json.loads((tmp_path / "all" / "summary.json").read_text())
  assert summary["pairs"] == 5 and summary["missing"] == []
  assert sorted(s["shard"] for s in summary["shards"]) == [0, 1]
  gallery = (tmp_path / "all" / "index.html").read_text()
  for name in ("p0__p0_label", "p1__p1_label"):
    folder = next(f for f in ("part0", "part1") if (tmp_path / f / f"{name}_qc.png").exists())
    assert f"../{folder}/{name}_qc.png" in gallery


def test_merge_refuses_other_settings_other_models_and_missing_shards(monkeypatch, cohort,
                                                                     tmp_path):
  run_known(monkeypatch, cohort, tmp_path / "a", shard="0/2")
  run_known(monkeypatch, cohort, tmp_path / "b", shard="1/2", threshold=0.3)
  with pytest.raises(UserError, match="another threshold: .*0.5.*0.3"):
    run_merge(tmp_path / "a", tmp_path / "b", output_dir=str(tmp_path / "m"))
  with pytest.raises(UserError, match="several folders needs --set=output_dir"):
    run_merge(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b")
  run_known(monkeypatch, cohort, tmp_path / "b", shard="1/2",
            predictor=known_predictor("another"))
  with pytest.raises(UserError, match=r"another predictor .*known.*another"):
    run_merge(tmp_path / "a", tmp_path / "b", output_dir=str(tmp_path / "m"))
  # A missing shard is named; partial merges what there is and lists it.
  with pytest.raises(UserError, match="shard 1/2: no shard-1-of-2.json"):
    run_merge(tmp_path / "a")
  run_merge(tmp_path / "a", partial=True)
  summary = json.loads((tmp_path / "a" / "summary.json").read_text())
  assert summary["pairs"] == 3 and any("shard 1/2" in m for m in summary["missing"])
  # Shards of two different splits.
  shutil.rmtree(tmp_path / "b")
  run_known(monkeypatch, cohort, tmp_path / "b", shard="1/3")
  with pytest.raises(UserError, match="different splits"):
    run_merge(tmp_path / "a", tmp_path / "b", output_dir=str(tmp_path / "m"))
  # One pair with two different results.
  shutil.rmtree(tmp_path / "b")
  run_known(monkeypatch, cohort, tmp_path / "b", shard="1/2")
  name = "p0__p0_label_qc.json"
  result = json.loads((tmp_path / "a" / name).read_text())
  (tmp_path / "b" / name).write_text(json.dumps({**result, "qi": 0.5}))
  with pytest.raises(UserError, match="p0__p0_label has two different results"):
    run_merge(tmp_path / "a", tmp_path / "b", output_dir=str(tmp_path / "m"))


def test_a_run_killed_at_any_point_resumes_without_a_lost_or_doubled_row(tiny_run, cohort,
                                                                         tmp_path):
  out = tmp_path / "out"
  command = [sys.executable, str(ROOT / "launch.py"), "--experiment=predict",
             f"--workdir={tiny_run}", f"--image={cohort[0]}", f"--mask={cohort[1]}",
             f"--set=output_dir={out}", "--set=figures=False"]
  pairs = sorted(pair_name(*p) for p in pair_folder(*cohort)[0])
  rng = np.random.default_rng(int(time.time()))
  kill_after = int(rng.integers(1, len(pairs)))   # results seen before SIGKILL, drawn
  process = subprocess.Popen(command, env=cpu_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 600
    while (len(list(out.glob("*_qc.json"))) < kill_after and process.poll() is None
           and time.monotonic() < deadline):
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  done = {p.name: p.read_bytes() for p in out.glob("*_qc.json")}
  assert 0 < len(done) < len(pairs), f"killed after {len(done)} of {len(pairs)} results"
  # What a kill can leave: another pair's maps without their result, and temporary files.
  unfinished = next(p for p in pairs if f"{p}_qc.json" not in done)
  (out / f"{unfinished}_error.nii.gz").write_bytes(b"half a file")
  (out / f".{unfinished}_error_prob.nii.gz.x1y2z3.nii.gz").write_bytes(b"temporary")
  completed = subprocess.run(command, env=cpu_env(), capture_output=True, text=True)
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert f"{len(done)} of them kept from before" in completed.stdout
  rows = [r["pair"] for r in table(out / "qc.tsv")]
  assert rows == pairs   # every pair once, in order
  for name, content in done.items():   # finished results were kept, not redone
    assert (out / name).read_bytes() == content
  # No temporary file is left, and every pair has all its files and a result.
  assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
  for pair in pairs:
    result = json.loads((out / f"{pair}_qc.json").read_text())
    for name in result["files"]:
      assert nib.load(str(out / name)).shape   # readable, not half a file
  written = {p.name for p in out.iterdir()}
  expected = {f"{p}{s}" for p in pairs for s in OUTPUT_SUFFIXES if not s.endswith(".png")}
  assert expected <= written
  assert not [n for n in written if n.startswith("p") and n not in expected]
  assert not os.path.exists(out / "index.html")   # figures=False


def test_a_batch_of_one_bucket_gives_each_case_its_own_map(tiny_run, cohort, tmp_path):
  predictor = dataclasses.replace(load_predictor(tiny_run, 0), shape_bucket=16)
  rng = np.random.default_rng(0)
  shapes = [(30, 28, 20), (32, 25, 17), (29, 32, 31)]   # one bucket of 16: (32, 32, 32)
  assert len({predictor.bucket_shape(s) for s in shapes}) == 1
  images = [rng.uniform(-1, 1, s).astype(np.float32) for s in shapes]
  masks = [rng.integers(0, 8, s).astype(np.uint8) for s in shapes]
  together = predictor.error_maps(images, masks)   # padded to a batch of 4
  for image, mask, prob in zip(images, masks, together):
    assert prob.shape == mask.shape
    np.testing.assert_allclose(prob, predictor.error_map(image, mask), atol=1e-5)
  # Through a folder run, batches of up to 3 give the rows of one pair at a time. The first
  # call waits a second, so that the pairs behind it are read by then and can batch.
  calls = []

  class Counting(type(predictor)):
    def error_maps(self, images, masks):
      if not calls:
        time.sleep(1.0)
      calls.append(len(images))
      return super().error_maps(images, masks)

  counting = Counting(**{f.name: getattr(predictor, f.name)
                         for f in dataclasses.fields(predictor)})
  rows = {}
  for batch in (1, 3):
    calls.clear()
    rows[batch], problems = assess_many(pair_folder(*cohort)[0], counting,
                                        tmp_path / f"b{batch}", figures=False,
                                        progress=lambda _: None, prefetch=4, read_threads=2,
                                        batch=batch)
    assert problems == [] and sum(calls) == 5 and max(calls) <= batch
  assert max(calls) > 1
  assert [r["pair"] for r in rows[3]] == [r["pair"] for r in rows[1]]
  for one, three in zip(rows[1], rows[3]):
    assert three["verdict"] == one["verdict"]
    assert three["qi"] == pytest.approx(one["qi"], abs=1e-5)
