"""Assembling a bundle's manifest around its graphs: the versions that made it, the pipeline
section that chains its parts, the support files copied from the checkpoint, and the file
records written last."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from onnxport.bundle.genai import KEY, write_genai_config
from onnxport.bundle.manifest import Manifest, record_files, write_manifest
from onnxport.bundle.report import write_report
from onnxport.checkpoint import Checkpoint

log = logging.getLogger(__name__)

PACKAGES = ("onnxport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    """The versions of `packages` (by default those that wrote a bundle; None when one is not
    installed)."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def complete_pipeline(pipelines: list, manifest: Manifest):
    """The manifest's pipeline section: of those recipes proposed whose graphs are all in the
    bundle, the one chaining the most graphs (Qwen2.5-Omni's any-to-any over its any-to-text),
    the first on a tie; None when parts it chains were not exported (`--part`)."""
    names = {g.name or g.file for g in manifest.graphs} | {g.file for g in manifest.graphs}
    for p in sorted((p for p in pipelines if p is not None), key=lambda p: -len(p.graphs)):
        missing = [g for g in p.graphs.values() if g not in names]
        if not missing:
            return p
        log.info("no %s pipeline in the manifest: graph(s) %s not exported", p.kind, ", ".join(missing))
    return None


def copy_support_files(ckpt: Checkpoint, folder: Path) -> list[str]:
    """config.json, tokenizer files and the feature extractor's settings, so the bundle is
    self-contained."""
    names = []
    extra = [f for f in [ckpt.path / "preprocessor_config.json"] if f.is_file()]
    for f in [ckpt.path / "config.json", *ckpt.tokenizer_files(), *extra]:
        shutil.copy2(f, folder / f.name)
        names.append(f.name)
    return names


def finish_bundle(ckpt: Checkpoint | None, folder: Path, manifest: Manifest, started: float | None) -> Manifest:
    """The last step of every command that writes a bundle: support files copied (from `ckpt`,
    when there is one), the time taken (since `started`; None keeps the source bundle's), other
    runtimes' configs written (genai_config.json, bundle/genai.py), the source's sha256 when
    not yet known (`Checkpoint.hash_in_background`), report.html / report.md
    (bundle/report.py), every file's size and sha256 recorded, the manifest written."""
    if ckpt is not None:
        manifest.source.files = copy_support_files(ckpt, folder)
        if not manifest.source.sha256:
            manifest.source.sha256 = ckpt.sha256()
    if started is not None:
        manifest.export.seconds = round(time.perf_counter() - started, 2)
    manifest.interop = {KEY: write_genai_config(folder, manifest)}
    write_report(folder, manifest)
    record_files(folder, manifest)
    write_manifest(folder, manifest)
    return manifest
