"""Runs a study: `python launch.py --config=configs/<study>.py[:arg]`.

The same command as `jaxreg` and `python -m jaxreg` (flags in
jaxreg/cli.py). Override any config field as `--config.optimizer.lr=0.1`;
a misspelled field is an error.
"""
from jaxreg import cli

if __name__ == "__main__":
  cli.run()
