"""Export-compat rewrites: each file is one rewrite that swaps an op the exporters reject for
an equivalent they accept, only while exporting, and always restores the original.

A rewrite says what it matches (`applies`), for which exporters, and HOW (`patched`, a context
manager). `apply_patches(module, exporter)` enters every applicable rewrite and yields their
names, which the manifest records. Add a rewrite by adding one file with `@register_patch`.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import ClassVar, Iterator


class Patch:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: exporters this rewrite is needed for
    exporters: ClassVar[tuple[str, ...]] = ("dynamo", "torchscript")

    def applies(self, module) -> bool:
        raise NotImplementedError

    def patched(self, module=None):
        """Context manager: swap the op in for `module`'s export, restore the original on exit (also
        on error)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Patch]] = {}
_LOADED = False


def register_patch(cls: type[Patch]) -> type[Patch]:
    if cls.name in _REGISTRY:
        raise ValueError(f"patch {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def all_patches() -> dict[str, type[Patch]]:
    global _LOADED
    if not _LOADED:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items()))


@contextlib.contextmanager
def apply_patches(module, exporter: str, skip: tuple[str, ...] = ()) -> Iterator[list[str]]:
    applied: list[str] = []
    with contextlib.ExitStack() as stack:
        for name, cls in all_patches().items():
            patch = cls()
            if name not in skip and exporter in patch.exporters and patch.applies(module):
                stack.enter_context(patch.patched(module))
                applied.append(name)
        yield applied


__all__ = ["Patch", "all_patches", "apply_patches", "register_patch"]
