"""The command line's last error line stays the last line whatever other threads print."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_error_line_is_last_although_another_thread_keeps_printing():
  """As orbax's writer threads do after a failed save: a thread prints traceback lines in a
  loop, in pieces, before and after the error line is written; nothing of it may follow."""
  script = textwrap.dedent("""
      import os, sys, threading, time
      from wh_errmap import cli

      def chatter():
        while True:
          sys.stderr.write("Traceback (most recent call last):\\n    ")
          sys.stderr.write("File x, line 1\\n")
          sys.stderr.flush()

      threading.Thread(target=chatter, daemon=True).start()
      time.sleep(0.2)
      cli._last_line("error: the disk is full writing /x")
      time.sleep(0.3)   # the thread goes on printing
      os._exit(2)
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.splitlines()
  assert "Traceback (most recent call last):" in lines   # the thread did print before
  assert lines[-1] == "error: the disk is full writing /x", result.stderr[-500:]
