"""Tasks: the torch-free runners of bundles, one per task, chosen from the manifest.

A bundle whose manifest has a `pipeline` section runs the task of that kind (`speech-to-text`:
audio encoder -> cross k/v -> decoder loop; `image-text-to-text`, `any-to-text`,
`any-to-any`, `text-to-speech`); a text decoder without one runs `text-generation`. A task is
a class taking `(bundle, threads=None)`, registered for its kind with `@register_task(kind)`
in a module of this package (every module here is imported on first lookup, so a new kind is
one new file). Besides its own Python API (`generate(...)`), each implements the contract the
CLI uses: `run(request: Request, on_text=None) -> Reply` (tasks/request.py), checking that the
request fits it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from onnxport.bundle import read_manifest
from onnxport.errors import BundleError
from onnxport.runtime.tasks.request import OnText, Reply, Request, Sampling

_RUNNERS: dict[str, type] = {}
_LOADED = False
#: the task of a text decoder bundle without a pipeline section
TEXT_GENERATION = "text-generation"


def register_task(kind: str):
    """Register a runner class for the task (manifest pipeline kind) `kind`."""

    def deco(cls: type) -> type:
        if kind in _RUNNERS and _RUNNERS[kind] is not cls:
            raise ValueError(f"task {kind!r} registered twice ({_RUNNERS[kind].__name__}, {cls.__name__})")
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


def task_kinds() -> list[str]:
    """The tasks this onnxport runs."""
    _load_all()
    return sorted(_RUNNERS)


def task_kind(bundle: str | Path) -> str:
    """The task the bundle's manifest asks for (BundleError when it asks for none)."""
    manifest = read_manifest(bundle)
    if manifest.pipeline is not None:
        return manifest.pipeline.kind
    if manifest.kv_cache is not None:
        return TEXT_GENERATION
    raise BundleError(f"{bundle} has no pipeline section (its parts: "
                      f"{', '.join(p.name for p in manifest.parts) or 'none'})",
                      "export every part of a checkpoint whose parts chain (e.g. whisper: audio + decoder) "
                      "with onnxport export, without --part")


def open_task(bundle: str | Path, threads: int | None = None):
    """The runner of the bundle's task (e.g. `SpeechToText` for speech-to-text, `TextGeneration`
    for a text decoder)."""
    kind = task_kind(bundle)
    _load_all()
    cls = _RUNNERS.get(kind)
    if cls is None:
        raise BundleError(f"the bundle's task {kind!r} is not one this onnxport runs "
                          f"({', '.join(sorted(_RUNNERS)) or 'none'})",
                          "upgrade onnxport to the version that wrote the bundle")
    return cls(bundle, threads=threads)


__all__ = ["OnText", "Reply", "Request", "Sampling", "TEXT_GENERATION", "open_task", "register_task", "task_kind",
           "task_kinds"]
