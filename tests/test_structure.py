"""The package's shape: no import cycles, no private names across modules,
config free of JAX, modules of a readable size (../shared/design.md,
"Layering")."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "jaxreg"
# A module a reader can hold in mind; the design's "about 500 lines".
MAX_LINES = 500


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = importer.split(".")
  if not is_package:
    base = base[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]
             ) -> list[tuple[str, dict[str, str], list]]:
  """(imported jaxreg modules, {local alias: module}, from-imported names)."""
  tree = ast.parse(path.read_text(), str(path))
  targets, aliases, names = set(), {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxreg":
          targets.add(a.name)
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom):
      mod = _resolve(name, path.name == "__init__.py", node)
      if mod.split(".")[0] != "jaxreg":
        continue
      for a in node.names:
        sub = f"{mod}.{a.name}"
        if sub in modules:  # `from jaxreg import train`
          targets.add(sub)
          aliases[a.asname or a.name] = sub
        else:  # `from jaxreg.registry import Registry`
          targets.add(mod)
          names.append((mod, a.name, node.lineno))
  return sorted(targets), aliases, names, tree


def _graph():
  modules = _modules()
  graph, info = {}, {}
  for name, path in modules.items():
    targets, aliases, names, tree = _imports(name, path, modules)
    graph[name] = [t for t in targets if t in modules and t != name]
    info[name] = (aliases, names, tree)
  return graph, info


def test_no_import_cycles():
  graph, _ = _graph()
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in graph[m]:
      if state.get(t) == 1:
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = 2

  for m in graph:
    if m not in state:
      visit(m)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__")
                                       and name.endswith("__"))


def _private_uses(path: Path, aliases: dict[str, str], names, tree,
                  own: str | None) -> list[str]:
  found = [f"{path.name}:{line}: from {mod} import {n}"
           for mod, n, line in names if _private(n) and mod != own]
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and _private(node.attr)
        and aliases[node.value.id] != own):
      found.append(f"{path.name}:{node.lineno}: "
                   f"{aliases[node.value.id]}.{node.attr}")
  return found


def test_no_private_names_across_modules():
  """Inside jaxreg/, and from tests/ and bench/ into jaxreg/."""
  modules = _modules()
  found = []
  _, info = _graph()
  for name, (aliases, names, tree) in info.items():
    found += _private_uses(modules[name], aliases, names, tree, own=name)
  for path in sorted((ROOT / "tests").glob("*.py")) + sorted(
      (ROOT / "bench").glob("*.py")):
    _, aliases, names, tree = _imports("tests." + path.stem, path, modules)
    found += _private_uses(path, aliases, names, tree, own=None)
  assert not found, "\n".join(found)


def test_modules_stay_readable():
  long = {name: n for name, path in _modules().items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_config_imports_no_jax():
  """Planning a sweep (configs, dry runs) never starts JAX."""
  code = ("import sys; from jaxreg import config, sweep; "
          "config.base_config(); "
          "sweep.run('configs/l1_l2.py:smoke', workdir='unused', "
          "dry_run=True, print_fn=lambda s: None); "
          "bad = sorted(m for m in ('jax', 'flax', 'optax', 'tensorflow') "
          "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("module", ["jaxreg.config", "jaxreg.registry"])
def test_bottom_layer_imports_nothing_above_it(module):
  graph, _ = _graph()
  assert set(graph[module]) <= {"jaxreg.registry"}, graph[module]
