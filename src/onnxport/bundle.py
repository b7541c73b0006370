"""The output folder: manifest.json schema, atomic write, paths.

A bundle is a folder that a runtime can use without the Python model:

    OUT/manifest.json      what the graphs are and how to drive them (this module's schema)
    OUT/model.onnx         the graph (+ model.onnx.data when the weights are large)
    OUT/config.json, tokenizer files, generation_config.json   copied from the checkpoint

The manifest describes a pipeline of graphs (`graphs`, each with a role and its I/O), so split
layouts and multimodal pipelines are more entries, not a new format. This module never imports
torch: the runtime reads manifests too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from onnxport.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(bundle: str | Path) -> dict:
    p = Path(bundle)
    if not p.is_dir():
        raise BundleError(
            f"bundle folder {str(p)!r} does not exist", "export one first: onnxport export MODEL_DIR -o OUT"
        )
    mf = p / MANIFEST
    if not mf.is_file():
        raise BundleError(
            f"{str(p)!r} has no {MANIFEST}; it is not an onnxport bundle",
            "pass the folder written by `onnxport export`",
        )
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf} is not valid JSON ({e})", "re-run onnxport export") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{mf} has schema_version {version!r}; this onnxport reads {SCHEMA_VERSION}",
            "re-export the bundle with this onnxport version",
        )
    for g in manifest.get("graphs", []):
        if not (p / g["file"]).is_file():
            raise BundleError(f"bundle is missing {g['file']}", "re-run onnxport export")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest = {"schema_version": SCHEMA_VERSION, **manifest}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)


def graph_entry(manifest: dict, role: str) -> dict:
    for g in manifest.get("graphs", []):
        if g["role"] == role:
            return g
    raise BundleError(
        f"bundle has no graph with role {role!r} (it has {[g['role'] for g in manifest.get('graphs', [])]})",
        "re-export the model with a layout that includes it",
    )


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise BundleError(f"output {str(out)!r} already exists", "pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise BundleError(f"output {str(out)!r} exists and is not a folder", "choose another -o")


@contextlib.contextmanager
def atomic_bundle(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on any error it vanishes.

    An interrupted or failed export therefore leaves nothing at `out` (and a pre-existing `out`
    untouched unless the export succeeded with --force)."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
