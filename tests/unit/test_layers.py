"""The package's shape, read from its source with ast: imports go one way, without a
cycle, and no function is long."""

from __future__ import annotations

import ast
import os

import pytest

import gpusnap

ROOT = os.path.dirname(gpusnap.__file__)
TOP = ("cli", "daemon", "engine", "entry", "__main__")   # the front doors and the engine; all else is below
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, tuple[str, ast.Module]]:
    """Dotted module name -> (file, its parsed source), for every .py under gpusnap/."""
    out = {}
    for root, _dirs, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel.pop()
                with open(path) as f:
                    out[".".join(rel)] = (path, ast.parse(f.read(), path))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if not MODULES[module][0].endswith("__init__.py"):
        package.pop()
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """The gpusnap modules that module imports (anywhere in it, lazy imports included):
    `from . import x` names the module x where there is one, else the package."""
    out = set()
    for node in ast.walk(MODULES[module][1]):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] == "gpusnap")
    return out


GRAPH = {m: {i for i in _imports(m) if i in MODULES and i != m} for m in MODULES}


def test_the_graph_is_read():
    assert "gpusnap.engine.dump" in GRAPH["gpusnap.cli.cmd_dump"]
    assert "gpusnap.store.repository" in GRAPH["gpusnap.engine.dump"] or \
        "gpusnap.store" in GRAPH["gpusnap.engine.dump"]


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


BELOW_ENGINE = sorted({_layer(m) for m in MODULES} - set(TOP) - {""})


def test_the_layers_below_the_engine_are_all_there():
    assert {"criu", "cuda", "store", "targets", "imagefile", "model", "sdk", "remap",
            "sysrun", "interrupts", "errors", "paths"} <= set(BELOW_ENGINE)


@pytest.mark.parametrize("layer", BELOW_ENGINE)
def test_nothing_below_the_engine_imports_engine_or_cli(layer):
    wrong = sorted(f"{m} imports {i}" for m in GRAPH if _layer(m) == layer
                   for i in GRAPH[m] if _layer(i) in ("engine", "cli"))
    assert not wrong, wrong


def test_no_import_cycle():
    """Packages count as the modules they are (gpusnap.store is its __init__)."""
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for i in sorted(GRAPH[m]):
            visit(i, path + [m])
        done.add(m)

    for m in sorted(GRAPH):
        visit(m, [])


def test_functions_are_short():
    long = sorted((node.end_lineno - node.lineno + 1, f"{os.path.relpath(path, ROOT)}:"
                   f"{node.lineno} {node.name}")
                  for path, tree in MODULES.values() for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.end_lineno - node.lineno + 1 >= MAX_FUNCTION_LINES)
    assert not long, long
