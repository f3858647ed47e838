"""The colours of the visual QC report, and colour tables in them for ITK-SNAP and 3D Slicer.

Every structure has one fixed colour (`structure_rgb`) in the case figures, the gallery and
the viewers' label files, and predicted errors are red (`ERROR_RGB`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from wh_errmap.data.structures import STRUCTURES
from wh_errmap.utils.atomic import write_text

# Okabe-Ito's colour-blind-safe palette, keyed by internal structure name, with white for its
# black (the scans are dark) and without its vermillion (too close to the red error overlay).
STRUCTURE_RGB: dict[str, tuple[int, int, int]] = {
    "Myo": (230, 159, 0), "LA": (86, 180, 233), "LV": (0, 158, 115), "RA": (240, 228, 66),
    "RV": (0, 114, 178), "AO": (204, 121, 167), "PA": (255, 255, 255)}
UNKNOWN_RGB = (153, 153, 153)
ERROR_RGB = (255, 0, 0)


def structure_rgb(name: str) -> tuple[int, int, int]:
  """The fixed colour of an internal structure name ("Myo", ...); grey for unknown names."""
  return STRUCTURE_RGB.get(name, UNKNOWN_RGB)


def class_name(label: int) -> str:
  """The structure name of internal class `label` (1..7); other values as their number."""
  return STRUCTURES[label - 1] if 1 <= label <= len(STRUCTURES) else str(label)


def rgb01(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
  """An (R, G, B) colour of 0..255 as matplotlib's 0..1."""
  return tuple(c / 255 for c in rgb)


_ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields: IDX label value; -R- -G- -B- colour (0..255); -A-- opacity (0..1);
#   VIS, MSH visibility in the slices and in 3D (0 or 1); LABEL description
################################################
"""


def _itksnap(entries: Sequence[tuple[int, str, tuple[int, int, int]]], clear: str) -> str:
  lines = [f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "{clear}"']
  for value, name, (r, g, b) in entries:
    label = name.replace('"', "'")
    lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    "{label}"')
  return _ITKSNAP_HEADER + "\n".join(lines) + "\n"


def _slicer(entries: Sequence[tuple[int, str, tuple[int, int, int]]], clear: str,
            table: str) -> str:
  lines = [f"# Color table file {table}", f"# {len(entries) + 1} values",
           f"0 {clear} 0 0 0 0"]
  for value, name, (r, g, b) in entries:
    words = "_".join(name.split())  # Slicer's names cannot hold spaces
    lines.append(f"{value} {words} {r} {g} {b} 255")
  return "\n".join(lines) + "\n"


def write_colour_tables(output_dir: str | os.PathLike,
                        structures: list[tuple[int, str]]) -> list[Path]:
  """Writes colour tables for the masks and the binary error maps, atomically:
  labels.itksnap.txt, labels.slicer.ctbl, errors.itksnap.txt, errors.slicer.ctbl (in that
  order, returned).

  structures: (the user's label value, internal structure name) per structure, e.g.
  [(205, "Myo"), (420, "LA")]. Values must be distinct positive integers (0 is the
  background). Each structure gets its `structure_rgb` colour; the error maps have 0
  "correct" (clear) and 1 "predicted error" (red).
  """
  values = [int(v) for v, _ in structures]
  if len(set(values)) != len(values) or min(values, default=1) <= 0:
    raise ValueError(f"label values must be distinct and positive, got {values}")
  labels = [(int(v), name, structure_rgb(name)) for v, name in structures]
  errors = [(1, "predicted error", ERROR_RGB)]
  output_dir = Path(output_dir)
  texts = {"labels.itksnap.txt": _itksnap(labels, "Clear Label"),
           "labels.slicer.ctbl": _slicer(labels, "Background", "labels.slicer.ctbl"),
           "errors.itksnap.txt": _itksnap(errors, "correct"),
           "errors.slicer.ctbl": _slicer(errors, "correct", "errors.slicer.ctbl")}
  for name, text in texts.items():
    write_text(output_dir / name, text)
  return [output_dir / name for name in texts]
