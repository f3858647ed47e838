"""Progress messages for long work, and the time a run's stages take."""
import contextlib
import sys
import time


def console(message: str) -> None:
  """Prints a progress line at once, also when stdout is a file or a pipe."""
  print(message, file=sys.stdout, flush=True)


class StageClock:
  """The wall time of a run's stages. `with clock("seg3d"): ...` prints the stage's time
  when it ends (a stage that fails prints nothing); `summary()` is the breakdown line: each
  stage's time and share of the run so far, and the total."""

  def __init__(self, printer=console):
    self.start = time.perf_counter()
    self.seconds: dict[str, float] = {}
    self.printer = printer

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    self.seconds[name] = self.seconds.get(name, 0.0) + took
    self.printer(f"[time] {name}: {_minutes(took)}")

  def summary(self) -> str:
    total = time.perf_counter() - self.start
    parts = dict(self.seconds)
    rest = total - sum(parts.values())
    if rest >= total / 20:   # 5% or more
      parts["other"] = rest
    shares = ", ".join(f"{name} {_minutes(s)} ({100 * s / max(total, 1e-9):.0f}%)"
                       for name, s in parts.items())
    return f"time by stage: {shares}; total {_minutes(total)}"


def _minutes(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
