"""`torch.nn.utils.rnn.pad_sequence` has no ONNX symbolic in the TorchScript exporter
(MiniCPM-V resampler, Qwen2.5-Omni audio after split-by-lengths). Rewrite: pad each sequence with
F.pad to the longest and stack, which both exporters handle. Same values, dtype and layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxport.patches import Patch, register_patch
from onnxport.patches._scan import globals_bound_to, swap_everywhere

ORIGINAL = torch.nn.utils.rnn.pad_sequence


def pad_sequence_as_stack(sequences, batch_first: bool = False, padding_value: float = 0.0,
                          padding_side: str = "right"):
    sequences = list(sequences)
    longest = max(s.shape[0] for s in sequences)
    padded = []
    for s in sequences:
        extra = longest - s.shape[0]
        spec = [0, 0] * (s.dim() - 1) + ([0, extra] if padding_side == "right" else [extra, 0])
        padded.append(F.pad(s, spec, value=padding_value))
    out = torch.stack(padded, dim=0)
    return out if batch_first else out.transpose(0, 1)


@register_patch
class PadSequenceAsStack(Patch):
    name = "pad_sequence_as_stack"
    description = "torch.nn.utils.rnn.pad_sequence -> F.pad + stack"
    exporters = ("torchscript",)

    def applies(self, module) -> bool:
        return bool(globals_bound_to(module, ORIGINAL)) or _uses_rnn_module(module)

    def patched(self, module=None):
        return swap_everywhere(ORIGINAL, pad_sequence_as_stack)


def _uses_rnn_module(module) -> bool:
    from onnxport.patches._scan import source_matches

    return source_matches(module, r"\bpad_sequence\s*\(")
