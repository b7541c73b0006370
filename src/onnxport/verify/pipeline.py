"""End-to-end checks of a chained pipeline (Whisper's three graphs, a VL model's vision tower and
decoder, a TTS talker and vocoder): the recipe that proposes a pipeline runs the bundle as the
runtime will and compares with transformers (`recipe.verify_pipeline(model, pipeline, folder,
manifest)` returns the record or raises VerificationError)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from onnxport.bundle import Manifest, write_manifest


def check_pipeline(recipe, model, pipeline, folder: Path, manifest: Manifest, complete: Callable,
                   copy_support_files: Callable[[], object]):
    """At export, while the recipe's model is loaded and once every graph the pipeline chains
    is in the bundle (`complete([pipeline], manifest)`): the support files (tokenizer) are
    copied first and the manifest names this pipeline while it is checked, so the runner reads
    the bundle as it will be. The record goes to `pipeline.verification`."""
    hook = getattr(recipe, "verify_pipeline", None)
    if pipeline is None or not callable(hook) or complete([pipeline], manifest) is None:
        return pipeline
    copy_support_files()
    previous, manifest.pipeline = manifest.pipeline, pipeline
    write_manifest(folder, manifest)
    try:
        pipeline.verification = hook(model, pipeline, folder, manifest)
    finally:
        manifest.pipeline = previous
    return pipeline


def reverify_pipeline(recipe, model, folder: Path, manifest: Manifest) -> None:
    """`onnxport verify`: the chained pipeline's end-to-end check again, by the recipe that
    proposed it (its model is loaded now)."""
    hook = getattr(recipe, "verify_pipeline", None)
    propose = getattr(recipe, "pipeline", None)
    if manifest.pipeline is None or not callable(hook) or not callable(propose):
        return
    proposed = propose(model, manifest.graphs)
    if proposed is None or proposed.kind != manifest.pipeline.kind:
        return
    manifest.pipeline.verification = hook(model, manifest.pipeline, folder, manifest)
