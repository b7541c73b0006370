"""Complex spectra built in the model (`torch.polar(mag, phase)`, `torch.complex(re, im)`) and
inverted with `torch.fft.irfft` (Xcodec2 / Vocos "same"-padding ISTFT heads): the TorchScript
exporter has no complex dtype (`aten::polar` unsupported). Rewrite: these functions return /
accept a `RealPair` (real and imaginary parts as two real tensors) and irfft becomes a matmul
with the inverse DFT bases. The dynamo exporter represents complex values itself, so this
applies to TorchScript only."""

from __future__ import annotations

import torch

from onnxport.patches import Patch, register_patch
from onnxport.patches._dft import RealPair, irfft_frames, split_complex, stft_real
from onnxport.patches._scan import source_matches, swap_attributes


def polar(abs, angle):  # noqa: A002 - torch's argument names
    return RealPair(abs * torch.cos(angle), abs * torch.sin(angle))


def complex_(real, imag):
    return RealPair(real, imag)


def irfft(input, n=None, dim=-1, norm=None):  # noqa: A002
    real, imag = split_complex(input)
    real, imag = real.transpose(dim, -1), imag.transpose(dim, -1)
    n = n or 2 * (real.shape[-1] - 1)
    out = irfft_frames(real, imag, n)
    if norm == "ortho":
        out = out * (n ** 0.5)
    elif norm == "forward":
        out = out * n
    return out.transpose(dim, -1)


def rfft(input, n=None, dim=-1, norm=None):  # noqa: A002
    x = input.transpose(dim, -1)
    n = n or x.shape[-1]
    lead = x.shape[:-1]
    spec = stft_real(x.reshape(-1, x.shape[-1]), n, hop_length=n, center=False)  # one frame = rfft
    real, imag = spec.real[..., 0].reshape(*lead, -1), spec.imag[..., 0].reshape(*lead, -1)
    scale = {None: 1.0, "backward": 1.0, "ortho": n ** -0.5, "forward": 1.0 / n}[norm]
    return RealPair(real * scale, imag * scale).transpose(dim, -1)


def view_as_real(input):  # noqa: A002
    real, imag = split_complex(input)
    return torch.stack([real, imag], dim=-1)


@register_patch
class ComplexAsRealPair(Patch):
    name = "complex_as_real_pair"
    description = "torch.polar / torch.complex / torch.fft.rfft|irfft / view_as_real -> real-imag pairs + DFT matmuls"
    exporters = ("torchscript",)

    def applies(self, module) -> bool:
        return source_matches(module, r"torch\.(polar|complex|view_as_real)\(|fft\.(irfft|rfft)\(")

    def patched(self, module=None):
        return swap_attributes([(torch, "polar", polar), (torch, "complex", complex_), (torch, "view_as_real", view_as_real),
                                (torch.fft, "irfft", irfft), (torch.fft, "rfft", rfft)])
