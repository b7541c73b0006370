"""`F.fold` (col2im; the overlap-add of Vocos / Xcodec2 "same"-padding ISTFT heads) is ONNX Col2Im,
which exists only from opset 18: TorchScript exports for opset <= 17 (what many NPU compilers
take) fail with `aten::col2im ... not supported`. Rewrite: fold is a transposed convolution
with an identity kernel (each column scatters back to its patch, overlaps sum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxport.patches import Patch, register_patch
from onnxport.patches._scan import source_matches, swap_attributes


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def fold_as_conv_transpose(input, output_size, kernel_size, dilation=1, padding=0, stride=1):  # noqa: A002
    (oh, ow), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (output_size, kernel_size, dilation, padding, stride))
    squeeze = input.dim() == 2
    x = input.unsqueeze(0) if squeeze else input
    nh = (oh + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    nw = (ow + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    channels = int(x.shape[1]) // (kh * kw)  # static (a traced size would make the kernel shape unknown)
    x = x.reshape(x.shape[0], channels * kh * kw, nh, nw)
    eye = torch.eye(channels * kh * kw, dtype=x.dtype, device=x.device).reshape(channels * kh * kw, channels, kh, kw)
    full_h = (nh - 1) * sh + dh * (kh - 1) + 1
    full_w = (nw - 1) * sw + dw * (kw - 1) + 1
    y = F.conv_transpose2d(x, eye, stride=(sh, sw), dilation=(dh, dw))
    # positions past the last block are zero in fold; pad them in, then drop the padding margin
    y = F.pad(y, (0, ow + 2 * pw - full_w, 0, oh + 2 * ph - full_h))
    y = y[:, :, ph:ph + oh, pw:pw + ow]
    return y[0] if squeeze else y


@register_patch
class FoldAsConvTranspose(Patch):
    name = "fold_as_conv_transpose"
    description = "F.fold (Col2Im, opset >= 18 only) -> conv_transpose2d with an identity kernel"
    exporters = ("torchscript",)

    def applies(self, module) -> bool:
        return source_matches(module, r"\bfold\(")

    def patched(self, module=None):
        return swap_attributes([(F, "fold", fold_as_conv_transpose)])
