"""fairseq's `pad_to_multiple` (HuBERT / wav2vec 2.0 / data2vec encoders, `required_seq_len_multiple`)
decides in Python whether to pad: `m = x.size(dim) / multiple; if m.is_integer(): ...`. While
tracing, the size is a tensor, so TorchScript fails (`'Tensor' object has no attribute
'is_integer'`) and torch.export cannot branch on a symbolic length; the caller then strips the pad
with `if pad_length > 0: x = x[:, :-pad_length]`, another data-dependent branch.

The padding only rounds the length up for kernel efficiency: padded frames are masked out of
attention (key padding mask) and cut off afterwards, so they never change a valid frame. Rewrite:
pad nothing and report a pad length of 0 — both branches vanish and every valid output is
unchanged (the test proves equality against the original on lengths that need padding)."""

from __future__ import annotations

import contextlib
import inspect
import sys

from onnxport.patches import Patch, register_patch


def pad_to_multiple_as_identity(x, multiple, dim=-1, value=0):
    if x is None:
        return None, 0
    return x, 0


def _fairseq_style(fn) -> bool:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return "is_integer" in src or "math.ceil" in src


def _holders(module) -> list[tuple[object, str]]:
    from onnxport.patches._scan import code_modules

    out = []
    for mod in code_modules(module) + [m for n, m in list(sys.modules.items()) if n == "fairseq" or n.startswith("fairseq.")]:
        fn = getattr(mod, "pad_to_multiple", None)
        if callable(fn) and fn is not pad_to_multiple_as_identity and _fairseq_style(fn):
            out.append((mod, "pad_to_multiple"))
    return out


@register_patch
class PadToMultipleAsIdentity(Patch):
    name = "pad_to_multiple_as_identity"
    description = "fairseq pad_to_multiple (Python-int is_integer() branch) -> no padding (padded frames are masked anyway)"
    exporters = ("dynamo", "torchscript")

    def applies(self, module) -> bool:
        return bool(_holders(module))

    @contextlib.contextmanager
    def patched(self, module=None):
        holders = _holders(module) if module is not None else []
        saved = [(mod, k, getattr(mod, k)) for mod, k in holders]
        for mod, k in holders:
            setattr(mod, k, pad_to_multiple_as_identity)
        try:
            yield
        finally:
            for mod, k, fn in saved:
                setattr(mod, k, fn)
