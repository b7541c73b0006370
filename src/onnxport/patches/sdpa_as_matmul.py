"""`F.scaled_dot_product_attention` variants the exporters mishandle (`enable_gqa=True`, boolean
masks, `scale=`, `is_causal` with a mask). Rewrite: explicit matmul / softmax with torch's own
semantics (repeat_interleave for GQA; bool mask = keep where True; causal = tril over [L, S])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxport.patches import Patch, register_patch
from onnxport.patches._scan import source_matches, swap_everywhere

ORIGINAL = F.scaled_dot_product_attention


def sdpa_as_matmul(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    L, S = query.shape[-2], key.shape[-2]
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    neg = torch.finfo(scores.dtype).min
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, neg)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, neg)
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


@register_patch
class SdpaAsMatmul(Patch):
    name = "sdpa_as_matmul"
    description = "F.scaled_dot_product_attention(enable_gqa/bool mask/scale) -> matmul + softmax"
    exporters = ("torchscript",)

    def applies(self, module) -> bool:
        return source_matches(module, r"scaled_dot_product_attention\(")

    def patched(self, module=None):
        return swap_everywhere(ORIGINAL, sdpa_as_matmul)
