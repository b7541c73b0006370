"""The public Python API the CLI calls: export, verify, Generator.

`export` reads like the pipeline: checkpoint -> recipe -> model -> export -> weight accounting ->
bundle files -> verify -> manifest. Each stage is a function of its own module.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from onnxport.bundle import atomic_bundle, graph_entry, read_manifest, write_manifest
from onnxport.checkpoint import Checkpoint, open_checkpoint
from onnxport.config import ExportConfig, SplitConfig, VerifyConfig
from onnxport.errors import CheckpointError, InputError, VerificationError
from onnxport.recipes import get_recipe
from onnxport.runtime import GenerationResult, Generator

log = logging.getLogger(__name__)

__all__ = ["GenerationResult", "Generator", "export", "verify", "versions"]


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("onnxport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(recipe, ckpt: Checkpoint):
    """Check checkpoint shapes against the config, then load the model in float32."""
    import torch
    import transformers

    from onnxport.export.weights import check_checkpoint_shapes

    _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError
        raise CheckpointError(f"transformers cannot read config.json: {str(e).splitlines()[0][:200]}",
                              "check config.json against the model's documentation") from e
    if not ckpt.pickle_weights:
        check_checkpoint_shapes(ckpt, lambda: transformers.AutoModelForCausalLM.from_config(config))
    try:
        return recipe.load_model(ckpt, torch.float32)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"loading the weights failed: {str(e).strip().splitlines()[0][:300]}",
            "the checkpoint files are damaged or do not match config.json",
        ) from e


def _graph_arrays(onnx_file: Path) -> dict:
    import onnx_ir as ir

    model = ir.load(str(onnx_file))
    arrays = {name: v.const_value.numpy() for name, v in model.graph.initializers.items() if v.const_value is not None}
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            arrays[node.outputs[0].name] = node.attributes["value"].as_tensor().numpy()
    return arrays


def export(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(),
           verify_cfg: VerifyConfig = VerifyConfig(), split: SplitConfig | None = None) -> dict:
    """Export a local checkpoint to a verified bundle at `out`; return the manifest.

    `split=None` writes one decoder graph; a SplitConfig writes the NPU split layout."""
    from onnxport.export.compat import text_config
    from onnxport.export.weights import account_weights

    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    recipe = get_recipe(ckpt.model_type)
    if split is not None and cfg.kv_naming != "optimum":
        raise InputError("--kv-naming seed applies to the monolithic layout only",
                         "split graphs name their cache past_key_values.{i}.key -> present.{i}.key")
    with atomic_bundle(out, cfg.force) as tmp:
        model = load_model(recipe, ckpt)
        kv = recipe.kv_spec(model.config)
        text = text_config(model.config)
        graphs, traced_used, layout = export_graphs(recipe, model, kv, cfg, split, tmp)
        weights = account_weights(model, set(ckpt.tensors), lambda: graph_arrays(tmp, graphs), traced_used)
        copied = copy_support_files(ckpt, tmp)
        manifest = {
            "onnxport_task": recipe.task,
            "versions": versions(),
            "source": {"path": str(ckpt.path.resolve()), "sha256": ckpt.sha256(), "files": copied},
            "model": {
                "model_type": ckpt.model_type,
                "recipe": type(recipe).__name__,
                "architectures": getattr(model.config, "architectures", None),
                "vocab_size": text.vocab_size,
                "hidden_size": text.hidden_size,
                "num_layers": kv.num_layers,
            },
            "export": {"exporter": cfg.exporter, "opset": cfg.opset, "dtype": cfg.dtype,
                       "attn_implementation": recipe.attn_implementation},
            "layout": layout,
            "kv_cache": kv_record(kv, cfg),
            "graphs": graphs,
            "weights": weights,
        }
        write_manifest(tmp, manifest)  # the split runtime reads it during verification
        if cfg.verify:
            record = run_verification(recipe, model, tmp, manifest, cfg, verify_cfg, split)
            manifest["verification"] = record
            if not record["ok"]:
                from onnxport.verify.decoder import first_failure

                raise VerificationError(f"verification failed: {first_failure(record)}",
                                        "the export is wrong for this model; nothing was written (see --debug)")
        manifest["export"]["seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)
    return manifest


def export_graphs(recipe, model, kv, cfg: ExportConfig, split: SplitConfig | None, folder: Path):
    """(graph entries, parameters the exported graphs read, layout record)."""
    from dataclasses import asdict

    from onnxport.export.decoder import export_decoder
    from onnxport.export.split import export_split

    if split is None:
        spec, used = export_decoder(model, kv, cfg, folder / "model.onnx")
        graphs = [{"role": "decoder", "file": "model.onnx", **spec}]
        layout = {"kind": "monolithic"}
    else:
        graphs, used = export_split(recipe, model, kv, cfg, split, folder)
        layout = {"kind": "split", **asdict(split)}
        if split.rope == "outside":
            rotary = recipe.base_model(model).rotary_emb
            layout["inv_freq"] = rotary.inv_freq.detach().float().tolist()
            layout["attention_scaling"] = float(getattr(rotary, "attention_scaling", 1.0))
    for g in graphs:
        data = folder / (g["file"] + ".data")
        g["external_data"] = [data.name] if data.exists() else []
    return graphs, used, layout


def graph_arrays(folder: Path, graphs: list[dict]) -> dict:
    arrays = {}
    for g in graphs:
        if g["file"].endswith(".onnx"):
            arrays.update({f"{g['file']}:{k}": v for k, v in _graph_arrays(folder / g["file"]).items()})
    return arrays


def run_verification(recipe, model, folder: Path, manifest: dict, cfg: ExportConfig, verify_cfg: VerifyConfig,
                     split: SplitConfig | None) -> dict:
    from onnxport.export.decoder import FlatCacheDecoder
    from onnxport.verify.decoder import verify_decoder
    from onnxport.verify.split import verify_split

    if split is None:
        entry = graph_entry(manifest, "decoder")
        wrapper = FlatCacheDecoder(model, manifest["kv_cache"]["num_layers"], manifest["kv_cache"]["layout"]).eval()
        return verify_decoder(wrapper, folder / entry["file"], entry, manifest["model"]["vocab_size"], verify_cfg)
    return verify_split(recipe, model, folder, manifest, split, cfg, verify_cfg)


def kv_record(kv, cfg: ExportConfig) -> dict:
    from onnxport.export.decoder import kv_names

    past, present = kv_names(kv.num_layers, cfg.kv_naming)
    return {
        "layout": cfg.kv_layout,
        "naming": cfg.kv_naming,
        "num_layers": kv.num_layers,
        "num_kv_heads": kv.num_kv_heads,
        "head_dim": kv.head_dim,
        "dtype": cfg.dtype,
        "names": [list(p) for p in zip(past, present)],
    }


def copy_support_files(ckpt: Checkpoint, folder: Path) -> list[str]:
    """config.json and tokenizer files, so the bundle is self-contained."""
    names = []
    for f in [ckpt.path / "config.json", *ckpt.tokenizer_files()]:
        shutil.copy2(f, folder / f.name)
        names.append(f.name)
    return names


def verify(bundle: str | Path, model_dir: str | Path | None = None,
           verify_cfg: VerifyConfig = VerifyConfig()) -> dict:
    """Re-run verification of a bundle against its source checkpoint; update the manifest."""
    from onnxport.verify.decoder import first_failure

    folder = Path(bundle)
    manifest = read_manifest(folder)
    src = Path(model_dir) if model_dir else Path(manifest["source"]["path"])
    ckpt = open_checkpoint(src, allow_pickle=True)
    if model_dir is None and ckpt.sha256() != manifest["source"]["sha256"]:
        raise CheckpointError(f"the checkpoint at {src} changed since the export (sha256 differs)",
                              "pass --model with the checkpoint the bundle was exported from")
    recipe = get_recipe(ckpt.model_type)
    model = load_model(recipe, ckpt)
    layout = dict(manifest.get("layout", {"kind": "monolithic"}))
    split = None
    if layout.pop("kind") == "split":
        layout.pop("inv_freq", None)
        layout.pop("attention_scaling", None)
        split = SplitConfig(**layout)
    exp = manifest["export"]
    cfg = ExportConfig(opset=exp["opset"], exporter=exp["exporter"], kv_layout=manifest["kv_cache"]["layout"],
                       kv_naming=manifest["kv_cache"]["naming"])
    record = run_verification(recipe, model, folder, manifest, cfg, verify_cfg, split)
    manifest["verification"] = record
    manifest.pop("schema_version", None)
    write_manifest(folder, manifest)
    if not record["ok"]:
        raise VerificationError(f"verification failed: {first_failure(record)}",
                                "ONNX Runtime disagrees with PyTorch; re-export or report the model")
    return record
