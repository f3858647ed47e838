"""The run-time check: overridden config fields that the experiment never read are named."""
from __future__ import annotations

import copy
import pickle
import types

import ml_collections
import pytest

import experiments
from wh_errmap.utils.config_reads import recording, warn_unread


def _config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.by_attribute = 1
  c.by_item = 2
  c.by_get = 3
  c.unread = 4
  c.group = ml_collections.ConfigDict()
  c.group.read = 5
  c.group.unread = 6
  c.group.deep = ml_collections.ConfigDict({"leaf": 7})
  c.dumped = ml_collections.ConfigDict({"a": 8, "b": 9})
  c.untouched = ml_collections.ConfigDict({"x": 10})
  c.splits = ml_collections.ConfigDict({"num_folds": 5})
  c.num_folds = c.splits.get_ref("num_folds")   # one value, two keys (as cv_report)
  return c


def _run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Reads some fields each way an experiment does, and not others."""
  del workdir
  assert config.by_attribute == 10
  assert config["by_item"] == 20
  assert config.get("by_get") == 30
  assert config.group.read == 50 and config["group"]["deep"].leaf == 70
  assert ml_collections.ConfigDict(config.dumped.to_dict()).b == 90
  assert config.num_folds == 3


FAKE = types.SimpleNamespace(__name__="experiments.fake", get_config=_config, run=_run)
OVERRIDES = ["by_attribute=10", "by_item=20", "by_get=30", "unread=40", "group.read=50",
             "group.unread=60", "group.deep.leaf=70", "dumped.a=80", "dumped.b=90",
             "untouched.x=100", "splits.num_folds=3"]


def _warned(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_the_warning_names_exactly_the_overridden_keys_never_read(capsys):
  config = FAKE.get_config()
  overridden = experiments.override(config, OVERRIDES, FAKE)
  with warn_unread(config, overridden, "fake") as tracked:
    FAKE.run(tracked, "unused")
  assert _warned(capsys.readouterr().err) == [
      f"warning: --set {key} had no effect: experiment fake never read it"
      for key in ("unread", "group.unread", "untouched.x")]


def test_a_run_that_raises_does_not_warn(capsys):
  """It may have stopped before reading the key; its error stays its one line."""
  def failing(config, workdir):
    del workdir
    assert config.by_attribute == 1
    raise RuntimeError("stopped")

  config = _config()
  with pytest.raises(RuntimeError, match="stopped"):
    with warn_unread(config, ["by_attribute", "unread"], "fake") as tracked:
      failing(tracked, "unused")
  assert _warned(capsys.readouterr().err) == []


@pytest.mark.parametrize("read", [
    lambda c: c.group.read,
    lambda c: c["group"]["read"],
    lambda c: c["group.read"],
    lambda c: c.group.get("read"),
    lambda c: getattr(c.group, "read"),
    lambda c: c.group.to_dict(),
    lambda c: c.to_json(),
    lambda c: dict(c.group.items()),
    lambda c: list(c.group.values()),
    lambda c: [k for k in c.group],
    lambda c: ml_collections.ConfigDict(c.group),
    lambda c: copy.deepcopy(c),
    lambda c: pickle.dumps(c.group),
    lambda c: c.group.get_ref("read"),
], ids=["attribute", "item", "dotted", "get", "getattr", "to_dict", "to_json", "items",
        "values", "iteration", "ConfigDict", "deepcopy", "pickle", "get_ref"])
def test_each_way_of_reading_counts(read):
  tracked, reads = recording(_config())
  read(tracked)
  assert reads.was_read("group.read")


@pytest.mark.parametrize("look", [
    lambda c: "read" in c.group,
    lambda c: len(c.group),
    lambda c: c.group.keys(),
    lambda c: c.group.unread,
    lambda c: c.group.deep.to_dict(),
    lambda c: c.group,
], ids=["in", "len", "keys", "sibling", "sibling group", "the group object"])
def test_looking_at_the_config_is_not_reading_a_field(look):
  tracked, reads = recording(_config())
  look(tracked)
  assert not reads.was_read("group.read")


def test_the_recording_copy_behaves_as_the_config():
  config = _config()
  config.loose = ml_collections.ConfigDict(type_safe=False)
  config.loose.value = 1
  config.lock()
  tracked, _ = recording(config)
  assert isinstance(tracked, ml_collections.ConfigDict)
  assert tracked == config and config == tracked and tracked.to_dict() == config.to_dict()
  with pytest.raises(TypeError):
    tracked.by_item = "text"     # type safety kept
  tracked.loose.value = "text"   # ... and its absence
  with pytest.raises(AttributeError):
    tracked.new_field = 1        # the lock kept
  tracked.splits.num_folds = 4   # the FieldReference is still one value for two keys
  assert tracked.num_folds == 4
  assert config.loose.value == 1 and config.by_item == 2
