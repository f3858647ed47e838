"""The stage clock's lines: each stage's time, its share, and when the rest is shown."""
from __future__ import annotations

import pytest

from wh_errmap.utils import progress


class FakeTime:
  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    return self.now


@pytest.fixture
def fake_time(monkeypatch):
  fake = FakeTime()
  monkeypatch.setattr(progress.time, "perf_counter", fake.perf_counter)
  return fake


@pytest.mark.parametrize("rest, shown", [(0.0, False), (1.9, False), (2.0, True), (2.1, True)])
def test_time_outside_the_stages_is_shown_from_5_percent(fake_time, rest, shown):
  printed = []
  clock = progress.StageClock(printed.append)
  with clock("train"):
    fake_time.now += 12.0
  with clock("evaluate"):
    fake_time.now += 28.0 - rest   # the stages take 40 - rest of 40 s
  fake_time.now += rest
  assert printed == ["[time] train: 12.0 s", f"[time] evaluate: {28.0 - rest:.1f} s"]
  line = clock.summary()
  assert line.startswith(f"time by stage: train 12.0 s (30%), evaluate {28 - rest:.1f} s "
                         f"({100 * (28 - rest) / 40:.0f}%)")
  assert ("other" in line) == shown
  if shown:
    assert f"other {rest:.1f} s ({100 * rest / 40:.0f}%)" in line
  assert line.endswith("; total 40.0 s")


def test_a_stage_timed_twice_adds_up_and_a_failed_one_prints_nothing(fake_time):
  printed = []
  clock = progress.StageClock(printed.append)
  for took in (50.0, 70.0):
    with clock("data"):
      fake_time.now += took
  with pytest.raises(RuntimeError):
    with clock("broken"):
      fake_time.now += 1.0
      raise RuntimeError("stage failed")
  assert printed == ["[time] data: 50.0 s", "[time] data: 1.2 min"]
  assert clock.seconds == {"data": 120.0}
  assert clock.summary() == "time by stage: data 2.0 min (99%); total 2.0 min"
