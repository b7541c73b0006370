"""Real-valued DFT building blocks shared by the stft / istft / complex rewrites.

ONNX graphs (and NPU compilers) have no complex tensors; the TorchScript exporter rejects them
outright and the dynamo exporter's istft graph fails to load in ONNX Runtime (torch 2.13). A
complex spectrum is carried here as a `RealPair` (real, imag) of ordinary tensors, the DFT is a
conv / matmul with cos/sin bases, and overlap-add is a transposed convolution. Window handling,
centering, normalization and the envelope division follow torch.stft / torch.istft exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RealPair:
    """A complex tensor as two real tensors. Supports what spectral code uses between building a
    spectrum and inverting it; anything else fails loudly (never silently drops the imaginary
    part)."""

    def __init__(self, real: torch.Tensor, imag: torch.Tensor):
        self.real, self.imag = real, imag

    @property
    def shape(self):
        return self.real.shape

    def size(self, dim=None):
        return self.real.size() if dim is None else self.real.size(dim)

    def dim(self):
        return self.real.dim()

    @property
    def dtype(self):
        return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(self.real.dtype, torch.complex64)

    @property
    def device(self):
        return self.real.device

    def abs(self):
        return torch.sqrt(self.real * self.real + self.imag * self.imag)

    def angle(self):
        return torch.atan2(self.imag, self.real)

    def conj(self):
        return RealPair(self.real, -self.imag)

    def _map(self, fn):
        return RealPair(fn(self.real), fn(self.imag))

    def __getitem__(self, idx):
        return self._map(lambda t: t[idx])

    def transpose(self, a, b):
        return self._map(lambda t: t.transpose(a, b))

    def permute(self, *dims):
        return self._map(lambda t: t.permute(*dims))

    def reshape(self, *shape):
        return self._map(lambda t: t.reshape(*shape))

    def unsqueeze(self, d):
        return self._map(lambda t: t.unsqueeze(d))

    def squeeze(self, *d):
        return self._map(lambda t: t.squeeze(*d))

    def to(self, *args, **kwargs):
        return self

    def contiguous(self):
        return self

    def __mul__(self, other):
        if isinstance(other, RealPair):
            return RealPair(self.real * other.real - self.imag * other.imag,
                            self.real * other.imag + self.imag * other.real)
        return RealPair(self.real * other, self.imag * other)

    __rmul__ = __mul__

    def __add__(self, other):
        if isinstance(other, RealPair):
            return RealPair(self.real + other.real, self.imag + other.imag)
        return RealPair(self.real + other, self.imag)

    def __getattr__(self, name):
        raise AttributeError(
            f"complex op {name!r} is not covered by onnxport's real-valued complex rewrite; "
            "add it to onnxport/patches/_dft.py RealPair"
        )


def split_complex(spec) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(spec, RealPair):
        return spec.real, spec.imag
    if torch.is_tensor(spec) and spec.is_complex():
        return spec.real, spec.imag
    if torch.is_tensor(spec) and spec.shape[-1] == 2:  # view_as_real layout
        return spec[..., 0], spec[..., 1]
    raise TypeError(f"expected a complex spectrum, got {type(spec).__name__}")


def _full_window(window, n_fft: int, win_length: int | None, dtype, device) -> torch.Tensor:
    win_length = win_length or n_fft
    if window is None:
        window = torch.ones(win_length, dtype=dtype, device=device)
    if window.shape[0] < n_fft:  # torch centers a shorter window in the n_fft frame
        left = (n_fft - window.shape[0]) // 2
        window = F.pad(window, (left, n_fft - window.shape[0] - left))
    return window.to(dtype)


def dft_bases(n_fft: int, onesided: bool, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / -sin bases [freqs, n_fft] of the forward DFT (computed in float64, then cast)."""
    freqs = n_fft // 2 + 1 if onesided else n_fft
    k = torch.arange(freqs, dtype=torch.float64, device=device)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64, device=device)[None, :]
    ang = 2 * math.pi * k * n / n_fft
    return torch.cos(ang).to(dtype), (-torch.sin(ang)).to(dtype)


def stft_real(x, n_fft, hop_length=None, win_length=None, window=None, center=True, pad_mode="reflect",
              normalized=False, onesided=None) -> RealPair:
    """torch.stft(x, ..., return_complex=True) as a RealPair [(B,) freqs, frames]."""
    hop_length = hop_length or n_fft // 4
    onesided = True if onesided is None else onesided
    squeeze = x.dim() == 1
    x = x.unsqueeze(0) if squeeze else x
    w = _full_window(window, n_fft, win_length, x.dtype, x.device)
    if center:
        x = F.pad(x.unsqueeze(1), (n_fft // 2, n_fft // 2), mode=pad_mode).squeeze(1)
    cos, sin = dft_bases(n_fft, onesided, x.dtype, x.device)
    kernel = torch.cat([cos * w, sin * w], dim=0).unsqueeze(1)  # [2F, 1, n_fft]
    out = F.conv1d(x.unsqueeze(1), kernel, stride=hop_length)  # [B, 2F, frames]
    real, imag = out.chunk(2, dim=1)
    if normalized:
        real, imag = real / math.sqrt(n_fft), imag / math.sqrt(n_fft)
    if squeeze:
        real, imag = real[0], imag[0]
    return RealPair(real, imag)


def irfft_frames(real: torch.Tensor, imag: torch.Tensor, n: int) -> torch.Tensor:
    """torch.fft.irfft(complex(real, imag), n, dim=-1, norm="backward") with freqs on the last
    axis: a matmul with the inverse bases. Like irfft, the imaginary parts of the DC and (even n)
    Nyquist bins are ignored and missing bins count as zero."""
    freqs = n // 2 + 1
    if real.shape[-1] != freqs:
        real, imag = _fit_last(real, freqs), _fit_last(imag, freqs)
    k = torch.arange(freqs, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * k * t / n
    scale = torch.full((freqs, 1), 2.0, dtype=torch.float64)
    scale[0] = 1.0
    if n % 2 == 0:
        scale[-1] = 1.0
    cos = (torch.cos(ang) * scale / n).to(real.dtype)
    sin = (-torch.sin(ang) * scale / n).to(real.dtype)
    if n % 2 == 0:
        sin[-1] = 0.0
    sin[0] = 0.0
    return torch.matmul(real, cos) + torch.matmul(imag, sin)


def _fit_last(t: torch.Tensor, size: int) -> torch.Tensor:
    have = t.shape[-1]
    return t[..., :size] if have >= size else F.pad(t, (0, size - have))


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """frames [B, n_fft, num_frames] -> signal [B, (num_frames - 1) * hop + n_fft]."""
    n_fft = int(frames.shape[1])  # static, or TorchScript sees a kernel of unknown shape
    eye = torch.eye(n_fft, dtype=frames.dtype, device=frames.device).unsqueeze(1)  # [n_fft, 1, n_fft]
    return F.conv_transpose1d(frames, eye, stride=hop).squeeze(1)


def istft_real(spec, n_fft, hop_length=None, win_length=None, window=None, center=True, normalized=False,
               onesided=None, length=None, return_complex=False) -> torch.Tensor:
    """torch.istft for a complex spectrum [(B,) freqs, frames] given as RealPair / complex tensor."""
    if return_complex:
        raise NotImplementedError("istft(return_complex=True) has no real-valued rewrite")
    real, imag = split_complex(spec)
    hop_length = hop_length or (win_length or n_fft) // 4
    squeeze = real.dim() == 2
    if squeeze:
        real, imag = real.unsqueeze(0), imag.unsqueeze(0)
    w = _full_window(window, n_fft, win_length, real.dtype, real.device)
    frames = irfft_frames(real.transpose(1, 2), imag.transpose(1, 2), n_fft)  # [B, frames, n_fft]
    if normalized:
        frames = frames * math.sqrt(n_fft)
    frames = (frames * w).transpose(1, 2)  # [B, n_fft, frames]
    num_frames = frames.shape[-1]
    y = overlap_add(frames, hop_length)
    envelope = overlap_add((w * w)[None, :, None].expand(1, n_fft, num_frames), hop_length)
    start = n_fft // 2 if center else 0
    if length is not None:
        end = start + length
    else:
        end = y.shape[-1] - (n_fft // 2 if center else 0)
    if length is not None and end > y.shape[-1]:
        y = F.pad(y, (0, end - y.shape[-1]))
        envelope = F.pad(envelope, (0, end - envelope.shape[-1]), value=1.0)
    y = y[:, start:end] / torch.where(envelope[:, start:end] > 1e-11, envelope[:, start:end],
                                      torch.ones_like(envelope[:, start:end]))
    return y[0] if squeeze else y
