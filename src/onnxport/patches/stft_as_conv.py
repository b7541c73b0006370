"""`torch.stft(..., return_complex=True)` (log-mel front ends, spectral losses, codec encoders)
has no TorchScript export for complex outputs. Rewrite: the DFT as a strided conv1d whose kernel
is the cos/sin basis times the window, centered with the same pad mode; the spectrum is returned
as a real/imag pair (`.abs()`, slicing, `torch.view_as_real` work on it). The dynamo exporter
handles torch.stft itself, so this applies to TorchScript only."""

from __future__ import annotations

import torch

from onnxport.patches import Patch, register_patch
from onnxport.patches._dft import stft_real
from onnxport.patches._scan import source_matches, swap_attributes


def stft_as_conv(input, n_fft, hop_length=None, win_length=None, window=None, center=True, pad_mode="reflect",
                 normalized=False, onesided=None, return_complex=None, align_to_window=None):
    spec = stft_real(input, n_fft, hop_length, win_length, window, center, pad_mode, normalized, onesided)
    if return_complex:
        return spec
    return torch.stack([spec.real, spec.imag], dim=-1)


@register_patch
class StftAsConv(Patch):
    name = "stft_as_conv"
    description = "torch.stft -> conv1d with a windowed DFT kernel (real/imag pair)"
    exporters = ("torchscript",)

    def applies(self, module) -> bool:
        return source_matches(module, r"torch\.stft\(")

    def patched(self, module=None):
        return swap_attributes([(torch, "stft", stft_as_conv)])
