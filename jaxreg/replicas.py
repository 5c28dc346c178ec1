"""Seeds as replicas: each variant of a study run for seeds 0..N-1.

A replica is an ordinary variant named `<variant>/seed=K` (just `seed=K`
for a study of one unnamed run) with `seed: K` added to its overrides, so a
sweep runs, stacks, skips and resumes it like any other variant, and the
report groups the replicas of a variant by their shared settings. One seed
leaves a study's variants as they are (their run directories keep their
names). Plain names and dicts here (no JAX); sweep.py wraps them in
Variants.
"""
from __future__ import annotations

import re
from typing import Sequence

# The config key a replica sets.
SEED_KEY = "seed"


def check_num_seeds(num_seeds) -> int:
  """`num_seeds` when it is an integer >= 1, else a ValueError."""
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) \
      or num_seeds < 1:
    raise ValueError(f"seeds={num_seeds!r} must be an integer >= 1 "
                     "(--seeds / config.num_seeds / sweep.run(seeds=))")
  return num_seeds


def replicas(name: str, overrides: dict, num_seeds: int
             ) -> list[tuple[str, dict]]:
  """The (name, overrides) of each replica of one variant."""
  if check_num_seeds(num_seeds) == 1:
    return [(name, dict(overrides))]
  if SEED_KEY in overrides:
    raise ValueError(f"variant {name} sets `seed` itself; drop the seed "
                     "axis from the study or run without --seeds")
  return [(f"{name}/seed={k}" if overrides else f"seed={k}",
           {**overrides, SEED_KEY: k}) for k in range(num_seeds)]


def replica_base(name: str) -> str:
  """The variant a replica name belongs to: "norm=batch/seed=2" ->
  "norm=batch", "seed=2" -> "default" (the one unnamed run's name, as
  sweep.variant_name gives it); a name without a seed part is its own."""
  if re.fullmatch(r"seed=\d+", name):
    return "default"
  match = re.fullmatch(r"(.+)/seed=\d+", name)
  return match.group(1) if match else name


def expand_names(names: Sequence[str], chosen: Sequence[str]) -> list[str]:
  """The names in `names` that `chosen` asks for, in its order: a replica
  by its name, or every replica of a variant by the variant's name (each
  once)."""
  by_base: dict[str, list[str]] = {}
  for n in names:
    by_base.setdefault(replica_base(n), []).append(n)
  known = set(names)
  unknown = [n for n in chosen if n not in known and n not in by_base]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; this study has: "
                     f"{', '.join(by_base)}")
  out = [m for n in chosen for m in ([n] if n in known else by_base[n])]
  return list(dict.fromkeys(out))


def count_line(names: Sequence[str], num_seeds: int) -> str:
  """--dry_run's last line: "9 runs (replicas of 3 variants, 3 seeds
  each)", or "N variants" for one seed."""
  if num_seeds == 1:
    return f"{len(names)} variants"
  k = len({replica_base(n) for n in names})
  return (f"{len(names)} runs (replicas of {k} variant{'s' * (k != 1)}, "
          f"{num_seeds} seeds each)")
