"""`onnxport verify`: every part of an exported bundle checked again against its source
checkpoint. The manifest is rewritten only when every part passes (a failing run leaves it as
it was)."""

from __future__ import annotations

from pathlib import Path

from onnxport.bundle import DECODER, Manifest, read_manifest, write_manifest
from onnxport.checkpoint import open_checkpoint
from onnxport.config import ExportConfig, SplitConfig, VerifyConfig
from onnxport.errors import CheckpointError, InputError, VerificationError


def source_checkpoint(manifest: Manifest, model_dir: str | Path | None, allow_pickle: bool):
    """The checkpoint a bundle came from (`model_dir` overrides the recorded path); refused when
    the recorded one changed since the export."""
    src = Path(model_dir) if model_dir else Path(manifest.source.path)
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    if model_dir is None and ckpt.sha256() != manifest.source.sha256:
        raise CheckpointError(f"the checkpoint at {src} changed since the export (sha256 differs)",
                              "pass --model with the checkpoint the bundle was exported from")
    return ckpt


def modules_summary(manifest: Manifest) -> dict | None:
    checked = [g for g in manifest.named_graphs() if g.verification is not None]
    if not checked:
        return None
    return {"ok": all(g.verification["ok"] for g in checked), "graphs": [g.name for g in checked]}


def verify_bundle(bundle: str | Path, model_dir: str | Path | None = None, vcfg: VerifyConfig = VerifyConfig(),
                  allow_pickle: bool = False) -> Manifest:
    """Re-run the verification of every part of `bundle` (and its pipeline's end-to-end check)."""
    from onnxport.export.load import LoadedModel, load_model
    from onnxport.recipes import get_recipes
    from onnxport.recipes.base import DecoderLM
    from onnxport.verify.decoder import verify_decoder_part
    from onnxport.verify.module import verify_part
    from onnxport.verify.pipeline import reverify_pipeline

    folder = Path(bundle)
    manifest = read_manifest(folder)
    if any(g.quantization for g in manifest.graphs):
        raise InputError("a quantized bundle is checked by its quality gate when it is written",
                         "verify the source bundle, or re-run onnxport quantize")
    if manifest.task == "module":
        raise InputError("export-module bundles are verified when they are written",
                         "re-run onnxport export-module to re-check against the checkpoint")
    ckpt = source_checkpoint(manifest, model_dir, allow_pickle)
    recipes = get_recipes(ckpt.model_type, None, ckpt.config)
    cfg = ExportConfig(opset=manifest.export.opset, exporter=manifest.export.exporter if manifest.export.exporter
                       in ("dynamo", "torchscript") else "auto",
                       kv_layout=manifest.kv_cache.layout if manifest.kv_cache else "bhsd",
                       kv_naming=manifest.kv_cache.naming if manifest.kv_cache else "optimum")
    split = SplitConfig(**manifest.layout.split_options()) if manifest.is_split else None
    vcfg = vcfg.for_dtype(manifest.export.dtype or "float32")
    pending = {g.name: g for g in manifest.named_graphs()}
    for name, recipe in recipes.items():
        if isinstance(recipe, DecoderLM) and manifest.kv_cache is not None:
            loaded = LoadedModel(recipe, load_model(recipe, ckpt))
            precision = manifest.graph(DECODER).precision if manifest.has_decoder and not split else None
            if precision and precision.get("compute") == "bfloat16":
                _verify_bf16_compute(loaded, folder, manifest, vcfg)
            else:
                verify_decoder_part(loaded, recipe.kv_spec(loaded.model), folder, manifest, cfg, vcfg, split)
        elif not isinstance(recipe, DecoderLM) and pending:
            loaded = LoadedModel(recipe, load_model(recipe, ckpt))
            for part in recipe.parts(loaded.model):
                g = pending.pop(part.name, None)
                if g is None:
                    continue
                session = None
                if g.chain:  # cut under --max-graph-size: the chain is what runs
                    from onnxport.runtime.segments import ChainSession

                    session = ChainSession(folder, g.chain, [t.name for t in g.inputs])
                g.verification = verify_part(part, folder / g.file, vcfg, session=session)
                p = manifest.part(g.part)
                if p is not None:
                    p.verification = {"ok": True, "graphs": [x.name for x in manifest.graphs_of(g.part)]}
            manifest.verification = modules_summary(manifest) if manifest.kv_cache is None else manifest.verification
        else:
            continue
        reverify_pipeline(recipe, loaded.model, folder, manifest)
        del loaded
    if pending:
        raise VerificationError(f"no recipe of {ckpt.model_type!r} makes the graph(s) {', '.join(pending)}",
                                "verify the bundle with the onnxport version that wrote it")
    try:
        write_manifest(folder, manifest)
    except OSError as e:  # a read-only bundle: the checks ran, the record stays as it was
        import errno
        import logging

        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        logging.getLogger(__name__).warning("%s is read-only: every check passed, the manifest's verification "
                                            "record was not updated", folder)
    return manifest


def _verify_bf16_compute(loaded, folder: Path, manifest: Manifest, vcfg: VerifyConfig) -> dict:
    """A bf16-compute decoder, checked on its CPU emulation twin (written beside the graph,
    removed after)."""
    from onnxport.verify.decoder import DecoderCheck
    from onnxport.verify.emulate import emulate_bf16

    graph = manifest.graph(DECODER)
    twin = folder / f".{Path(graph.file).stem}.emulated.onnx"
    try:
        emulate_bf16(folder / graph.file, twin)
        check = DecoderCheck(loaded, loaded.recipe.kv_spec(loaded.model), manifest, vcfg).tolerance("bfloat16-compute")
        ok, msg, record = check(twin, graph)
    finally:
        twin.unlink(missing_ok=True)
    manifest.verification = manifest.part(DECODER).verification = {**record, "checked_on": "CPU emulation"}
    if not ok:
        raise VerificationError(f"verification failed: {msg}", "the bf16-compute graph drifts; re-export it")
    return record

