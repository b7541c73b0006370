"""Variable-length ("packed") attention driven by `cu_seqlens` (Qwen2.5-VL vision windows,
Qwen2.5-Omni audio chunks, MiniCPM-V 4.6 ViT). Without flash-attention, transformers splits
q/k/v with `torch.split(x, lengths.tolist())` and loops over the pieces: data-dependent sizes
that neither exporter can trace into a graph valid for other inputs.

Rewrite: route the module through transformers' own flash branch (an attention implementation
whose name contains "flash" is what selects it) and register an implementation that computes ONE
masked attention over the whole packed sequence. What arrives as `cu_seq_lens_q` is either
- a float tensor [1, 1, S, S]: an additive block-diagonal mask computed OUTSIDE the graph (by the
  runtime, `onnxport.runtime.preprocess.block_diagonal_mask`) and passed in as a graph input, or
- the int `cu_seqlens` itself: the same mask is then built in-graph from tensor arithmetic
  (segment id of each position = how many boundaries it has passed), no `.tolist()`.
Masked keys get -inf before softmax, so every row equals the per-chunk softmax of the original.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from onnxport.patches import Patch, register_patch

IMPLEMENTATION = "onnxport_flash_as_block_mask"


def block_diagonal_from_cu_seqlens(cu_seqlens: torch.Tensor, length, dtype) -> torch.Tensor:
    """Additive mask [1, 1, S, S]: 0 inside a segment, dtype-min across segments."""
    pos = torch.arange(length, device=cu_seqlens.device)
    segment = (pos.unsqueeze(-1) >= cu_seqlens[1:].to(pos.dtype).unsqueeze(0)).sum(-1)
    same = segment.unsqueeze(-1) == segment.unsqueeze(0)
    zero = torch.zeros((), dtype=dtype)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(same, zero, neg)[None, None]


def block_mask_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                         cu_seq_lens_q=None, is_causal=False, **kwargs):
    """transformers attention-interface signature; q/k/v are [B, H, S, D]. Returns [B, S, H, D]."""
    mask = cu_seq_lens_q if cu_seq_lens_q is not None else attention_mask
    if mask is not None and not mask.is_floating_point():
        mask = block_diagonal_from_cu_seqlens(mask, query.shape[-2], query.dtype)
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def varlen_modules(module) -> list:
    """Submodules whose forward takes `cu_seqlens` and that carry a transformers config."""
    out = []
    for m in module.modules():
        try:
            params = inspect.signature(type(m).forward).parameters
        except (TypeError, ValueError):
            continue
        if "cu_seqlens" in params and hasattr(m, "config"):
            out.append(m)
    return out


@register_patch
class VarlenAttentionAsMask(Patch):
    name = "varlen_attention_as_mask"
    description = "cu_seqlens packed attention (split by lengths.tolist()) -> one attention with a block-diagonal mask"
    exporters = ("dynamo", "torchscript")

    def applies(self, module) -> bool:
        return bool(varlen_modules(module))

    @contextlib.contextmanager
    def patched(self, module=None):
        from transformers import AttentionInterface

        AttentionInterface.register(IMPLEMENTATION, block_mask_attention)
        configs = {id(m.config): m.config for m in varlen_modules(module)} if module is not None else {}
        saved = {k: c._attn_implementation_internal for k, c in configs.items()}
        for c in configs.values():
            c._attn_implementation_internal = IMPLEMENTATION
        try:
            yield
        finally:
            for k, c in configs.items():
                c._attn_implementation_internal = saved[k]
