"""`onnxport optimize`: the passes `export --optimize` runs, on an exported float32 decoder
bundle, written as a new bundle. Each pass is verified against the source checkpoint (the
export's, or `model_dir`) and rolled back when it breaks parity; the manifest lists every pass
with what it fused."""

from __future__ import annotations

import shutil
from pathlib import Path

from onnxport.bundle import DECODER, Manifest, atomic_bundle, read_manifest
from onnxport.bundle.assemble import finish_bundle
from onnxport.config import VerifyConfig
from onnxport.errors import InputError


def source_decoder_bundle(src: Path, what: str) -> Manifest:
    """The manifest of a monolithic float32 decoder bundle (what optimize and quantize take)."""
    manifest = read_manifest(src)
    if manifest.kv_cache is None or manifest.is_split or manifest.kv_cache.step_only:
        raise InputError(f"onnxport {what} takes a monolithic {'text-' if what == 'quantize' else ''}decoder bundle",
                         "export one with onnxport export (the default layout)")
    return manifest


def copy_bundle_files(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Every file and folder of the bundle `src` but the manifest (and `skip`) into `dst`."""
    for f in src.iterdir():
        if f.name != "manifest.json" and f.name not in skip:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst / f.name)


def optimize_bundle(bundle: str | Path, out: str | Path, model_dir: str | Path | None = None, check: bool = True,
                    vcfg: VerifyConfig = VerifyConfig(), force: bool = False, allow_pickle: bool = False) -> Manifest:
    from onnxport.export.load import LoadedModel, load_model
    from onnxport.optimize.stage import run_fusions
    from onnxport.recipes import get_recipes
    from onnxport.recipes.plan import text_decoder
    from onnxport.verify.bundle import source_checkpoint
    from onnxport.verify.decoder import DecoderCheck

    src = Path(bundle)
    manifest = source_decoder_bundle(src, "optimize")
    graph = manifest.graph(DECODER)
    if (manifest.export.dtype or "float32") != "float32" or graph.quantization:
        raise InputError(f"the bundle is {'quantized' if graph.quantization else manifest.export.dtype}: passes run on "
                         "the float32 graph", "optimize the float32 bundle, then convert or quantize it")
    if graph.optimization:
        raise InputError(f"{src} is already optimized ({', '.join(r['name'] for r in graph.optimization)})",
                         "optimize the bundle written by onnxport export")
    checker = None
    recipe = ckpt = None
    if check:  # the passes are verified against the checkpoint the bundle came from
        ckpt = source_checkpoint(manifest, model_dir, allow_pickle)
        recipe = text_decoder(get_recipes(ckpt.model_type, (DECODER,), ckpt.config))
        if recipe is None:
            raise InputError(f"{ckpt.model_type!r} has no text decoder part to optimize", "check the bundle's source")
    with atomic_bundle(out, force, inputs=(src,) + ((ckpt.path,) if ckpt is not None else ())) as tmp:
        copy_bundle_files(src, tmp)
        if check:
            loaded = LoadedModel(recipe, load_model(recipe, ckpt))
            checker = DecoderCheck(loaded, recipe.kv_spec(loaded.model), manifest, vcfg)
        run_fusions(tmp, manifest, checker)
        del checker
        finish_bundle(None, tmp, manifest, None)
    return manifest
