"""The export stage of one part: its graphs written into the bundle folder, every checkpoint
weight accounted for, and the manifest's sections for the part filled in.

- a text decoder (`export_decoder_part`): one graph with a flat cache, or the split layout;
- encoder-like parts (`export_module_part`): the recipe's module graphs, each exported with
  the first exporter whose graph passes `check` (verify/, handed in by the caller).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from onnxport.bundle import (
    DECODER,
    ENCODER,
    SPLIT,
    Graph,
    KVCache,
    Layout,
    Manifest,
    Part,
    external_locations,
)
from onnxport.checkpoint import Checkpoint
from onnxport.config import ExportConfig, SplitConfig
from onnxport.errors import ExportError, InputError
from onnxport.export.load import LoadedModel

log = logging.getLogger(__name__)

#: the one weights file the graphs of a split bundle share
SHARED_WEIGHTS = "weights.data"


@dataclass
class ExportedDecoder:
    """The decoder part as exported: its KV spec (`spec.KVSpec`) and whether it is split."""

    kv: object
    split: SplitConfig | None


@dataclass
class ExportedModules:
    """An encoder-like part as exported: the recipe's module parts and their graph entries."""

    name: str
    parts: list
    graphs: list[Graph]


def export_decoder_part(loaded: LoadedModel, ckpt: Checkpoint, cfg: ExportConfig, split: SplitConfig | None,
                        folder: Path, manifest: Manifest) -> ExportedDecoder:
    """Export the text decoder (one graph, or the split layout) into `folder`, account for
    every weight, and fill the manifest's decoder sections."""
    from dataclasses import asdict

    from onnxport.export.split import export_split
    from onnxport.export.weights import account_weights, onnx_arrays
    from onnxport.hf.compat import generate_pad_position, text_config

    recipe, model = loaded.recipe, loaded.model
    kv = recipe.kv_spec(model)
    text = text_config(model.config)
    if split is not None and recipe.embeds_input:
        raise InputError(f"--layout split of {ckpt.model_type!r}: its decoder takes inputs_embeds (multimodal)",
                         "export the monolithic layout")
    if split is not None and (kv.has_states or kv.has_indexer):
        what = "recurrent states" if kv.has_states else "a sparse-attention indexer cache"
        raise InputError(f"--layout split needs a key/value cache; {type(model).__name__} keeps {what}",
                         "export it with the monolithic layout (drop --layout split)")
    bind = None
    if loaded.buffers is not None:  # --low-memory: weights streamed
        import torch

        from onnxport.export.decoder import WRAPPER_PREFIX
        from onnxport.export.stream import Binder, CheckpointWeights

        bind = Binder(CheckpointWeights(ckpt, model, loaded.buffers, getattr(torch, cfg.trace_dtype)), WRAPPER_PREFIX)
    io = {"embeds": recipe.embeds_input, "position_axes": recipe.position_axes,
          "hidden_output": recipe.hidden_output(model)}
    if split is None:
        graphs, used = _monolithic(recipe, model, kv, cfg, folder, bind, io)
    else:
        if split.max_graph_bytes is not None:
            from onnxport.export.split import pack_for_size

            split = replace(split, pack=pack_for_size(recipe, model, kv.num_layers, split.max_graph_bytes))
            log.info("--max-graph-size: %d layers per block graph", split.pack)
        graphs, used = export_split(recipe, model, kv, cfg, split, folder)
        manifest.layout = Layout(SPLIT, **asdict(split))
        if split.rope == "outside":
            rotary = recipe.base_model(model).rotary_emb
            manifest.layout.inv_freq = rotary.inv_freq.detach().float().tolist()
            manifest.layout.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if split is not None and split.share_weights:
        from onnxport.bundle.weights import share_weights

        stats = share_weights(folder, [g.file for g in graphs if g.file.endswith(".onnx")], SHARED_WEIGHTS)
        log.info("split weights shared: %s", stats)
    for g in graphs:
        g.part = DECODER
        g.external_data = sorted(set(external_locations(folder / g.file))) if g.file.endswith(".onnx") else []

    def graph_arrays() -> dict:
        return {f"{g.file}:{k}": v for g in graphs if g.file.endswith(".onnx")
                for k, v in onnx_arrays(folder / g.file).items()}

    weights = account_weights(model, set(ckpt.tensors), graph_arrays, used,
                              lambda unread: recipe.skipped_weights(model, unread))
    manifest.graphs = graphs + manifest.graphs
    manifest.kv_cache = kv_record(kv, cfg)
    manifest.weights = weights
    manifest.model.vocab_size, manifest.model.hidden_size = text.vocab_size, text.hidden_size
    manifest.model.num_layers = kv.num_layers
    manifest.model.max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    manifest.model.pad_position = generate_pad_position()
    manifest.parts.insert(0, Part(DECODER, DECODER, type(recipe).__name__, [g.file for g in graphs], weights=weights))
    return ExportedDecoder(kv, split)


def _monolithic(recipe, model, kv, cfg: ExportConfig, folder: Path, bind, io: dict) -> tuple[list[Graph], set]:
    """model.onnx (and embed_tokens.onnx for a decoder fed inputs_embeds). `--exporter auto`:
    an architecture dynamo cannot trace (an encoder family used as a decoder) is retried with
    TorchScript, and the graph records why."""
    from onnxport.export.decoder import export_decoder

    try:
        graph, used = export_decoder(model, kv, cfg, folder / "model.onnx", bind=bind, **io)
    except ExportError as e:
        if not cfg.fallback or bind is not None:
            raise
        log.warning("dynamo failed on the decoder (%s); trying TorchScript", e.message[:200])
        ts = replace(cfg, exporter="torchscript", opset=min(cfg.opset, 20), fallback=False)
        try:
            graph, used = export_decoder(model, kv, ts, folder / "model.onnx", **io)
        except ExportError as e2:
            raise ExportError(f"{e.message}; TorchScript fallback: {e2.message}", e.hint) from e2
        graph.fallback_from = {"dynamo": e.message[:300]}
    graphs = [graph]
    if recipe.embeds_input:
        from onnxport.export.decoder import export_embedding

        embedding, read = export_embedding(recipe, model, cfg, folder / "embed_tokens.onnx", bind=bind)
        graphs.append(embedding)
        used = used | read
    return graphs, used


def kv_record(kv, cfg: ExportConfig) -> KVCache:
    """The manifest's kv_cache section for `kv` under the export's layout and naming."""
    from onnxport.spec import cache_dims, cache_entries

    entries = cache_entries(kv, cfg.kv_naming)
    layers = None if kv.is_uniform else [[x.key_heads, x.key_dim, x.value_heads, x.value_dim] for x in kv.layers]
    states = [[e.past, e.present, cache_dims(kv.layers[e.layer], e.what, cfg.kv_layout, None)[1:]]
              for e in entries if e.what not in ("key", "value", "indexer_key")] or None
    return KVCache(cfg.kv_layout, cfg.kv_naming, kv.num_layers, kv.num_kv_heads, kv.head_dim, cfg.trace_dtype,
                   [[e.past, e.present] for e in entries], layers, states, True if kv.has_states else None)


def exporters(cfg: ExportConfig) -> list[str]:
    """The exporters to try for module graphs, in order (`auto`: dynamo, then TorchScript)."""
    return ["dynamo", "torchscript"] if cfg.fallback else [cfg.exporter]


def export_module_graphs(parts: list, folder: Path, cfg: ExportConfig, check, part_name: str | None = None) -> list:
    """Export each ModulePart into `folder`; `check(part, file, applied, exporter, args)` (verify/,
    None with --no-verify) proves each candidate graph. Returns the graph entries."""
    from onnxport.export.module import export_part

    return [export_part(p, folder, exporters(cfg), cfg.opset, check, cfg.external_data_threshold_bytes,
                        cfg.skip_patches, part_name=part_name) for p in parts]


def export_module_part(name: str, loaded: LoadedModel, cfg: ExportConfig, folder: Path, check) -> ExportedModules:
    """The graphs of one encoder-like part (vision tower, audio encoder, codec)."""
    parts = loaded.recipe.parts(loaded.model)
    return ExportedModules(name, parts, export_module_graphs(parts, folder, cfg, check, part_name=name))


def add_module_part(exported: ExportedModules, recipe, manifest: Manifest, verified: bool) -> None:
    """The part's graphs and its entry into the manifest (after any conversion of the graphs)."""
    graphs = exported.graphs
    manifest.graphs += graphs
    record = {"ok": all(g.verification["ok"] for g in graphs), "graphs": [g.name for g in graphs]} if verified else None
    manifest.parts.append(Part(exported.name, ENCODER, type(recipe).__name__, [g.file for g in graphs], record))
