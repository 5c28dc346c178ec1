"""`python -m jaxreg.models`: each model's parameter count at its default
config, for 28x28x1 and 32x32x3 inputs."""
from __future__ import annotations

from jaxreg import config as config_lib
from jaxreg import models


def main() -> None:
  """Prints each model's parameter count at its default config."""
  shapes = (((28, 28, 1), 10), ((32, 32, 3), 10))
  header = f"{'model':<14}" + "".join(
      f"{'x'.join(map(str, s))}/{k} classes".rjust(24) for s, k in shapes)
  print(header)
  for name in models.MODELS.names():
    cfg = config_lib.model_config()
    cfg.name = name
    counts = [models.count_params(models.build_model(cfg, k), s)
              for s, k in shapes]
    print(f"{name:<14}" + "".join(f"{c:>24,}" for c in counts))


if __name__ == "__main__":
  main()
