"""The cross-validation report of a run: Table 1, QI statistics, figures and report.md."""
from wh_errmap.report.build import build_report

__all__ = ["build_report"]
