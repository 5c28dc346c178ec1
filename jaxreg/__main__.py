"""`python -m jaxreg --config=...`: the jaxreg command (jaxreg/cli.py)."""
from jaxreg import cli

if __name__ == "__main__":
  cli.run()
