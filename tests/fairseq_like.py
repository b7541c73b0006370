"""A fairseq-style encoder (the HuBERT / wav2vec 2.0 code path that pads to a multiple of
`required_seq_len_multiple` before self-attention), written here because fairseq itself does not
install on current Python. `pad_to_multiple` follows fairseq/models/wav2vec/utils.py (MIT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pad_to_multiple(x, multiple, dim=-1, value=0):
    # Inspired from https://github.com/lucidrains/local-attention/blob/master/local_attention/local_attention.py#L41
    if x is None:
        return None, 0
    tsz = x.size(dim)
    m = tsz / multiple
    remainder = math.ceil(m) * multiple - tsz
    if m.is_integer():
        return x, 0
    pad_offset = (0,) * (-1 - dim) * 2
    return F.pad(x, (*pad_offset, 0, remainder), value=value), remainder


class TinyFairseqEncoder(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, multiple: int = 8):
        super().__init__()
        self.multiple = multiple
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.ffn = torch.nn.Linear(dim, dim)

    def forward(self, x, padding_mask):
        x, pad_length = pad_to_multiple(x, self.multiple, dim=-2, value=0)
        if pad_length > 0:
            padding_mask, _ = pad_to_multiple(padding_mask, self.multiple, dim=-1, value=True)
        keep = ~padding_mask
        bias = torch.zeros(padding_mask.shape, dtype=x.dtype).masked_fill(padding_mask, float("-inf"))
        b, t, dim = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads) + bias[:, None, None, :]
        h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, dim)
        x = (x + h) * keep.unsqueeze(-1)
        x = x + self.ffn(x)
        if pad_length > 0:
            x = x[:, :-pad_length]
        return x
