"""The package's layering, read from its import graph (imports inside functions included): every
module stands on a floor (``FLOORS``, folder by folder) and imports only from its own floor or
lower ones, so there is no cycle; no library module imports a command; the formats depend on
nothing else in the package, the models only on the formats and the schema; and a config file
imports nothing heavier than the config schema (no JAX, Flax, OpenCV or PyTorch).
docs/internals.md explains the order."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mmsr_jax")
SCHEMA = "mmsr_jax.schema"  # the config schema: what a config file may import

# Folder (or top-level module) of the package -> its floor; a module may import only from its own
# floor or below. Commands (``python -m mmsr_jax.<name>``, the benches) stand on the top floor.
FLOORS = {
    # 1. What is written down: the on-disk formats and the config schema (pure Python; it holds
    #    the option lists that the floors above implement).
    "mmsr_jax.formats": 1, SCHEMA: 1,
    # 2. Parts that know nothing of each other: input data, Flax modules, device runtime (mesh,
    #    sharding, checkpoints, the train state and optimizer), the metrics.
    "mmsr_jax.data": 2, "mmsr_jax.models": 2, "mmsr_jax.runtime": 2, "mmsr_jax.evaluation": 2,
    # 3. What combines models: the sampler and schedules; parameter files and weight importers.
    "mmsr_jax.diffusion": 3, "mmsr_jax.weights": 3,
    # 4. One builder per task: a config in, the assembled system out.
    "mmsr_jax.system": 4, "mmsr_jax.vq_system": 4,
    # 5. What runs a system: the training tasks and loop, the super-resolver and its uses.
    "mmsr_jax.training": 5, "mmsr_jax.inference": 5,
    # 6. Programs compiled ahead of time and the shared command-line plumbing.
    "mmsr_jax.programs": 6, "mmsr_jax.cli": 6,
}
COMMANDS = 7


def _modules() -> dict[str, str]:
  out = {}
  base = os.path.dirname(PACKAGE)
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package modules ``name`` imports anywhere in its body (deferred imports too)."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      if node.level:
        parts = package.split(".")
        mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
      names = [mod] + [f"{mod}.{a.name}" for a in node.names]
    else:
      continue
    for n in names:
      while n and n not in modules:
        n = n.rpartition(".")[0]
      if n and n != name and not modules[n].endswith("__init__.py"):
        found.add(n)
  return found


def _is_command(name: str, path: str) -> bool:
  if name == "mmsr_jax.cli" or (name + ".").startswith("mmsr_jax.benches."):
    return True
  return 'if __name__ == "__main__":' in open(path).read()


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in edges:
    if v not in index:
      visit(v)
  return out


def test_the_import_graph_has_no_cycle(graph):
  modules, edges = graph
  assert len(modules) > 50 and sum(map(len, edges.values())) > 150  # the graph was read
  assert _cycles(edges) == []


def test_the_cycle_finder_sees_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_library_module_imports_a_command(graph):
  modules, edges = graph
  commands = {m for m, p in modules.items() if _is_command(m, p)}
  assert {"mmsr_jax.train", "mmsr_jax.sample", "mmsr_jax.precompute", "mmsr_jax.cli"} <= commands
  bad = {m: sorted(edges[m] & commands) for m in modules if m not in commands and edges[m] & commands}
  assert bad == {}


def _floor(name: str, path: str) -> int | None:
  if name == "mmsr_jax":
    return 1  # the package's face: its version, nothing imported
  if _is_command(name, path) and name != "mmsr_jax.cli":
    return COMMANDS
  for prefix, floor in FLOORS.items():
    if name == prefix or name.startswith(prefix + "."):
      return floor
  return None


def _upward(modules: dict[str, str], edges: dict[str, set[str]]) -> list[str]:
  floor = {m: _floor(m, p) for m, p in modules.items()}
  return sorted(f"{m} (floor {floor[m]}) -> {d} (floor {floor[d]})"
                for m in modules for d in edges[m] if floor[d] > floor[m])


def test_every_module_stands_on_a_floor(graph):
  modules, _ = graph
  assert {m for m, p in modules.items() if _floor(m, p) is None} == set()


def test_every_import_points_down(graph):
  modules, edges = graph
  assert _upward(modules, edges) == []


def test_an_upward_import_is_seen(graph):
  modules, edges = graph
  edges = {**edges, "mmsr_jax.formats.records": {"mmsr_jax.system"}}
  arrow = "mmsr_jax.formats.records (floor 1) -> mmsr_jax.system (floor 4)"
  assert arrow in _upward(modules, edges)


def _config_modules() -> list[str]:
  configs = sorted("configs." + f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".py") and f != "__init__.py")
  schema = sorted(m for m in _modules() if m.startswith(SCHEMA + "."))
  return configs + schema


HEAVY = ("jax", "flax", "cv2", "torch", "optax", "orbax", "grain", "tensorflow")


@pytest.mark.parametrize("module", _config_modules())
def test_a_config_imports_nothing_heavy(module):
  code = (f"import sys, importlib; importlib.import_module({module!r}); "
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONPATH": ROOT})
  assert out.stdout.strip() == "[]", (module, out.stdout)


def test_the_format_layer_and_the_models_stand_alone(graph):
  _, edges = graph
  formats = {m: sorted(d for d in e if not d.startswith("mmsr_jax.formats."))
             for m, e in edges.items() if m.startswith("mmsr_jax.formats.")}
  assert formats and all(not d for d in formats.values()), formats
  allowed = ("mmsr_jax.models.", "mmsr_jax.formats.", SCHEMA + ".")
  models = {m: sorted(d for d in e if not d.startswith(allowed))
            for m, e in edges.items() if m.startswith("mmsr_jax.models.")}
  assert models and all(not d for d in models.values()), models
