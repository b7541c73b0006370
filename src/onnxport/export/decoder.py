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

import logging
from pathlib import Path

import torch

from onnxport.config import ExportConfig
from onnxport.export.compat import build_dynamic_cache, cache_pairs, text_config
from onnxport.export.graph import export_graph
from onnxport.recipes.base import KVSpec
from onnxport.verify.inputs import ShapeCase, decoder_feeds

log = logging.getLogger(__name__)

# Example sizes for tracing: all distinct and > 1 so that no dynamic dim is specialised or
# unified with another by the exporter (torch.export specialises sizes 0 and 1).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
WRAPPER_PREFIX = "model."  # FlatCacheDecoder.model


def kv_names(num_layers: int, naming: str) -> tuple[list[str], list[str]]:
    """Flat past (input) and present (output) names, key before value, layer by layer."""
    past, present = [], []
    for i in range(num_layers):
        if naming == "seed":
            past += [f"past_key_in{i}", f"past_value_in{i}"]
            present += [f"past_key{i}", f"past_value{i}"]
        else:
            past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            present += [f"present.{i}.key", f"present.{i}.value"]
    return past, present


def kv_dims(kv: KVSpec, layout: str, seq_dim: str) -> list:
    if layout == "bshd":
        return ["batch_size", seq_dim, kv.num_kv_heads, kv.head_dim]
    return ["batch_size", kv.num_kv_heads, seq_dim, kv.head_dim]


def io_spec(kv: KVSpec, vocab_size: int, cfg: ExportConfig) -> dict:
    """The manifest's description of the graph's inputs and outputs."""
    past, present = kv_names(kv.num_layers, cfg.kv_naming)
    inputs = [
        {"name": "input_ids", "dtype": "int64", "dims": ["batch_size", "sequence_length"]},
        {"name": "attention_mask", "dtype": "int64", "dims": ["batch_size", "total_sequence_length"]},
        {"name": "position_ids", "dtype": "int64", "dims": ["batch_size", "sequence_length"]},
    ] + [
        {"name": n, "dtype": cfg.dtype, "dims": kv_dims(kv, cfg.kv_layout, "past_sequence_length")}
        for n in past
    ]
    outputs = [
        {"name": "logits", "dtype": cfg.dtype, "dims": ["batch_size", "sequence_length", vocab_size]}
    ] + [
        {"name": n, "dtype": cfg.dtype, "dims": kv_dims(kv, cfg.kv_layout, "total_sequence_length")}
        for n in present
    ]
    return {"inputs": inputs, "outputs": outputs}


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

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        pairs = []
        for i in range(self.num_layers):
            k, v = past_key_values[2 * i], past_key_values[2 * i + 1]
            if self.bshd:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            pairs.append((k, v))
        if self.mask_4d:
            attention_mask = additive_causal_mask(attention_mask, input_ids.shape[1], self.model.dtype)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=build_dynamic_cache(pairs),
            use_cache=True,
            return_dict=True,
        )
        flat = [out.logits]
        for k, v in cache_pairs(out.past_key_values):
            if self.bshd:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            flat += [k, v]
        return tuple(flat)


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


def export_decoder(model, kv: KVSpec, cfg: ExportConfig, out_file: Path) -> tuple[dict, set[str]]:
    """Export `model` to `out_file` (+ `model.onnx.data` when large).

    Returns the I/O spec and the names of the model parameters the exported graph consumes."""
    vocab = text_config(model.config).vocab_size
    spec = io_spec(kv, vocab, cfg)
    # TorchScript cannot trace transformers 4.5x's vmap mask builder; build the mask in the
    # wrapper (sliding-window models keep transformers' per-layer masks: not needed on 5.x).
    mask_4d = cfg.exporter == "torchscript" and not uses_sliding_window(model)
    wrapper = FlatCacheDecoder(model, kv.num_layers, cfg.kv_layout, mask_4d=mask_4d).eval()
    feeds = decoder_feeds(spec, ShapeCase(EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST), vocab)
    tensors = [torch.from_numpy(feeds[i["name"]]) for i in spec["inputs"]]
    args = (tensors[0], tensors[1], tensors[2], tensors[3:])
    used, applied = export_graph(wrapper, args, spec["inputs"], spec["outputs"], out_file, cfg.exporter, cfg.opset,
                                 cfg.external_data_threshold_bytes, param_prefix=WRAPPER_PREFIX)
    return {**spec, "patches": applied}, used
