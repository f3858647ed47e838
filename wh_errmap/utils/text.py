"""How reports and tables write values that do not exist."""
from __future__ import annotations

import math

DASH = "–"   # an en dash: the value of a cell that has none (None, NaN)


def number(value: float | None, digits: int = 4) -> str:
  """`value` with `digits` decimals, or DASH for None and NaN."""
  return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"
