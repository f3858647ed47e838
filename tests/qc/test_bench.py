"""qc_bench's parts that decide what is measured: the cohort of links and the core shares."""
from __future__ import annotations

import os

import pytest

from wh_errmap.qc import bench


def test_a_cohort_links_every_pair_to_its_case_in_turn(tmp_path):
  cases = []
  for k in range(3):
    image, label = tmp_path / f"case{k}_image.nii.gz", tmp_path / f"case{k}_label.nii.gz"
    image.write_bytes(b"image %d" % k)
    label.write_bytes(b"label %d" % k)
    cases.append((image, label))
  images, masks = bench.make_cohort(tmp_path / "cohort", cases, 7)
  assert sorted(p.name for p in images.iterdir()) == [f"c{k:05d}_image.nii.gz" for k in range(7)]
  for k in range(7):
    assert (images / f"c{k:05d}_image.nii.gz").read_bytes() == b"image %d" % (k % 3)
    assert (masks / f"c{k:05d}_label.nii.gz").read_bytes() == b"label %d" % (k % 3)
  # Made again smaller: the pairs of the larger cohort are gone.
  images, masks = bench.make_cohort(tmp_path / "cohort", cases, 2)
  assert len(list(images.iterdir())) == 2 and len(list(masks.iterdir())) == 2


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("fake_cores, processes, expected", [
    ({0, 1}, 1, [{0, 1}]), ({0, 1}, 2, [{0}, {1}]), ({0, 1, 2, 3}, 2, [{0, 1}, {2, 3}]),
    ({4, 5, 6}, 2, [{4}, {5}]), ({0, 1}, 3, [{0}, {1}, {0}])])
def test_processes_get_disjoint_equal_shares_of_the_cores(monkeypatch, fake_cores, processes,
                                                          expected):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: fake_cores)
  assert bench.core_shares(processes) == expected
