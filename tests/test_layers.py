"""The package's layering, read from the source with ``ast`` (nothing is imported):

* ``moelab.moe`` (the library: layer, routers, experts, losses) imports nothing seed-specific and nothing above it:
  not the seed layer (``moelab.reproductions``), the models, the experiment families, the benchmarks, the CLI;
* only the experiment families and the benchmarks import the seed layer (the rest of the package is library);
* ``moelab.bench`` imports nothing from ``moelab.experiments`` (the CLI hands the benchmarks the families'
  networks, :mod:`moelab.experiments.bench_models`);
* each experiment family is a package of ``moelab.experiments`` that imports no other family's package; the modules
  beside them (shared: ``digits``, ``cifar``, ``baselines``, ...) import no family package, except
  ``bench_models`` (which builds the families' networks for the benchmarks); outside ``moelab.experiments`` only
  the CLI imports a family package (``moelab gradcheck``);
* there is no import cycle among moelab's modules, counting every import (a function's deferred import too: a
  cycle hidden in a function is still two modules that need each other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "moelab"

#: what the library (moelab.moe) must not import
ABOVE_THE_LIBRARY = ("moelab.reproductions", "moelab.models", "moelab.experiments", "moelab.bench", "moelab.study",
                     "moelab.cli", "moelab.analysis", "moelab.train")
#: the packages that may import the seed layer (besides itself)
SEED_LAYER_USERS = ("moelab.experiments", "moelab.bench")


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _nearest(name: str) -> str | None:
    """The moelab module (or package) ``name`` refers to: itself, or its longest prefix that is one."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.stmt) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" or \
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"


def _top_level(body: list[ast.stmt]):
    """The statements that run when the module is imported: its body, into top-level if / try / with blocks
    (not ``if TYPE_CHECKING:``, which never runs), not into functions or classes."""
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _top_level(block)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)
        else:
            yield node


def _imports(module: str, top_level_only: bool) -> set[str]:
    """The moelab modules ``module`` imports (``from pkg import submodule`` counts as the submodule; parent
    packages a dotted import initialises on the way are not counted: Python runs them first, whatever the order)."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    here = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {_nearest(a.name) for a in node.names if _within(a.name, "moelab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if _within(base, "moelab"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _nearest(base) for a in node.names}
    found.discard(None)
    found.discard(module)
    return found


def _offenders(modules, forbidden) -> dict[str, list[str]]:
    out = {}
    for m in modules:
        bad = sorted(i for i in _imports(m, top_level_only=False) if any(_within(i, f) for f in forbidden))
        if bad:
            out[m] = bad
    return out


def test_the_tree_is_where_the_test_looks():
    assert {"moelab.moe.layer", "moelab.reproductions.gating", "moelab.bench.cnn"} <= set(MODULES)


def test_the_library_imports_nothing_seed_specific():
    """moelab.moe holds the generic layer, routers, experts and losses; the seed's pieces live above it."""
    library = [m for m in MODULES if _within(m, "moelab.moe")]
    assert _offenders(library, ABOVE_THE_LIBRARY) == {}, \
        "moelab.moe must not import the seed layer or anything above the library"


def test_only_the_experiments_and_benchmarks_import_the_seed_layer():
    others = [m for m in MODULES if not any(_within(m, p) for p in ("moelab.reproductions", *SEED_LAYER_USERS))]
    assert _offenders(others, ("moelab.reproductions",)) == {}
    assert _offenders(["moelab"], ("moelab.reproductions", "moelab.models")) == {}  # `import moelab`: the library


def test_bench_imports_no_experiment_family():
    bench = [m for m in MODULES if _within(m, "moelab.bench")]
    assert len(bench) > 5 and _offenders(bench, ("moelab.experiments",)) == {}


#: the packages of moelab.experiments: one per experiment family
FAMILY_PACKAGES = sorted(m for m, (_, is_pkg) in MODULES.items() if is_pkg and m.count(".") == 2
                         and m.startswith("moelab.experiments."))
#: the modules of moelab.experiments that are no family's: what the families share
SHARED = sorted(m for m in MODULES if m.startswith("moelab.experiments.") and m.count(".") == 2
                and m not in FAMILY_PACKAGES)
#: who may import a family package besides the family itself
FAMILY_USERS = ("moelab.experiments.bench_models", "moelab.cli")


def test_every_family_is_a_package():
    assert FAMILY_PACKAGES == [f"moelab.experiments.{f}" for f in ("cifar_experts", "cifar_moe", "jacobs", "sparse_mlp")]
    assert {"moelab.experiments.digits", "moelab.experiments.cifar", "moelab.experiments.runner"} <= set(SHARED)


def test_no_family_imports_another_family():
    for fam in FAMILY_PACKAGES:
        own = [m for m in MODULES if _within(m, fam)]
        others = tuple(f for f in FAMILY_PACKAGES if f != fam)
        assert _offenders(own, others) == {}, f"{fam} imports another family's package"


def test_only_the_cli_and_the_bench_models_import_a_family():
    outside = [m for m in MODULES if not any(_within(m, f) for f in (*FAMILY_PACKAGES, *FAMILY_USERS))]
    assert "moelab.experiments.digits" in outside and "moelab.experiments" in outside
    assert _offenders(outside, tuple(FAMILY_PACKAGES)) == {}, \
        "shared modules (and the rest of moelab) must not import an experiment family's package"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycle():
    graph = {m: _imports(m, top_level_only=False) for m in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_reports_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("snippet,want", [
    ("from moelab.moe import losses", {"moelab.moe.losses"}),
    ("from moelab.moe import MoE", {"moelab.moe"}),
    ("import moelab.moe.layer", {"moelab.moe.layer"}),
    ("def f():\n    from moelab.experiments import cifar_moe", set()),  # not at import time
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moelab.cli import main", set()),
    ("try:\n    from moelab.cli import main\nexcept ImportError:\n    pass", {"moelab.cli"}),
])
def test_top_level_imports_are_read_like_python_runs_them(snippet, want, tmp_path, monkeypatch):
    path = tmp_path / "probe.py"
    path.write_text(snippet)
    monkeypatch.setitem(MODULES, "moelab.probe", (path, False))
    assert _imports("moelab.probe", top_level_only=True) == want
