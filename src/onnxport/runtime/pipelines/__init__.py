"""Pipelines: torch-free runners that chain a bundle's graphs as its manifest's `pipeline`
section says (`speech-to-text`: audio encoder -> cross k/v -> decoder loop, ...).

A runner is a class taking `(bundle, threads=None)`, registered for its kind with
`@register_pipeline(kind)` in a module of this package; every module here is imported on first
lookup, so a new kind is one new file. `open_pipeline(bundle)` returns the runner the bundle
asks for.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from onnxport.bundle import read_manifest
from onnxport.errors import BundleError

_RUNNERS: dict[str, type] = {}
_LOADED = False


def register_pipeline(kind: str):
    """Register a runner class for the manifest pipeline kind `kind`."""

    def deco(cls: type) -> type:
        if kind in _RUNNERS and _RUNNERS[kind] is not cls:
            raise ValueError(f"pipeline kind {kind!r} registered twice ({_RUNNERS[kind].__name__}, {cls.__name__})")
        _RUNNERS[kind] = cls
        cls.kind = kind
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _LOADED = True


def pipeline_kinds() -> list[str]:
    """The pipeline kinds this onnxport runs."""
    _load_all()
    return sorted(_RUNNERS)


def open_pipeline(bundle: str | Path, threads: int | None = None):
    """The runner for the bundle's pipeline section (e.g. `SpeechToText` for speech-to-text)."""
    manifest = read_manifest(bundle)
    if manifest.pipeline is None:
        raise BundleError(f"{bundle} has no pipeline section (its parts: "
                          f"{', '.join(p.name for p in manifest.parts) or 'none'})",
                          "export every part of a checkpoint whose parts chain (e.g. whisper: audio + decoder) "
                          "with onnxport export, without --part")
    _load_all()
    cls = _RUNNERS.get(manifest.pipeline.kind)
    if cls is None:
        raise BundleError(f"the bundle's pipeline kind {manifest.pipeline.kind!r} is not one this onnxport runs "
                          f"({', '.join(sorted(_RUNNERS)) or 'none'})",
                          "upgrade onnxport to the version that wrote the bundle")
    return cls(bundle, threads=threads)


__all__ = ["open_pipeline", "pipeline_kinds", "register_pipeline"]
