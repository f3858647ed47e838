"""Which config fields an experiment reads, so that a `--set` nobody read is named.

launch.py hands run() a copy of the config that notes each field read (`recording`): a
value through item or attribute access, .get(), get_type() or get_ref(), and a whole
group through iteration, items()/values(), to_dict()/to_json()/to_yaml(), comparison,
copying or pickling (what a copy is used for is not seen, so all of it counts as read).
Fields that share one FieldReference (cv_report's num_folds and splits.num_folds) are read
together. When run() returns, `warn_unread` prints one warning line per
overridden key never read. The copy is a ConfigDict subclass, so code that checks
isinstance, copies the config or reads it inside a training loop works as before; a read
costs one set insertion.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, Iterable, Iterator

import ml_collections

_ConfigDict = ml_collections.ConfigDict


class ConfigReads:
  """The fields of one config read so far, as dotted keys."""

  def __init__(self, aliases: dict[str, frozenset[str]]):
    self.values: set[str] = set()     # fields read one by one
    self.groups: set[str] = set()     # groups read whole ("" = the whole config)
    self._aliases = aliases           # key: the keys sharing its FieldReference

  def was_read(self, key: str) -> bool:
    """Whether `key` (a field or a group) was read: itself, a group above it, a field
    below it, or a field sharing its FieldReference."""
    for alias in self._aliases.get(key, (key,)):
      parts = alias.split(".")
      above = {".".join(parts[:i]) for i in range(len(parts) + 1)}
      if above & (self.values | self.groups):
        return True
      if any(read.startswith(alias + ".") for read in self.values | self.groups):
        return True
    return False

  def unread(self, keys: Iterable[str]) -> list[str]:
    """The keys never read, each once, in the order given."""
    return [key for key in dict.fromkeys(keys) if not self.was_read(key)]


def _reads_group(method: Callable) -> Callable:
  """`method` of a ConfigDict, noting the whole group as read first."""
  @functools.wraps(method)
  def reading_group(self, *args, **kwargs):
    self._note_group()
    return method(self, *args, **kwargs)
  return reading_group


class ReadRecordingConfigDict(_ConfigDict):
  """A ConfigDict that notes into a ConfigReads which of its fields are read.

  Groups that ml_collections itself makes inside it (a dict assigned to a group field, a
  copy) are of this class too but note nothing: they were not in the config given.
  """
  _reads: ConfigReads | None = None
  _path: str = ""   # dotted key of this group ("" = the root)

  def __getitem__(self, key: str) -> Any:
    value = super().__getitem__(key)
    if self._reads is not None and not isinstance(value, _ConfigDict):
      self._reads.values.add(self._child(key))
    return value

  def get_ref(self, key: str) -> ml_collections.FieldReference:
    if self._reads is not None:
      self._reads.groups.add(self._child(key))
    return super().get_ref(key)

  def __eq__(self, other: object) -> bool:
    """Equal to a ConfigDict of the same fields, whichever of the two is recording."""
    self._note_group()
    return isinstance(other, _ConfigDict) and _ConfigDict.__eq__(other, self)

  __iter__ = _reads_group(_ConfigDict.__iter__)
  items = _reads_group(_ConfigDict.items)
  iteritems = _reads_group(_ConfigDict.iteritems)
  values = _reads_group(_ConfigDict.values)
  itervalues = _reads_group(_ConfigDict.itervalues)
  to_dict = _reads_group(_ConfigDict.to_dict)
  to_json = _reads_group(_ConfigDict.to_json)
  to_json_best_effort = _reads_group(_ConfigDict.to_json_best_effort)
  to_yaml = _reads_group(_ConfigDict.to_yaml)
  copy_and_resolve_references = _reads_group(_ConfigDict.copy_and_resolve_references)
  __reduce_ex__ = _reads_group(_ConfigDict.__reduce_ex__)   # copy.copy, deepcopy, pickle

  def _child(self, key: Any) -> str:
    return f"{self._path}.{key}" if self._path else str(key)

  def _note_group(self) -> None:
    if self._reads is not None:
      self._reads.groups.add(self._path)


def recording(config: _ConfigDict) -> tuple[ReadRecordingConfigDict, ConfigReads]:
  """A copy of `config` that notes its reads, and the ConfigReads it notes them in.

  The copy holds the same values and FieldReferences (setting a shared field changes
  both); each group is copied with its type safety and lock. `config` is left as it is.
  """
  reads = ConfigReads(_aliases(config))
  return _recording_copy(config, "", reads), reads


@contextlib.contextmanager
def warn_unread(config: _ConfigDict, overridden: Iterable[str], experiment: str
                ) -> Iterator[ReadRecordingConfigDict]:
  """Yields the recording copy of `config` to run the experiment with; when the block
  ends normally, prints to stderr one line per key of `overridden` never read:
  `warning: --set KEY had no effect: experiment NAME never read it`. A run that stops on an
  error gets none: it may have stopped before reading the key, and its error stays the one
  line it prints."""
  copy, reads = recording(config)
  yield copy
  for key in reads.unread(overridden):
    print(f"warning: --set {key} had no effect: experiment {experiment} never read it",
          file=sys.stderr, flush=True)


def _recording_copy(group: _ConfigDict, path: str, reads: ConfigReads
                    ) -> ReadRecordingConfigDict:
  # ConfigDict(group) takes over the fields, FieldReferences, type safety and lock
  copy = ReadRecordingConfigDict(group, convert_dict=group.convert_dict,
                                 allow_dotted_keys=group.allow_dotted_keys)
  for key, value in group.iteritems(preserve_field_references=True):
    if isinstance(value, _ConfigDict):   # a FieldReference stays shared, as a field
      copy[key] = _recording_copy(value, f"{path}.{key}" if path else key, reads)
  object.__setattr__(copy, "_reads", reads)
  object.__setattr__(copy, "_path", path)
  return copy


def _aliases(config: _ConfigDict) -> dict[str, frozenset[str]]:
  """{key: all keys holding the same FieldReference} for the keys that share one."""
  holders: dict[int, list[str]] = {}

  def visit(group: _ConfigDict, prefix: str) -> None:
    for key, value in group.iteritems(preserve_field_references=True):
      if isinstance(value, ml_collections.FieldReference):
        holders.setdefault(id(value), []).append(prefix + key)
      elif isinstance(value, _ConfigDict):
        visit(value, f"{prefix}{key}.")

  visit(config, "")
  return {key: frozenset(keys) for keys in holders.values() if len(keys) > 1 for key in keys}
