"""Helpers for `applies`: which Python modules / classes a model's code lives in."""

from __future__ import annotations

import inspect
import re
import sys


def code_modules(module) -> list:
    """The Python modules defining the classes of `module` and all its submodules."""
    seen, out = set(), []
    for m in module.modules():
        name = type(m).__module__
        if name not in seen and name in sys.modules:
            seen.add(name)
            out.append(sys.modules[name])
    return out


def globals_bound_to(module, obj) -> list[tuple[object, str]]:
    """(python module, global name) pairs in the model's code that hold `obj`."""
    return [(mod, k) for mod in code_modules(module) for k, v in list(vars(mod).items()) if v is obj]


def source_matches(module, pattern: str) -> bool:
    rx = re.compile(pattern)
    for cls in {type(m) for m in module.modules()}:
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if rx.search(src):
            return True
    return False


def swap_everywhere(original, replacement):
    """Context manager: rebind every loaded module's global that holds `original` (the function's
    home module included, and `from x import f` copies) to `replacement`; restore on exit."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        holders = [(mod, k) for mod in list(sys.modules.values()) if mod is not None
                   for k, v in list(getattr(mod, "__dict__", {}).items()) if v is original]
        for mod, k in holders:
            setattr(mod, k, replacement)
        try:
            yield
        finally:
            for mod, k in holders:
                setattr(mod, k, original)

    return cm()


def swap_attributes(swaps):
    """Context manager: set each `(namespace, name, replacement)` (e.g. `(torch, "istft", f)`),
    restore the originals on exit, also on error."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        originals = [(ns, name, getattr(ns, name)) for ns, name, _ in swaps]
        for ns, name, fn in swaps:
            setattr(ns, name, fn)
        try:
            yield
        finally:
            for ns, name, fn in originals:
                setattr(ns, name, fn)

    return cm()
