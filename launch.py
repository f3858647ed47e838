"""Entry point from a checkout: `python launch.py --experiment=NAME [--fold=k] [--set=F=V ...]`.

The same as the installed `wh-errmap` command; the flags and their handling are in
wh_errmap/cli.py, the experiments in experiments/NAME.py (get_config + run). Flags override
the config field of the same name; `--set` reaches any field, e.g.
`--set=train.seg3d.batch_size=4`.
"""
from wh_errmap.cli import main

if __name__ == "__main__":
  main()
