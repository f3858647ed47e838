"""Cross-validation: scoring a fold's test masks (`evaluate`), starting a run in its workdir
(`run`), and running folds as child processes (`commands`, `devices`, `children`)."""
