"""Quality control of many pairs: a stream that overlaps reading, inference and writing, and
the split of a folder's pairs into shards for job arrays.

The pairs pass through three stages: reader threads read, hash and preprocess the next
`prefetch` pairs, the calling thread runs the predictor on one pair after another (its
compiled programs are reused through the predictor's shape buckets; pairs of one bucket that
are read already go through it together, up to `batch`), and one writer thread
scores each pair, maps its error map back onto the scan's grid and writes its files. Every
stage holds a bounded number of pairs, so memory does not grow with the number of pairs:
what is kept per pair is one short row (pair, verdict, mean predicted Dice, QI).

Shards: `--shard=i/n` (i = 0..n-1, as a SLURM array's task id) takes every n-th pair of the
folder's pairs sorted by name, starting at the i-th: the same split on every machine, and
sizes that differ by at most one pair.
"""
from __future__ import annotations

import collections
import concurrent.futures
import datetime
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from wh_errmap.data.labels import LabelConvention
from wh_errmap.errors import UserError
from wh_errmap.qc.assessment import convention_from
from wh_errmap.qc.folder import Pending, begin, complete, describe
from wh_errmap.qc.pairing import pair_name
from wh_errmap.qc.predictor import Predictor
from wh_errmap.qc.verdict import Settings
from wh_errmap.utils.progress import console

Progress = Callable[[str], None]
Pair = tuple[Path, Path]
PHASES = ("read", "resample", "infer", "write")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def default_batch() -> int:
  """Pairs per predictor call when not set: 4 on a GPU or TPU, 1 on the CPU."""
  return 1 if jax.default_backend() == "cpu" else 4


def parse_shard(text: str) -> tuple[int, int] | None:
  """`i/n` -> (i, n) with 0 <= i < n; "" -> None (all pairs). Anything else: UserError."""
  if not str(text).strip():
    return None
  match = _SHARD.match(str(text))
  if not match:
    raise UserError(f"--shard={text}: expected i/n, e.g. 0/4 for the first of 4 shards")
  index, count = int(match[1]), int(match[2])
  if count < 1 or index >= count:
    raise UserError(f"--shard={text}: i must be 0..n-1 and n at least 1 (the first of 4 "
                    f"shards is 0/4, the last 3/4)")
  return index, count


def shard_pairs(pairs: Sequence[Pair], index: int, count: int) -> list[Pair]:
  """Shard `index` of `count`: every count-th pair, by pair name, from the index-th."""
  ordered = sorted(pairs, key=lambda p: (pair_name(*p), str(p[0]), str(p[1])))
  return ordered[index::count]


class PhaseTimes:
  """Seconds per phase summed over pairs (the phases overlap, so their sum can exceed the
  wall-clock time), and the wall-clock time of the whole."""

  def __init__(self):
    self.seconds = dict.fromkeys(PHASES, 0.0)
    self.assessed = 0
    self.start = time.perf_counter()
    self._lock = threading.Lock()   # the stages' threads add to it

  def add(self, phase: str, seconds: float, assessed: int = 0) -> None:
    with self._lock:
      self.seconds[phase] += seconds
      self.assessed += assessed

  def to_json(self) -> dict[str, Any]:
    wall = time.perf_counter() - self.start
    n = max(1, self.assessed)
    return {"wall_s": round(wall, 3), "assessed": self.assessed,
            "pairs_per_s": round(self.assessed / wall, 4) if wall > 0 else None,
            "seconds_per_pair": {p: round(s / n, 4) for p, s in self.seconds.items()}}


def row_of(result: dict[str, Any], reused: bool) -> dict[str, Any]:
  """What a stream keeps of a pair's result."""
  return {"pair": result["pair"], "verdict": result["verdict"],
          "mean_predicted_dice": result.get("mean_predicted_dice"), "qi": result.get("qi"),
          "reused": reused}


def assess_many(pairs: Sequence[Pair], predictor: Predictor, output_dir: Path,
                settings: Settings = Settings(),
                labels: str | LabelConvention | None = None, overwrite: bool = False,
                figures: bool = True, progress: Progress = console, prefetch: int = 2,
                read_threads: int = 1, batch: int = 1, timing: PhaseTimes | None = None,
                ) -> tuple[list[dict], list[str]]:
  """Assesses every pair, with a progress bar and ETA. Any failure of a pair (a bad file,
  an existing other result, out of memory, ...) is reported and the pair skipped; the others
  complete. KeyboardInterrupt and SystemExit stop the stream: the pair being written is
  finished, the pairs read ahead are dropped (a run again redoes them).

  prefetch: pairs read ahead of the predictor (0: each pair read when its turn comes).
  batch: at most this many pairs of one shape bucket that are read already go through the
  predictor in one call.
  Returns (rows, problems): a row (`row_of`) per assessed or reused pair, in pair order.
  """
  convention = convention_from(labels)
  timing = timing or PhaseTimes()
  rows: list[dict] = []
  problems: list[str] = []
  start, done = time.monotonic(), 0

  def finished(pair: Pair, result: dict | None, reused: bool, error: Exception | None) -> None:
    nonlocal done
    done += 1
    bar = _bar(done, len(pairs), start)
    if error is not None:
      problems.append(describe(error, *pair))
      progress(f"{bar} skipped: {problems[-1]}")
      return
    rows.append(row_of(result, reused))
    dice = result.get("mean_predicted_dice")
    progress(f"{bar} {result['pair']}: {result['verdict']}, predicted Dice "
             f"{'-' if dice is None else f'{dice:.3f}'}, QI {result['qi']:.4f} "
             f"({'already assessed, kept' if reused else 'assessed'})")

  def read(pair: Pair):
    previous, pending = begin(*pair, predictor, output_dir, settings, convention, overwrite,
                              progress)
    if pending is not None:
      timing.add("read", pending.prepared.seconds["read"])
      timing.add("resample", pending.prepared.seconds["resample"])
    return previous, pending

  def write(pending: Pending, prob) -> dict:
    t = time.perf_counter()
    result = complete(pending, prob, predictor, output_dir, settings, figures)
    timing.add("write", time.perf_counter() - t, assessed=1)
    return result

  batch = max(1, int(batch))
  ahead = max(int(prefetch), batch - 1, 0) + 1
  readers = concurrent.futures.ThreadPoolExecutor(max(1, int(read_threads)), "qc-read")
  writer = concurrent.futures.ThreadPoolExecutor(1, "qc-write")
  reads: collections.deque = collections.deque()
  writes: collections.deque = collections.deque()
  upcoming = iter(pairs)

  def collect(block: bool) -> None:
    while writes and (block or writes[0][1].done()):
      pair, future = writes.popleft()
      try:
        finished(pair, future.result(), False, None)
      except Exception as e:  # noqa: BLE001  (one bad pair must not stop the batch)
        finished(pair, None, False, e)

  def ready_same_bucket(shape: tuple) -> tuple[Pair, Pending] | None:
    """The next read pair if it is already preprocessed, needs the predictor and has the
    bucket `shape`; it leaves the queue."""
    if not reads or not reads[0][1].done() or reads[0][1].exception() is not None:
      return None
    _, pending = reads[0][1].result()
    if pending is None or predictor.bucket_shape(pending.prepared.mask.shape) != shape:
      return None
    return reads.popleft()[0], pending

  try:
    while True:
      while len(reads) < ahead and (pair := next(upcoming, None)) is not None:
        reads.append((pair, readers.submit(read, pair)))
      if not reads:
        break
      pair, future = reads.popleft()
      try:
        previous, pending = future.result()
      except Exception as e:  # noqa: BLE001  (one bad pair must not stop the batch)
        finished(pair, None, False, e)
        continue
      if pending is None:
        finished(pair, previous, True, None)
        continue
      group = [(pair, pending)]
      shape = predictor.bucket_shape(pending.prepared.mask.shape)
      while len(group) < batch and (more := ready_same_bucket(shape)) is not None:
        group.append(more)
      try:
        t = time.perf_counter()
        probs = predictor.error_maps([p.prepared.image for _, p in group],
                                     [p.prepared.mask for _, p in group])
        timing.add("infer", time.perf_counter() - t)
      except Exception as e:  # noqa: BLE001  (one bad pair must not stop the batch)
        for pair, _ in group:
          finished(pair, None, False, e)
        continue
      for (pair, pending), prob in zip(group, probs):
        collect(block=len(writes) >= 1 + batch)   # a bounded queue for the writer
        writes.append((pair, writer.submit(write, pending, prob)))
      collect(block=False)
    collect(block=True)
  finally:
    readers.shutdown(wait=True, cancel_futures=True)
    writer.shutdown(wait=True, cancel_futures=True)   # the pair being written is finished
  order = {pair_name(*p): i for i, p in enumerate(pairs)}
  rows.sort(key=lambda r: order.get(r["pair"], len(order)))
  return rows, problems


def _bar(done: int, total: int, start: float) -> str:
  """`[#####.....] 5/10 ETA 0:01:10`: the time left from the pace so far."""
  width = 20
  filled = round(width * done / max(1, total))
  elapsed = time.monotonic() - start
  left = elapsed / done * (total - done) if done else 0.0
  return (f"[predict] [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
          f"ETA {datetime.timedelta(seconds=round(left))}")
