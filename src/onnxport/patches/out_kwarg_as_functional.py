"""Ops called with `out=` (e.g. `torch.mul(a, b, out=buf)` in ChatTTS / MiniCPM-o TTS) make the TorchScript
exporter fail (`mul() takes 3 positional arguments but 4 were given`). Rewrite: compute the functional result and
write it into `out` with fill_(0).add_(result), which the exporter turns into plain dataflow."""

from __future__ import annotations

import functools

import torch

from onnxport.patches import Patch, register_patch
from onnxport.patches._scan import source_matches, swap_attributes

OPS = ("mul", "add", "sub", "div", "matmul", "bmm", "mm", "cat", "stack", "exp", "tanh", "sigmoid",
       "clamp", "sum", "mean", "cumsum", "gather", "index_select", "where")


def _functional(op):
    @functools.wraps(op)
    def wrapper(*args, out=None, **kwargs):
        result = op(*args, **kwargs)
        if out is None:
            return result
        if out.shape != result.shape:
            out.resize_(result.shape)
        # `copy_` becomes `aten::copy`, which has no ONNX symbolic; fill + add_ are exported as
        # plain dataflow (and fill_ first makes the result independent of out's old contents).
        out.fill_(0).add_(result)
        return out

    return wrapper


@register_patch
class OutKwargAsFunctional(Patch):
    name = "out_kwarg_as_functional"
    description = "torch.<op>(..., out=t) -> t.fill_(0).add_(torch.<op>(...))"
    exporters = ("torchscript",)

    def applies(self, module) -> bool:
        return source_matches(module, r"torch\.(" + "|".join(OPS) + r")\([^)]*\bout\s*=")

    def patched(self, module=None):
        return swap_attributes([(torch, name, _functional(getattr(torch, name))) for name in OPS])
