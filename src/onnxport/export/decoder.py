"""Export a transformers causal LM as one ONNX graph with a flat, well-named KV cache.

The graph contract (names follow optimum / onnxruntime-genai):

    inputs   input_ids        int64 [batch_size, sequence_length]
             attention_mask   int64 [batch_size, total_sequence_length]
             position_ids     int64 [batch_size, sequence_length]
             past_key_values.{i}.key / .value   [batch_size, kv_heads, past_sequence_length, head_dim]
    outputs  logits           float [batch_size, sequence_length, vocab_size]
             present.{i}.key / .value           [batch_size, kv_heads, total_sequence_length, head_dim]

`kv_layout="bshd"` swaps the heads and sequence axes of every cache tensor; `kv_naming="seed"`
uses past_key_in{i} / past_value_in{i} -> past_key{i} / past_value{i}.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from onnxport.bundle import Graph
from onnxport.config import ExportConfig
from onnxport.export.graph import export_graph
from onnxport.hf.compat import (
    build_dynamic_cache,
    cache_kwarg,
    cache_pairs,
    output_cache,
    text_config,
)
from onnxport.spec import (
    BATCH,
    PAST,
    SEQ,
    TOTAL,
    TRACE_CASE,
    KVSpec,
    TensorSpec,
    feeds,
    kv_dims,
    kv_names,
)

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "model."  # FlatCacheDecoder.model


def io_spec(kv: KVSpec, vocab_size: int, cfg: ExportConfig, takes_position_ids: bool = True
            ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs."""
    past, present = kv_names(kv.num_layers, cfg.kv_naming)
    inputs = [TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("attention_mask", "int64", (BATCH, TOTAL))]
    if takes_position_ids:
        inputs.append(TensorSpec("position_ids", "int64", (BATCH, SEQ)))
    outputs = [TensorSpec("logits", cfg.dtype, (BATCH, SEQ, vocab_size))]
    for i, layer in enumerate(kv.layers):
        for j, which in enumerate(("key", "value")):
            inputs.append(TensorSpec(past[2 * i + j], cfg.dtype, tuple(kv_dims(layer, which, cfg.kv_layout, PAST))))
            outputs.append(TensorSpec(present[2 * i + j], cfg.dtype, tuple(kv_dims(layer, which, cfg.kv_layout, TOTAL))))
    return inputs, outputs


class FlatCacheDecoder(torch.nn.Module):
    """Wraps a causal LM so its cache crosses the graph boundary as flat tensors."""

    def __init__(self, model: torch.nn.Module, num_layers: int, kv_layout: str = "bhsd", mask_4d: bool = False):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.bshd = kv_layout == "bshd"
        #: build the additive [B, 1, S, T] mask here instead of in transformers. transformers
        #: 4.5x builds it with torch.vmap, which the TorchScript exporter cannot trace; both
        #: majors use a 4D mask as given.
        self.mask_4d = mask_4d
        self.cache_kwarg = cache_kwarg(model.forward)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        return self.run(input_ids, attention_mask, position_ids, past_key_values)

    def run(self, input_ids, attention_mask, position_ids, past_key_values):
        pairs = []
        for i in range(self.num_layers):
            k, v = past_key_values[2 * i], past_key_values[2 * i + 1]
            if self.bshd:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            pairs.append((k, v))
        if self.mask_4d:
            attention_mask = additive_causal_mask(attention_mask, input_ids.shape[1], self.model.dtype)
        positions = {} if position_ids is None else {"position_ids": position_ids}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **positions,
            return_dict=True,
            **{self.cache_kwarg: build_dynamic_cache(pairs)},
        )
        flat = [out.logits]
        for k, v in cache_pairs(output_cache(out)):
            if self.bshd:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            flat += [k, v]
        return tuple(flat)


class FlatCacheDecoderNoPositions(FlatCacheDecoder):
    """For models whose forward takes no position_ids (ALiBi models such as bloom/mpt derive
    positions from the mask)."""

    def forward(self, input_ids, attention_mask, past_key_values: list[torch.Tensor]):
        return self.run(input_ids, attention_mask, None, past_key_values)


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def flat_cache_wrapper(model, kv: KVSpec, kv_layout: str, mask_4d: bool = False) -> FlatCacheDecoder:
    cls = FlatCacheDecoder if takes_position_ids(model) else FlatCacheDecoderNoPositions
    return cls(model, kv.num_layers, kv_layout, mask_4d=mask_4d).eval()


def wrapper_args(inputs: list[TensorSpec], tensors: dict) -> tuple:
    """Positional arguments of the wrapper from named tensors: the leading inputs, then the
    flat cache as one list."""
    names = [i.name for i in inputs]
    lead = 3 if "position_ids" in names else 2
    return (*[tensors[n] for n in names[:lead]], [tensors[n] for n in names[lead:]])


def additive_causal_mask(mask_2d: torch.Tensor, seq_len, dtype) -> torch.Tensor:
    """[B, T] 0/1 padding mask -> [B, 1, S, T] additive mask for the last S query positions."""
    total = mask_2d.shape[1]
    k = torch.arange(total, device=mask_2d.device)
    q = k[-seq_len:] if isinstance(seq_len, int) else torch.arange(total - seq_len, total, device=mask_2d.device)
    allowed = (k[None, :] <= q[:, None])[None, None] & mask_2d[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def uses_sliding_window(model) -> bool:
    cfg = text_config(model.config)
    types = getattr(cfg, "layer_types", None) or []
    return any("sliding" in t for t in types) or (
        getattr(cfg, "sliding_window", None) is not None and cfg.model_type in ("gemma2", "gemma3_text")
    )


def export_decoder(model, kv: KVSpec, cfg: ExportConfig, out_file: Path) -> tuple[Graph, set[str]]:
    """Export `model` to `out_file` (+ `model.onnx.data` when large).

    Returns the graph entry and the names of the model parameters the exported graph reads."""
    vocab = text_config(model.config).vocab_size
    inputs, outputs = io_spec(kv, vocab, cfg, takes_position_ids(model))
    # TorchScript cannot trace transformers 4.5x's vmap mask builder; build the mask in the
    # wrapper (sliding-window models keep transformers' per-layer masks: not needed on 5.x).
    mask_4d = cfg.exporter == "torchscript" and not uses_sliding_window(model) and takes_position_ids(model)
    wrapper = flat_cache_wrapper(model, kv, cfg.kv_layout, mask_4d)
    example = feeds(inputs, TRACE_CASE.sizes, vocab_size=vocab)
    args = wrapper_args(inputs, {k: torch.from_numpy(v) for k, v in example.items()})
    used, applied = export_graph(wrapper, args, inputs, outputs, out_file, cfg.exporter, cfg.opset,
                                 cfg.external_data_threshold_bytes, param_prefix=WRAPPER_PREFIX)
    graph = Graph("decoder", out_file.name, inputs, outputs, part="decoder", exporter=cfg.exporter, opset=cfg.opset,
                  patches=applied)
    return graph, used
