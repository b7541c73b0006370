"""The public Python API: export, export_encoder, export_module, verify, optimize, quantize.

`export` reads like the pipeline. It plans the parts of a checkpoint (recipes/plan.py), then
runs each part through the stages, each a call into the room that owns it and each taking the
previous stage's value:

    load (export/load.py) -> export (export/part.py) -> verify (verify/) ->
    optimize: fusions, precision, logits_to_keep (optimize/stage.py) -> write (bundle/)

Verification comes before the optimize passes: the fp32 graph is the baseline every pass's
candidate is checked against (optimize/passes.Verified). The other commands are the same
stages on an existing bundle. Everything heavy is imported lazily: `import onnxport` needs only
onnxruntime and numpy.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from onnxport.bundle import DECODER, MODULES, Manifest, atomic_bundle, write_manifest
from onnxport.bundle.assemble import complete_pipeline, copy_support_files, finish_bundle, versions
from onnxport.checkpoint import open_checkpoint
from onnxport.config import ExportConfig, QuantConfig, SplitConfig, VerifyConfig
from onnxport.errors import InputError

__all__ = ["export", "export_encoder", "export_module", "optimize", "quantize", "verify", "versions"]


def export(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(),
           verify_cfg: VerifyConfig = VerifyConfig(), split: SplitConfig | None = None,
           parts: tuple[str, ...] | None = None) -> Manifest:
    """Export every part of a local checkpoint (or `parts`) to a verified bundle at `out`.
    `split=None` writes a text decoder as one graph; a SplitConfig writes the NPU split layout."""
    from onnxport.export.load import ModelCache
    from onnxport.recipes.plan import new_manifest, plan_export

    started = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    plan = plan_export(ckpt, parts, split, cfg)
    ckpt.hash_in_background()
    with atomic_bundle(out, cfg.force, inputs=(ckpt.path,)) as folder:
        manifest = new_manifest(ckpt, plan, cfg, versions())
        models = ModelCache()
        pipelines = []  # what recipes say about chaining the parts at run time
        for name, recipe in plan.recipes.items():
            with _phase(manifest, "load"):
                loaded = models.load(name, recipe, ckpt, cfg, plan.split)
            if loaded.is_decoder:
                _decoder_stages(loaded, ckpt, cfg, verify_cfg, plan.split, folder, manifest)
            else:
                _module_stages(name, loaded, cfg, verify_cfg, folder, manifest)
            pipelines.append(_part_files_and_pipeline(loaded, ckpt, cfg, folder, manifest))
            del loaded
        models.clear()
        manifest.pipeline = complete_pipeline(pipelines, manifest)
        finish_bundle(ckpt, folder, manifest, started)
    return manifest


def _decoder_stages(loaded, ckpt, cfg: ExportConfig, vcfg: VerifyConfig, split: SplitConfig | None, folder: Path,
                    manifest: Manifest) -> None:
    """A text decoder: export -> verify (fp32) -> fusions -> precision (verified again) ->
    logits_to_keep."""
    from onnxport.export.part import export_decoder_part
    from onnxport.optimize.precision import ValueRanges
    from onnxport.verify.decoder import DecoderCheck, verify_decoder_part

    with _phase(manifest, "export"):
        exported = export_decoder_part(loaded, ckpt, cfg, split, folder, manifest)
    write_manifest(folder, manifest)  # the split runtime reads it during verification
    # the fp16 guard reads every value's range: the fp32 verification run records them
    ranges = ValueRanges() if cfg.dtype == "float16" and cfg.verify and not cfg.optimize else None
    if cfg.verify:
        if loaded.buffers is not None:  # --low-memory: the reference reads each module's weights as it runs
            from onnxport.export.stream import streamed_reference

            streamed_reference(loaded.model, ckpt, loaded.buffers, _torch_dtype(cfg.trace_dtype))
            loaded.streamed = True
        with _phase(manifest, "verify"):
            verify_decoder_part(loaded, exported.kv, folder, manifest, cfg, vcfg, exported.split,
                                observe=ranges.note if ranges is not None else None)
    checker = DecoderCheck(loaded, exported.kv, manifest, vcfg) if cfg.verify and exported.split is None else None
    with _phase(manifest, "optimize"):
        _optimize_decoder(loaded, exported, checker, ranges, cfg, vcfg, folder, manifest)


def _optimize_decoder(loaded, exported, checker, ranges, cfg: ExportConfig, vcfg: VerifyConfig, folder: Path,
                      manifest: Manifest) -> None:
    """Fusions (--optimize) -> precision (verified again) -> logits_to_keep."""
    from onnxport.export.part import SHARED_WEIGHTS
    from onnxport.optimize.stage import (
        add_logits_to_keep,
        convert_decoder,
        convert_split,
        run_fusions,
    )

    if cfg.optimize:
        run_fusions(folder, manifest, checker, cfg.external_data_threshold_bytes)
    if cfg.dtype != "float32" and exported.split is not None:
        convert_split(folder, manifest, exported.split, cfg, vcfg, SHARED_WEIGHTS)
        if cfg.verify:
            from onnxport.verify.split import verify_converted_split

            verify_converted_split(loaded, folder, manifest, exported.split, cfg, vcfg)
    elif cfg.dtype != "float32":
        convert_decoder(folder, manifest, cfg, vcfg, checker, ranges.max if ranges is not None else None)
    if exported.split is None:
        add_logits_to_keep(folder, manifest)


@contextmanager
def _phase(manifest: Manifest, name: str):
    """Add the seconds of the block to manifest.export.phases[name]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases = manifest.export.phases if manifest.export.phases is not None else {}
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - t0, 2)
        manifest.export.phases = phases


def _module_stages(name: str, loaded, cfg: ExportConfig, vcfg: VerifyConfig, folder: Path, manifest: Manifest) -> None:
    """An encoder-like part: export (each graph verified as it is written, falling back to the
    next exporter when one fails) -> precision and cutting (each verified again) -> manifest."""
    from onnxport.export.part import add_module_part, export_module_part
    from onnxport.optimize.stage import optimize_module_part
    from onnxport.verify.bundle import modules_summary
    from onnxport.verify.module import part_check

    check = part_check(vcfg, cfg.skip_patches) if cfg.verify else None
    exported = export_module_part(name, loaded, cfg, folder, check)
    optimize_module_part(exported, folder, cfg, vcfg)
    add_module_part(exported, loaded.recipe, manifest, cfg.verify)
    if manifest.layout.kind == MODULES:
        manifest.verification = modules_summary(manifest)


def _part_files_and_pipeline(loaded, ckpt, cfg: ExportConfig, folder: Path, manifest: Manifest):
    """Files a part adds beside its graphs (Qwen2.5-Omni's speakers, rewritten from a
    tensors-only pickle as safetensors), and the pipeline it proposes, checked end to end
    while its model is loaded once every graph it chains is in the bundle."""
    from onnxport.verify.pipeline import check_pipeline

    recipe = loaded.recipe
    if callable(getattr(recipe, "write_files", None)):
        recipe.write_files(loaded.model, ckpt, folder)
    if not callable(getattr(recipe, "pipeline", None)):
        return None
    pipeline = recipe.pipeline(loaded.model, manifest.graphs)
    if not cfg.verify:
        return pipeline
    return check_pipeline(recipe, loaded.model, pipeline, folder, manifest, complete_pipeline,
                          lambda: copy_support_files(ckpt, folder))


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def export_encoder(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(exporter="auto"),
                   verify_cfg: VerifyConfig = VerifyConfig()) -> Manifest:
    """Export the encoder-like parts of a checkpoint (vision tower, audio encoder, codec)."""
    from onnxport.recipes import parts_for
    from onnxport.recipes.plan import plan_export

    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    names = tuple(p for p in parts_for(ckpt.model_type, ckpt.config) if p != DECODER)
    if not names:
        plan_export(ckpt, None, None, cfg)  # unknown types: the registry's error
        raise InputError(f"model_type {ckpt.model_type!r} is a decoder LM", "use onnxport export")
    return export(model_dir, out, cfg, verify_cfg, parts=names)


def export_module(model_dir: str | Path, out: str | Path, module_path: str, inputs: list[str],
                  cfg: ExportConfig = ExportConfig(exporter="auto"), verify_cfg: VerifyConfig = VerifyConfig(),
                  outputs: list[str] | None = None, method: str = "forward", verify_dims: list[str] | None = None,
                  model_class: str | None = None, trust_remote_code: bool = False) -> Manifest:
    """Export the submodule at `module_path` of the checkpoint's model with the given input
    specs (`NAME:DTYPE[DIMS]`, named dims dynamic), applying the rewrites; verified against
    PyTorch at the example sizes and at a second set (`verify_dims`, default: each named dim
    grown)."""
    from onnxport.bundle import ENCODER, ExportInfo, Layout, ModelInfo, Part, Source
    from onnxport.export.load import load_any
    from onnxport.export.part import export_module_graphs
    from onnxport.recipes.parts import module_part
    from onnxport.verify.bundle import modules_summary
    from onnxport.verify.module import part_check

    started = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    with atomic_bundle(out, cfg.force, inputs=(ckpt.path,)) as folder:
        model = load_any(ckpt, cfg.trace_dtype, model_class, trust_remote_code)
        part = module_part(model, module_path, inputs, outputs, method, verify_dims)
        check = part_check(verify_cfg, cfg.skip_patches) if cfg.verify else None
        graphs = export_module_graphs([part], folder, cfg, check)
        manifest = Manifest(
            task="module", versions=versions(), source=Source(str(ckpt.path.resolve()), ckpt.sha256()),
            model=ModelInfo(ckpt.model_type, "export-module", getattr(model.config, "architectures", None),
                            module=module_path, method=method),
            export=ExportInfo("auto" if cfg.fallback else cfg.exporter, cfg.opset, cfg.dtype),
            layout=Layout(MODULES), graphs=graphs,
            parts=[Part(part.name, ENCODER, "export-module", [g.file for g in graphs])])
        manifest.verification = manifest.parts[0].verification = modules_summary(manifest)
        finish_bundle(ckpt, folder, manifest, started)
    return manifest


def verify(bundle: str | Path, model_dir: str | Path | None = None, verify_cfg: VerifyConfig = VerifyConfig(),
           allow_pickle: bool = False) -> Manifest:
    """Re-run verification of every part of a bundle against its source checkpoint. The
    manifest is rewritten only when every part passes (a failing run leaves it as it was)."""
    from onnxport.verify.bundle import verify_bundle

    return verify_bundle(bundle, model_dir, verify_cfg, allow_pickle)


def bisect(bundle: str | Path, model_dir: str | Path | None = None, against: str | Path | None = None,
           allow_pickle: bool = False) -> dict:
    """Where a decoder bundle first parts from PyTorch (module by module), or from another bundle
    of the same model (node by node): verify/bisect.py."""
    from onnxport.verify.bisect import bisect_bundle

    return bisect_bundle(bundle, model_dir, against, allow_pickle)


def optimize(bundle: str | Path, out: str | Path, model_dir: str | Path | None = None, check: bool = True,
             verify_cfg: VerifyConfig = VerifyConfig(), force: bool = False, allow_pickle: bool = False) -> Manifest:
    """`onnxport optimize`: the optimize/ passes (what `export --optimize` runs) on the decoder
    of an exported float32 bundle, written as a new bundle at `out`, each verified against the
    source checkpoint and rolled back when it breaks parity."""
    from onnxport.optimize.bundle import optimize_bundle

    return optimize_bundle(bundle, out, model_dir, check, verify_cfg, force, allow_pickle)


def quantize(bundle: str | Path, out: str | Path, cfg: QuantConfig = QuantConfig()) -> Manifest:
    """Weight-only int4/int8 (MatMulNBits) of a monolithic fp32 decoder bundle into a new bundle
    at `out`, gated by held-out perplexity and greedy agreement against the source bundle."""
    from onnxport.optimize.gate import quantize_bundle

    return quantize_bundle(bundle, out, cfg)
