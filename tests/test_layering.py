"""The import graph of src/onnxport (function-level imports included): no module imports one of
a higher layer, no cycle among packages, no cycle at import time. The layers, bottom to top, as
docs/architecture.md draws them."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "onnxport"
LAYERS = [("errors", "spec", "config", "progress", "testing"), ("checkpoint", "bundle"), ("runtime",), ("serve",), ("hf",),
          ("recipes", "patches"), ("export",), ("verify",), ("optimize",), ("targets",), ("report",), ("api",), ("cli",),
          ("__init__",)]


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(mod: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if _top(mod) in names)


def _edges():
    mods = _modules()
    every, at_import = collections.defaultdict(set), collections.defaultdict(set)
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                names = subs if len(subs) == len(node.names) else [node.module, *subs]
            else:
                continue
            for name in names:
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != mod and name.startswith("onnxport"):
                    every[mod].add(name)
                    if node in tree.body:
                        at_import[mod].add(name)
    return every, at_import


def _cycles(graph: dict) -> list[list[str]]:
    found, seen = [], set()

    def visit(v, stack):
        seen.add(v)
        stack.append(v)
        for w in graph.get(v, ()):
            if w in stack:
                found.append(stack[stack.index(w):] + [w])
            elif w not in seen:
                visit(w, stack)
        stack.pop()

    for v in list(graph):
        if v not in seen:
            visit(v, [])
    return found


def test_no_module_imports_a_higher_layer():
    every, _ = _edges()
    upward = sorted(f"{a} -> {b}" for a, bs in every.items() for b in bs if _layer(b) > _layer(a))
    assert upward == []


def test_no_cycles_between_packages_or_at_import_time():
    every, at_import = _edges()
    packages = collections.defaultdict(set)
    for a, bs in every.items():
        packages[_top(a)].update(_top(b) for b in bs if _top(b) != _top(a))
    assert _cycles(packages) == []
    assert _cycles(at_import) == []


def test_the_layer_table_covers_every_package():
    tops = {_top(m) for m in _modules()}
    assert tops <= {name for names in LAYERS for name in names}, tops
