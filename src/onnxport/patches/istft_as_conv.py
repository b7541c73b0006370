"""`torch.istft` (Vocos / Xcodec2-style ISTFT heads, ChatTTS vocoder) takes a complex spectrum.
The TorchScript exporter rejects complex tensors; the dynamo exporter (torch 2.13) writes an
istft graph that ONNX Runtime refuses to load (ScatterND with an int32 index). Rewrite: inverse
real DFT as a matmul, window, overlap-add as a transposed convolution, division by the summed
squared window (the NOLA envelope) and center/length trimming, exactly as torch.istft does."""

from __future__ import annotations

import torch

from onnxport.patches import Patch, register_patch
from onnxport.patches._dft import istft_real
from onnxport.patches._scan import source_matches, swap_attributes


@register_patch
class IstftAsConv(Patch):
    name = "istft_as_conv"
    description = "torch.istft -> real inverse DFT (matmul) + overlap-add (conv_transpose1d) + window envelope"
    exporters = ("dynamo", "torchscript")

    def applies(self, module) -> bool:
        return source_matches(module, r"\bistft\(")

    def patched(self, module=None):
        return swap_attributes([(torch, "istft", istft_real)])
