"""Every rewrite, three proofs: (1) eager output with the rewrite equals the original op,
(2) the module exports with the exporter that failed before (TorchScript; asserted to fail
without the rewrite), (3) ONNX Runtime output equals PyTorch within fp32 tolerance 1e-5."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from onnxport.patches import all_patches, apply_patches

ATOL = 1e-5  # fp32, same math on both sides; only reduction order differs


class PadSeq(torch.nn.Module):
    def forward(self, x):
        parts = torch.split(x, [3, 5, 2], dim=0)
        return pad_sequence(parts, batch_first=True, padding_value=-1.0) * 2


class OutKwarg(torch.nn.Module):
    def forward(self, a, b):
        buf = torch.empty_like(a)
        torch.mul(a, b, out=buf)
        return buf + 1


class GqaSdpa(torch.nn.Module):
    def forward(self, q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3, enable_gqa=True)


g = torch.Generator().manual_seed(0)
CASES = {
    "pad_sequence_as_stack": (PadSeq(), (torch.randn(10, 4, generator=g),)),
    "out_kwarg_as_functional": (OutKwarg(), (torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g))),
    "sdpa_as_matmul": (GqaSdpa(), (torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g),
                                  torch.randn(1, 2, 5, 8, generator=g), torch.rand(5, 5, generator=g) > 0.3)),
}


def test_every_registered_patch_has_a_case():
    assert set(all_patches()) == set(CASES)


def _torchscript(module, args) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=17)
    return buf.getvalue()


@pytest.mark.parametrize("name", list(CASES))
def test_patch_three_proofs(name):
    module, args = CASES[name]
    patch = all_patches()[name]()
    assert patch.applies(module)
    expected = module(*args)
    with pytest.raises(Exception):  # noqa: B017 - the exporters raise various types
        _torchscript(module, args)
    with apply_patches(module, "torchscript") as applied:
        assert name in applied
        eager = module(*args)
        onnx_bytes = _torchscript(module, args)
    torch.testing.assert_close(eager, expected, rtol=0, atol=ATOL)  # proof 1
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])  # proof 2
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=ATOL)  # proof 3
    # restored afterwards
    with pytest.raises(Exception):  # noqa: B017
        _torchscript(module, args)


def test_patches_do_not_apply_to_unrelated_modules():
    lin = torch.nn.Linear(3, 3)
    for cls in all_patches().values():
        assert not cls().applies(lin)
