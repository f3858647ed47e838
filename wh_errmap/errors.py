"""Errors caused by the user's input or settings: `launch.py` prints them as one line and
exits with status 2 instead of showing a traceback."""


class UserError(Exception):
  """A problem the user can fix (bad file, bad flag, inconsistent workdir)."""
