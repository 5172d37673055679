"""The package's layering, read from its import graph (imports inside functions included): no
cycle, no library module imports a command, the record format depends on nothing else in the
package, and the models depend only on the format layer."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmsr_jax")


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
  if name == "mmsr_jax.cli" or name.startswith("mmsr_jax.benches."):
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


def test_the_format_layer_and_the_models_stand_alone(graph):
  _, edges = graph
  formats = {m: e for m, e in edges.items() if m.startswith("mmsr_jax.formats.")}
  assert formats and all(not e for e in formats.values()), formats
  allowed = ("mmsr_jax.models.", "mmsr_jax.formats.")
  models = {m: sorted(d for d in e if not d.startswith(allowed))
            for m, e in edges.items() if m.startswith("mmsr_jax.models.")}
  assert models and all(not d for d in models.values()), models
