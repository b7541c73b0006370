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
from onnxport.recipes import encoder_recipe, get_recipe
from onnxport.runtime import GenerationResult, Generator

log = logging.getLogger(__name__)

__all__ = ["GenerationResult", "Generator", "export", "export_encoder", "export_module", "verify", "versions"]


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
        check_checkpoint_shapes(ckpt, lambda: recipe.model_cls().from_config(config))
    try:
        return recipe.load_model(ckpt, torch.float32)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"loading the weights failed: {str(e).strip().splitlines()[0][:300]}",
            "the checkpoint files are damaged or do not match config.json",
        ) from e


def export(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(),
           verify_cfg: VerifyConfig = VerifyConfig(), split: SplitConfig | None = None) -> dict:
    """Export a local checkpoint to a verified bundle at `out`; return the manifest.

    `split=None` writes one decoder graph; a SplitConfig writes the NPU split layout."""
    from onnxport.hf.compat import text_config
    from onnxport.export.weights import account_weights
    from onnxport.recipes.encoder import EncoderRecipe

    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    recipe = get_recipe(ckpt.model_type, config=ckpt.config)
    if isinstance(recipe, EncoderRecipe):
        if split is not None:
            raise InputError(f"--layout split applies to decoder LMs; {ckpt.model_type!r} is an encoder",
                             "drop --layout/--static")
        return _export_encoder(ckpt, recipe, out, cfg, verify_cfg, t0)
    if split is not None and cfg.kv_naming != "optimum":
        raise InputError("--kv-naming seed applies to the monolithic layout only",
                         "split graphs name their cache past_key_values.{i}.key -> present.{i}.key")
    with atomic_bundle(out, cfg.force) as tmp:
        model = load_model(recipe, ckpt)
        kv = recipe.kv_spec(model)
        text = text_config(model.config)
        graphs, traced_used, layout = export_graphs(recipe, model, kv, cfg, split, tmp)
        weights = account_weights(model, set(ckpt.tensors), lambda: graph_arrays(tmp, graphs), traced_used,
                                  lambda unread: recipe.skipped_weights(model, unread))
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
            record = run_verification(recipe, model, kv, tmp, manifest, cfg, verify_cfg, split)
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
    from onnxport.export.weights import onnx_arrays

    arrays = {}
    for g in graphs:
        if g["file"].endswith(".onnx"):
            arrays.update({f"{g['file']}:{k}": v for k, v in onnx_arrays(folder / g["file"]).items()})
    return arrays


def run_verification(recipe, model, kv, folder: Path, manifest: dict, cfg: ExportConfig, verify_cfg: VerifyConfig,
                     split: SplitConfig | None) -> dict:
    from onnxport.export.decoder import flat_cache_wrapper
    from onnxport.verify.decoder import verify_decoder
    from onnxport.verify.split import verify_split

    if split is None:
        entry = graph_entry(manifest, "decoder")
        wrapper = flat_cache_wrapper(model, kv, manifest["kv_cache"]["layout"])
        return verify_decoder(wrapper, folder / entry["file"], entry, manifest["model"]["vocab_size"], verify_cfg)
    return verify_split(recipe, model, folder, manifest, split, cfg, verify_cfg)


def kv_record(kv, cfg: ExportConfig) -> dict:
    from onnxport.spec import kv_names

    past, present = kv_names(kv.num_layers, cfg.kv_naming)
    record = {
        "layout": cfg.kv_layout,
        "naming": cfg.kv_naming,
        "num_layers": kv.num_layers,
        "num_kv_heads": kv.num_kv_heads,
        "head_dim": kv.head_dim,
        "dtype": cfg.dtype,
        "names": [list(p) for p in zip(past, present)],
    }
    if not kv.is_uniform:
        record["layers"] = [[x.key_heads, x.key_dim, x.value_heads, x.value_dim] for x in kv.layers]
    return record


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
    if manifest.get("layout", {}).get("kind") == "modules":
        return _verify_modules(folder, manifest, ckpt, verify_cfg)
    recipe = get_recipe(ckpt.model_type, config=ckpt.config)
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
    record = run_verification(recipe, model, recipe.kv_spec(model), folder, manifest, cfg, verify_cfg, split)
    manifest["verification"] = record
    manifest.pop("schema_version", None)
    write_manifest(folder, manifest)
    if not record["ok"]:
        raise VerificationError(f"verification failed: {first_failure(record)}",
                                "ONNX Runtime disagrees with PyTorch; re-export or report the model")
    return record


# --- encoders and arbitrary modules -------------------------------------------------------------

def _exporters(cfg: ExportConfig) -> list[str]:
    return ["dynamo", "torchscript"] if cfg.fallback else [cfg.exporter]


def export_parts(parts: list, folder: Path, cfg: ExportConfig, verify_cfg: VerifyConfig) -> list[dict]:
    """Export and verify each ModulePart into `folder`; return the manifest graph entries."""
    from onnxport.export.module import export_part

    if not cfg.verify:
        log.warning("module exports are always verified (the check is what proves the rewrites)")
    return [export_part(p, folder, _exporters(cfg), cfg.opset, verify_cfg.atol, verify_cfg.min_cosine,
                        cfg.external_data_threshold_bytes, cfg.skip_patches) for p in parts]


def _module_manifest(task: str, ckpt: Checkpoint, model, recipe_name: str, graphs: list[dict], cfg: ExportConfig,
                     copied: list[str], t0: float, extra: dict | None = None) -> dict:
    return {
        "onnxport_task": task,
        "versions": versions(),
        "source": {"path": str(ckpt.path.resolve()), "sha256": ckpt.sha256(), "files": copied},
        "model": {"model_type": ckpt.model_type, "recipe": recipe_name,
                  "architectures": getattr(model.config, "architectures", None), **(extra or {})},
        "export": {"opset": cfg.opset, "exporter": "auto" if cfg.fallback else cfg.exporter, "dtype": cfg.dtype,
                   "seconds": round(time.perf_counter() - t0, 2)},
        "layout": {"kind": "modules"},
        "graphs": graphs,
        # per-size records live in each graph entry
        "verification": {"ok": all(g["verification"]["ok"] for g in graphs), "graphs": [g["name"] for g in graphs]},
    }


def export_encoder(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(exporter="auto"),
                   verify_cfg: VerifyConfig = VerifyConfig()) -> dict:
    """Export the parts an encoder recipe declares (vision tower, audio encoder, codec decoder)."""

    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    recipe = encoder_recipe(ckpt.model_type, ckpt.config)
    if recipe is None:
        get_recipe(ckpt.model_type, config=ckpt.config)  # unknown types: the registry's error
        raise InputError(f"model_type {ckpt.model_type!r} is a decoder LM", "use onnxport export")
    return _export_encoder(ckpt, recipe, out, cfg, verify_cfg, t0)


def _export_encoder(ckpt: Checkpoint, recipe, out, cfg: ExportConfig, verify_cfg: VerifyConfig, t0: float) -> dict:
    with atomic_bundle(out, cfg.force) as tmp:
        _quiet_transformers()
        model = _load_or_explain(lambda: recipe.load_model(ckpt, _torch_dtype(cfg)))
        graphs = export_parts(recipe.parts(model), tmp, cfg, verify_cfg)
        copied = copy_support_files(ckpt, tmp)
        manifest = _module_manifest(recipe.task, ckpt, model, type(recipe).__name__, graphs, cfg, copied, t0)
        write_manifest(tmp, manifest)
    return manifest


def export_module(model_dir: str | Path, out: str | Path, module_path: str, inputs: list[str],
                  cfg: ExportConfig = ExportConfig(exporter="auto"), verify_cfg: VerifyConfig = VerifyConfig(),
                  outputs: list[str] | None = None, method: str = "forward", verify_dims: list[str] | None = None,
                  model_class: str | None = None, trust_remote_code: bool = False) -> dict:
    """Export the submodule at `module_path` of the checkpoint's model with the given input
    specs (`NAME:DTYPE[DIMS]`, named dims dynamic), applying the rewrites; verified against
    PyTorch at the example sizes and at a second set (`verify_dims`, default: each named dim
    grown)."""
    from onnxport.export.module import ModulePart, NamedInputs, example_sizes, parse_input_spec, resolve_module

    t0 = time.perf_counter()
    specs = [parse_input_spec(s) for s in inputs]
    if not specs:
        raise InputError("no --input given", "describe each forward input: --input NAME:DTYPE[DIMS]")
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    with atomic_bundle(out, cfg.force) as tmp:
        _quiet_transformers()
        model = _load_or_explain(lambda: _load_any(ckpt, _torch_dtype(cfg), model_class, trust_remote_code))
        target = resolve_module(model, module_path)
        if not callable(getattr(target, method, None)):
            raise InputError(f"{module_path or type(model).__name__} has no method {method!r}",
                             "pass --method with one of its methods, e.g. forward")
        _check_arg_names(target, method, [s.name for s in specs], module_path)
        base = example_sizes(specs)
        sizes = [base, _second_sizes(base, verify_dims)]
        module = NamedInputs(target, [s.name for s in specs], method=method, keep=outputs or None).eval()
        import torch

        from onnxport.export.module import random_inputs

        try:
            with torch.no_grad():
                names = module.output_names(*random_inputs(specs, base))
        except Exception as e:  # noqa: BLE001 - the model's own error on these inputs
            raise InputError(f"PyTorch itself fails on the example inputs: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:240]}",
                             "check --input names, dtypes and sizes against the module's forward") from e
        if outputs:
            missing = [o for o in outputs if o not in names]
            if missing:
                raise InputError(f"--output {missing[0]!r} is not an output of {module_path}",
                                 f"its outputs: {', '.join(names)}")
        try:
            with torch.no_grad():
                module(*random_inputs(specs, sizes[1]))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"PyTorch fails when the named dims change to {sizes[1]}: "
                             f"{str(e).strip().splitlines()[0][:200]}",
                             "fix that dim to a number in --input, or give other sizes with --verify-dims") from e
        name = (module_path or "model").replace(".", "_")
        part = ModulePart(name, module, specs, names, sizes, role="module")
        graphs = export_parts([part], tmp, cfg, verify_cfg)
        copied = copy_support_files(ckpt, tmp)
        manifest = _module_manifest("module", ckpt, model, "export-module", graphs, cfg, copied, t0,
                                    {"module": module_path, "method": method})
        write_manifest(tmp, manifest)
    return manifest


def _check_arg_names(target, method: str, names: list[str], path: str) -> None:
    import inspect

    params = inspect.signature(getattr(target, method)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [n for n in names if n not in params]
    if unknown:
        raise InputError(f"{path or 'the model'}.{method} has no argument {unknown[0]!r}",
                         f"its arguments: {', '.join(params)}")


def _second_sizes(base: dict, overrides: list[str] | None) -> dict:
    sizes = {k: (v + 1 if "batch" in k else 2 * v) for k, v in base.items()}
    for item in overrides or []:
        k, _, v = item.partition("=")
        if k not in base or not v.isdigit():
            raise InputError(f"--verify-dims {item!r}: expected NAME=SIZE with a dim named in --input",
                             f"named dims: {', '.join(base) or 'none'}")
        sizes[k] = int(v)
    return sizes


def _torch_dtype(cfg: ExportConfig):
    import torch

    return getattr(torch, cfg.dtype)


def _load_or_explain(load):
    try:
        return load()
    except (CheckpointError, InputError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"loading the model failed: {str(e).strip().splitlines()[0][:300]}",
                              "the checkpoint does not match its config.json, or needs --model-class") from e


def _load_any(ckpt: Checkpoint, dtype, model_class: str | None, trust_remote_code: bool):
    """The checkpoint's own architecture class (so module paths match the checkpoint's names),
    or `model_class`; remote code only when asked for."""
    import transformers

    from onnxport.recipes.base import from_pretrained

    auto_map = ckpt.config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise CheckpointError("this checkpoint's model class is remote code (auto_map in config.json)",
                              "pass --trust-remote-code if you trust its source")
    if model_class:
        if not hasattr(transformers, model_class):
            raise InputError(f"transformers has no class {model_class!r}", "e.g. --model-class AutoModel")
        cls = getattr(transformers, model_class)
    elif auto_map:
        cls = transformers.AutoModel
    else:
        archs = [a for a in ckpt.config.get("architectures") or [] if hasattr(transformers, a)]
        cls = getattr(transformers, archs[0]) if archs else transformers.AutoModel
    try:
        return from_pretrained(cls, ckpt, dtype, "eager", trust_remote_code)
    except (TypeError, ValueError):  # remote-code classes that take no attn_implementation
        return from_pretrained(cls, ckpt, dtype, None, trust_remote_code)


def _verify_modules(folder: Path, manifest: dict, ckpt: Checkpoint, verify_cfg: VerifyConfig) -> dict:
    from onnxport.export.module import verify_part
    from onnxport.recipes.encoder import EncoderRecipe

    if manifest["onnxport_task"] == "module":
        raise InputError("export-module bundles are verified when they are written",
                         "re-run onnxport export-module to re-check against the checkpoint")
    recipe = encoder_recipe(ckpt.model_type, ckpt.config)
    assert isinstance(recipe, EncoderRecipe)
    _quiet_transformers()
    model = _load_or_explain(lambda: recipe.load_model(ckpt, _torch_dtype(ExportConfig())))
    parts = {p.name: p for p in recipe.parts(model)}
    checked = []
    try:
        for g in manifest["graphs"]:
            g["verification"] = verify_part(parts[g["name"]], folder / g["file"], verify_cfg.atol, verify_cfg.min_cosine)
            checked.append(g["name"])
    finally:
        manifest["verification"] = {"ok": len(checked) == len(manifest["graphs"]), "graphs": checked}
        manifest.pop("schema_version", None)
        write_manifest(folder, manifest)
    return manifest["verification"]
