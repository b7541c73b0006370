"""Split layouts for NPU toolchains: embedding / block_i (prefill) / block_cache_i (decode) /
lm_head, N layers per file, optionally fully static (fixed MAX_LEN / PREFILL_LEN).

Contracts (batch is always 1, as NPU runtimes drive one sequence; kv layout per --kv-layout):

  embedding.onnx       input_ids [1, S] -> hidden_states [1, S, H]
                       (static: S = prefill_len; plus embedding_cache.onnx with S = 1)
  block_{a}-{b}.onnx   hidden_states [1, S, H], position_ids [1, S] (not with --rope outside),
                       attention_mask [1, 1, S, S] (additive float: 0 keep, finfo.min drop;
                       if a layer attends fully) [+ sliding_attention_mask, same shape, if a
                       layer has a window]
                       [+ cos, sin [1, S, head_dim] with --rope outside]
                       -> hidden_states, present.{i}.key / .value [1, S, kv_heads, head_dim]
  block_cache_{a}-{b}  hidden_states [1, 1, H], position_ids [1, 1],
                       attention_mask [1, 1, 1, P + 1], past_key_values.{i}.key / .value [1, P, ...]
                       -> hidden_states, present.{i}.key / .value
                       dynamic: P = past_sequence_length, present = past + new ([1, P + 1, ...])
                       static:  P = max_len (a fixed cache the runtime owns), present = the new
                                token only ([1, 1, ...]); the runtime writes it at slot n and the
                                mask hides the slots not yet written.
  lm_head.onnx         hidden_states [1, H] -> logits [1, V] | token [1, 1] int64 (argmax) |
                       values, indices [1, K] (topk:K); final norm included.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import numpy as np
import torch

from onnxport.bundle import Graph
from onnxport.config import SplitConfig
from onnxport.hf.compat import cache_kwarg
from onnxport.spec import PAST, SEQ, TOTAL, KVSpec, TensorSpec, feeds, kv_dims

log = logging.getLogger(__name__)


class KVCapture:
    """Duck-typed transformers cache for calling decoder layers one at a time.

    transformers' attention modules (4.x and 5.x) only call `update(key, value, layer_idx, ...)`
    on the cache; we prepend the given past (in [B, H, S, D]) and record the new states."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (key_states, value_states)
        if layer_idx in self.past:
            pk, pv = self.past[layer_idx]
            key_states = torch.cat([pk, key_states], dim=-2)
            value_states = torch.cat([pv, value_states], dim=-2)
        self.full[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[layer_idx][0].shape[-2] if layer_idx in self.past else 0


class Embedding(torch.nn.Module):
    def __init__(self, recipe, model):
        super().__init__()
        self.recipe, self.model = recipe, model

    def forward(self, input_ids):
        return self.recipe.embed(self.model, input_ids)


class Head(torch.nn.Module):
    def __init__(self, recipe, model, head: str):
        super().__init__()
        self.recipe, self.model, self.head = recipe, model, head

    def logits(self, hidden_states):
        return self.recipe.final_logits(self.model, hidden_states)

    def forward(self, hidden_states):
        logits = self.logits(hidden_states)
        if self.head == "argmax":
            return torch.argmax(logits, dim=-1, keepdim=True)
        if self.head.startswith("topk:"):
            values, indices = torch.topk(logits, int(self.head[5:]), dim=-1)
            return values, indices
        return logits


class Block(torch.nn.Module):
    """Consecutive decoder layers `layer_ids` with the rotary embedding and the KV cache at the
    graph boundary. Input order: hidden_states, [position_ids] (rope inside), [attention_mask]
    (when a layer attends fully), [sliding_attention_mask] (when a layer has a window), [cos,
    sin] (rope outside), then past key/value per layer (decode only). An input nothing reads
    is not declared: the dynamo exporter drops unread inputs, and a graph declares exactly
    what it reads."""

    def __init__(self, recipe, model, layer_ids: list[int], decode: bool, static: bool, kv_layout: str,
                 rope_outside: bool):
        super().__init__()
        self.recipe, self.model = recipe, model
        self.layer_ids = layer_ids
        self.layers = [recipe.decoder_layers(model)[i] for i in layer_ids]
        self.windows = [recipe.sliding_window(model, i) for i in layer_ids]
        self.has_sliding = any(w is not None for w in self.windows)
        self.has_full = any(w is None for w in self.windows)
        self.decode, self.static, self.bshd, self.rope_outside = decode, static, kv_layout == "bshd", rope_outside
        self.cache_kwarg = cache_kwarg(self.layers[0].forward)

    def forward(self, *inputs):
        hidden, k = inputs[0], 1
        position_ids = None
        if not self.rope_outside:
            position_ids, k = inputs[1], 2
        mask = sliding_mask = None
        if self.has_full:
            mask, k = inputs[k], k + 1
        if self.has_sliding:
            sliding_mask, k = inputs[k], k + 1
        if self.rope_outside:
            cos_sin, k = (inputs[k], inputs[k + 1]), k + 2
        else:
            cos_sin = self.recipe.rotary(self.model, hidden, position_ids)
        past = {}
        if self.decode:
            for j, i in enumerate(self.layer_ids):
                pk, pv = inputs[k + 2 * j], inputs[k + 2 * j + 1]
                if self.bshd:
                    pk, pv = pk.transpose(1, 2), pv.transpose(1, 2)
                past[i] = (pk, pv)
        cache = KVCapture(past)
        for layer, window in zip(self.layers, self.windows):
            out = layer(
                hidden,
                attention_mask=sliding_mask if window is not None else mask,
                position_ids=position_ids,
                position_embeddings=cos_sin,
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        outs = [hidden]
        for i in self.layer_ids:
            kk, vv = cache.new[i] if (self.static or not self.decode) else cache.full[i]
            if self.bshd:
                kk, vv = kk.transpose(1, 2), vv.transpose(1, 2)
            outs += [kk, vv]
        return tuple(outs)


def packs(num_layers: int, pack: int) -> list[list[int]]:
    return [list(range(a, min(a + pack, num_layers))) for a in range(0, num_layers, pack)]


def pack_suffix(ids: list[int]) -> str:
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


def split_plan(recipe, model, kv: KVSpec, hidden: int, vocab: int, cfg, split: SplitConfig) -> list[Graph]:
    """The graph entries (role, file, I/O, layers) of a split export."""
    dt = cfg.trace_dtype
    seq = split.prefill_len if split.static else SEQ
    T = TensorSpec
    graphs = [Graph("embedding", "embedding.onnx", [T("input_ids", "int64", (1, seq))],
                    [T("hidden_states", dt, (1, seq, hidden))])]
    if split.static:
        graphs.append(Graph("embedding_cache", "embedding_cache.onnx", [T("input_ids", "int64", (1, 1))],
                            [T("hidden_states", dt, (1, 1, hidden))]))
    for ids in packs(kv.num_layers, split.pack):
        windows = [recipe.sliding_window(model, i) for i in ids]
        for decode in (False, True):
            s = 1 if decode else seq
            total = (split.max_len + 1 if split.static else TOTAL) if decode else seq
            past_len = split.max_len if split.static else PAST
            ins = [T("hidden_states", dt, (1, s, hidden))]
            if split.rope != "outside":  # with cos / sin given, the layers read no positions
                ins.append(T("position_ids", "int64", (1, s)))
            if any(w is None for w in windows):
                ins.append(T("attention_mask", dt, (1, 1, s, total)))
            if any(w is not None for w in windows):
                ins.append(T("sliding_attention_mask", dt, (1, 1, s, total)))
            if split.rope == "outside":
                ins += [T(n, dt, (1, s, kv.head_dim)) for n in ("cos", "sin")]
            outs = [T("hidden_states_out", dt, (1, s, hidden))]
            present_len = s if (split.static or not decode) else total
            for i in ids:
                if decode:
                    ins += [T(f"past_key_values.{i}.{t}", dt, tuple(kv_dims(kv.layers[i], t, cfg.kv_layout, past_len, batch=1)))
                            for t in ("key", "value")]
                outs += [T(f"present.{i}.{t}", dt, tuple(kv_dims(kv.layers[i], t, cfg.kv_layout, present_len, batch=1)))
                         for t in ("key", "value")]
            role = "block_cache" if decode else "block"
            graphs.append(Graph(role, f"{role}_{pack_suffix(ids)}.onnx", ins, outs, layers=ids, sliding_windows=windows))
    head_in = [T("hidden_states", dt, (1, hidden))]
    if split.head == "argmax":
        head_out = [T("token", "int64", (1, 1))]
    elif split.top_k:
        head_out = [T("values", dt, (1, split.top_k)), T("indices", "int64", (1, split.top_k))]
    else:
        head_out = [T("logits", dt, (1, vocab))]
    graphs.append(Graph("lm_head", "lm_head.onnx", head_in, head_out, head=split.head))
    return graphs


def module_for(entry: Graph, recipe, model, cfg, split: SplitConfig) -> torch.nn.Module:
    role = entry.role
    if role in ("embedding", "embedding_cache"):
        return Embedding(recipe, model)
    if role == "lm_head":
        return Head(recipe, model, split.head)
    return Block(recipe, model, entry.layers, decode=role == "block_cache", static=split.static,
                 kv_layout=cfg.kv_layout, rope_outside=split.rope == "outside")


def example_feeds(entry: Graph, sizes: dict, seed: int, vocab: int, past_len: int) -> dict:
    """Inputs for tracing or verifying one split graph: random ids/hidden/cache, real causal
    masks (the decode cache's new key sits in the last slot)."""
    window = next((w for w in entry.sliding_windows or [] if w), None)
    return feeds(entry.inputs, sizes, seed, vocab, past=past_len, window=window,
                 static_cache=entry.role == "block_cache")


def pack_for_size(recipe, model, num_layers: int, limit: int) -> int:
    """The most consecutive layers whose weights (in the trace dtype) stay under `limit` bytes."""
    from onnxport.errors import InputError

    layers = recipe.base_model(model).layers
    sizes = [sum(p.numel() * p.element_size() for p in layers[i].parameters()) for i in range(num_layers)]
    if max(sizes) > limit:
        raise InputError(f"one decoder layer holds {max(sizes) / 1e6:.1f} MB of weights, more than --max-graph-size "
                         f"({limit / 1e6:.1f} MB)", "raise --max-graph-size; a layer is the smallest part")
    return max(1, min(num_layers, limit // max(sizes)))


def export_split(recipe, model, kv, cfg, split: SplitConfig, folder: Path) -> tuple[list[Graph], set[str]]:
    """Export every graph of the split plan into `folder`; return the entries and the union of
    parameters the exported graphs read. Block graphs are traced for the first two full packs
    of each role and stamped for the others when the layers are alike (export/stamp_blocks.py)."""
    from onnxport.export import stamp_blocks
    from onnxport.hf.compat import text_config

    text = text_config(model.config)
    graphs = split_plan(recipe, model, kv, text.hidden_size, text.vocab_size, cfg, split)
    path, why = stamp_blocks.why_not(model, kv, cfg, split)
    stamper = stamp_blocks.BlockStamper(model, path, split.pack) if why is None else None
    used_all: set[str] = set()
    with _collected_per_graph() as collect:
        for n, entry in enumerate(graphs):
            used_all |= _export_entry(n, entry, stamper, why, recipe, model, cfg, split, text, folder)
            collect()
    if split.embedding_bin:
        weight = model.get_input_embeddings().weight.detach().float().numpy()
        weight.astype(np.float32).tofile(folder / "embedding.bin")
        graphs.insert(0, Graph("embedding_table", "embedding.bin", dtype="float32", shape=list(weight.shape),
                               scale=recipe.embedding_scale(model)))
    return graphs, used_all


@contextlib.contextmanager
def _collected_per_graph():
    """Yields a function that frees the last graph's garbage: onnx-ir models and onnxslim's
    graph are reference cycles holding weight copies, which only the cyclic collector frees,
    and a run of stamped graphs allocates too few objects to trigger it (SmolLM2 static split,
    --pack 3: peak RSS 2.58 GB against 2.09 GB collected per graph). The objects alive on
    entry (torch, transformers, the model) are frozen meanwhile, after one full collection
    (nothing dead is frozen), so a collection scans only what the export made since (~0.04 s
    instead of ~0.3 s). A caller that froze objects itself keeps its freeze; its graphs'
    garbage is then left to the collector's own schedule."""
    if gc.get_freeze_count():
        yield lambda: None
        return
    gc.collect()
    gc.freeze()
    try:
        yield gc.collect
    finally:
        gc.unfreeze()


def _export_entry(n, entry, stamper, why, recipe, model, cfg, split, text, folder) -> set[str]:
    """Export one graph of the split plan (stamped from its role's template when it can be);
    the parameters it reads."""
    from onnxport.export import stamp_blocks
    from onnxport.export.graph import check_fully_static, export_graph, finalize_graph, slim_static
    from onnxport.export.stamp import StampError

    stamped = False
    if stamper is not None and not stamper.traces(entry):
        template = stamper.templates[entry.role].entry
        try:
            copy, used = stamper.stamp(entry)
            finalize_graph(copy, folder / entry.file, entry.inputs, entry.outputs, cfg.external_data_threshold_bytes,
                           static=split.static)
            entry.patches, entry.stamped, stamped = template.patches, {"from": template.file}, True
        except StampError as e:
            log.info("%s traced (the copy of %s failed: %s)", entry.file, template.file, e)
    if not stamped:
        module = module_for(entry, recipe, model, cfg, split).eval()
        # trace with distinct sizes > 1 so no dynamic dim is specialised
        sizes = {SEQ: 3, PAST: 5, TOTAL: 6 if entry.role == "block_cache" else 3}
        past = 5 if entry.role == "block_cache" else 0
        if entry.role == "block_cache" and split.static:
            past = 3
        example = example_feeds(entry, sizes, n, text.vocab_size, past)
        args = tuple(torch.from_numpy(example[i.name]) for i in entry.inputs)
        blocks = stamper is not None and entry.role in stamp_blocks.ROLES
        used, entry.patches = export_graph(module, args, entry.inputs, entry.outputs, folder / entry.file,
                                           cfg.exporter, cfg.opset, cfg.external_data_threshold_bytes,
                                           param_prefix="model.", static=split.static,
                                           bind=stamper.binder() if blocks and cfg.exporter == "dynamo" else None,
                                           keep=stamper.keep(entry) if blocks else None)
        if cfg.stamp and entry.role in stamp_blocks.ROLES and (why or (stamper and stamper.why_not_for(entry.role))):
            entry.stamped = {"why_not": why or stamper.why_not_for(entry.role)}
    entry.exporter, entry.opset = cfg.exporter, cfg.opset
    if split.static:
        slim_static(folder / entry.file)
        check_fully_static(folder / entry.file)
    return used
