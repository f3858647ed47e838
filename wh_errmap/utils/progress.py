"""Progress messages for long work."""
import sys


def console(message: str) -> None:
  """Prints a progress line at once, also when stdout is a file or a pipe."""
  print(message, file=sys.stdout, flush=True)
