"""The cross-validation report: Table 1, QI statistics, figures and the section beyond the
paper, from the folds' records (`report.build.build_report`)."""
