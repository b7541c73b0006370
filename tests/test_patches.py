"""Every rewrite, three proofs: (1) eager output with the rewrite equals the original op,
(2) the module exports with the exporter that failed before (asserted to fail without the
rewrite, or to give a graph that is wrong at another input size), (3) ONNX Runtime output equals
PyTorch within the tolerance written here, at the export size and at another size."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from fairseq_like import TinyFairseqEncoder
from torch.nn.utils.rnn import pad_sequence

from onnxport.patches import all_patches, apply_patches

ATOL = 1e-5  # fp32, same math on both sides; only reduction order differs
#: DFT as matmul/conv vs FFT: sums of n_fft products in a different order (values ~10)
ATOL_DFT = 5e-5


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


class LogSpec(torch.nn.Module):
    """A log-magnitude spectrogram front end (torch.stft, complex output)."""

    def forward(self, x):
        spec = torch.stft(x, 64, 16, window=torch.hann_window(64), return_complex=True)
        return torch.log(spec.abs() + 1e-3)


class IstftHead(torch.nn.Module):
    """Vocos ISTFTHead with center padding: magnitude/phase -> polar -> torch.istft."""

    def forward(self, mag, phase):
        return torch.istft(torch.polar(torch.exp(mag), phase), 32, 8, window=torch.hann_window(32), center=True)


class SameIstftHead(torch.nn.Module):
    """Xcodec2 / Vocos "same"-padding head: polar -> irfft -> window -> F.fold overlap-add."""

    def forward(self, mag, phase):
        n_fft, hop = 32, 8
        frames = torch.fft.irfft(torch.polar(mag, phase), n_fft, dim=1) * torch.hann_window(n_fft)[None, :, None]
        size = (frames.shape[-1] - 1) * hop + n_fft
        return F.fold(frames, output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0, 12:-12]


g = torch.Generator().manual_seed(0)
# name -> (module, args at export size, args at another size or None)
CASES = {
    "pad_sequence_as_stack": (PadSeq(), (torch.randn(10, 4, generator=g),), None),
    "out_kwarg_as_functional": (OutKwarg(), (torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)),
                                (torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g))),
    "sdpa_as_matmul": (GqaSdpa(), (torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g),
                                  torch.randn(1, 2, 5, 8, generator=g), torch.rand(5, 5, generator=g) > 0.3), None),
    "stft_as_conv": (LogSpec(), (torch.randn(2, 800, generator=g),), (torch.randn(3, 555, generator=g),)),
    "complex_as_real_pair": (SameIstftHead(), (torch.rand(2, 17, 20, generator=g), torch.randn(2, 17, 20, generator=g)),
                             (torch.rand(1, 17, 31, generator=g), torch.randn(1, 17, 31, generator=g))),
    "fold_as_conv_transpose": (SameIstftHead(), (torch.rand(2, 17, 20, generator=g), torch.randn(2, 17, 20, generator=g)),
                               (torch.rand(1, 17, 31, generator=g), torch.randn(1, 17, 31, generator=g))),
    "istft_as_conv": (IstftHead(), (torch.randn(2, 17, 20, generator=g), torch.randn(2, 17, 20, generator=g)),
                      (torch.randn(1, 17, 33, generator=g), torch.randn(1, 17, 33, generator=g))),
}
ATOLS = {"stft_as_conv": ATOL_DFT, "istft_as_conv": ATOL_DFT, "complex_as_real_pair": ATOL_DFT,
         "fold_as_conv_transpose": ATOL_DFT}
#: rewrites proven by their own tests below (dynamo-side failures, model-level rewrites)
OWN_TESTS = {"varlen_attention_as_mask", "get_at_as_gather", "pad_to_multiple_as_identity"}


def test_every_registered_patch_has_a_case():
    assert set(all_patches()) == set(CASES) | OWN_TESTS


def _torchscript(module, args, dynamic: bool = False, opset: int = 17) -> bytes:
    buf = io.BytesIO()
    names = [f"in{i}" for i in range(len(args))]
    axes = {n: list(range(a.dim())) for n, a in zip(names, args)} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=names, dynamic_axes=axes)
    return buf.getvalue()


def _wrong_or_fails(onnx_bytes: bytes, args, expected) -> bool:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    try:
        got = sess.run(None, {i.name: args[int(i.name[2:])].numpy() for i in sess.get_inputs()})[0]
    except Exception:  # noqa: BLE001
        return True
    return got.shape != tuple(expected.shape) or np.abs(got - expected.detach().numpy()).max() > 1e-2


def _ort(onnx_bytes: bytes, args) -> np.ndarray:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]


@pytest.mark.parametrize("name", list(CASES))
def test_patch_three_proofs(name):
    module, args, other = CASES[name]
    atol = ATOLS.get(name, ATOL)
    patch = all_patches()[name]()
    assert patch.applies(module)
    expected = module(*args)
    with pytest.raises(Exception):  # noqa: B017 - the exporters raise various types
        _torchscript(module, args, dynamic=other is not None)
    with apply_patches(module, "torchscript") as applied:
        assert name in applied
        eager = module(*args)
        onnx_bytes = _torchscript(module, args, dynamic=other is not None)
    torch.testing.assert_close(eager, expected, rtol=0, atol=atol)  # proof 1
    np.testing.assert_allclose(_ort(onnx_bytes, args), expected.numpy(), rtol=0, atol=atol)  # proofs 2, 3
    if other is not None:  # the graph is right at another size too
        np.testing.assert_allclose(_ort(onnx_bytes, other), module(*other).numpy(), rtol=0, atol=atol)
    with pytest.raises(Exception):  # noqa: B017 - restored afterwards
        _torchscript(module, args, dynamic=other is not None)


def test_istft_dynamo_graph_is_invalid_without_the_rewrite_and_right_with_it():
    module, args, other = CASES["istft_as_conv"]
    prog = torch.onnx.export(module, args, dynamo=True, opset_version=18,
                             dynamic_shapes=[{0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC}] * 2)
    with pytest.raises(Exception, match="ScatterND|INVALID_GRAPH"):
        _ort(prog.model_proto.SerializeToString(), args)
    with apply_patches(module, "dynamo") as applied:
        assert applied == ["istft_as_conv"]
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=18,
                                 dynamic_shapes=[{0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC}] * 2)
    onnx_bytes = prog.model_proto.SerializeToString()
    for a in (args, other):
        np.testing.assert_allclose(_ort(onnx_bytes, a), module(*a).numpy(), rtol=0, atol=ATOL_DFT)


def test_dft_helpers_match_torch_for_stft_options():
    from onnxport.patches._dft import istft_real, stft_real

    x = torch.randn(2, 1000, generator=g)
    for n_fft, hop, win_length, center, normalized in [(64, 16, None, True, False), (64, 16, 48, True, True),
                                                       (32, 8, None, False, False), (30, 7, 30, True, False)]:
        window = torch.hann_window(win_length or n_fft)
        ref = torch.stft(x, n_fft, hop, win_length=win_length, window=window, center=center, normalized=normalized,
                         return_complex=True)
        got = stft_real(x, n_fft, hop, win_length, window, center, "reflect", normalized)
        torch.testing.assert_close(got.real, ref.real, rtol=0, atol=ATOL_DFT)
        torch.testing.assert_close(got.imag, ref.imag, rtol=0, atol=ATOL_DFT)
        if center:
            back = torch.istft(ref, n_fft, hop, win_length=win_length, window=window, center=True,
                               normalized=normalized, length=1000)
            mine = istft_real(got, n_fft, hop, win_length, window, True, normalized, length=1000)
            torch.testing.assert_close(mine, back, rtol=0, atol=ATOL_DFT)


# --- varlen attention (Qwen2.5-VL vision attention, the real transformers module) ---------------

def _vision_attention():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    cfg = Qwen2_5_VLConfig(vision_config=dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=64,
                                              out_hidden_size=32)).vision_config
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Qwen2_5_VLVisionAttention(cfg).eval()


class VarlenAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _vision_attention()

    def forward(self, x, cu_seqlens, cos, sin):
        return self.attn(x, cu_seqlens=cu_seqlens, position_embeddings=(cos, sin))


def _varlen_args(n, cuts):
    x = torch.randn(n, 32, generator=g)
    angles = torch.randn(n, 4, generator=g).repeat(1, 2)  # head_dim 8
    return x, torch.tensor([0, *cuts, n], dtype=torch.int32), angles.cos(), angles.sin()


def test_varlen_attention_as_mask_three_proofs():
    from onnxport.patches.varlen_attention_as_mask import block_diagonal_from_cu_seqlens
    from onnxport.runtime.preprocess import block_diagonal_mask

    module = VarlenAttention().eval()
    args, other = _varlen_args(12, [4, 9]), _varlen_args(20, [3, 11, 16])
    patch = all_patches()["varlen_attention_as_mask"]()
    assert patch.applies(module)
    expected = module(*args)
    dyn = torch.export.Dim.DYNAMIC
    shapes = [{0: dyn}, {0: dyn}, {0: dyn}, {0: dyn}]
    with pytest.raises(Exception):  # noqa: B017 - data-dependent split sizes
        torch.onnx.export(module, args, dynamo=True, opset_version=18, dynamic_shapes=shapes)
    ts = _torchscript(module, args, dynamic=True)  # TorchScript "succeeds" by baking the lengths in
    assert _wrong_or_fails(ts, other, module(*other))
    with apply_patches(module, "dynamo") as applied:
        assert applied == ["varlen_attention_as_mask"]
        eager = module(*args)
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=18, dynamic_shapes=shapes)
    torch.testing.assert_close(eager, expected, rtol=0, atol=ATOL)
    onnx_bytes = prog.model_proto.SerializeToString()
    for a in (args, other):
        np.testing.assert_allclose(_ort(onnx_bytes, a), module(*a).detach().numpy(), rtol=0, atol=ATOL)
    # the mask built in-graph equals the one the runtime computes outside the graph
    cu = other[1]
    np.testing.assert_array_equal(block_diagonal_from_cu_seqlens(cu, 20, torch.float32).numpy(),
                                  block_diagonal_mask(cu.numpy(), 20))
    assert module.attn.config._attn_implementation == "eager"  # restored


# --- GFSQ codebook lookup (vector-quantize-pytorch, the structure of ChatTTS' DVAE quantizer) ---

class GfsqEmbed(torch.nn.Module):
    """ChatTTS GFSQ._embed: codes [B, groups*levels, T] -> GroupedResidualFSQ output [B, dim, T]."""

    def __init__(self):
        super().__init__()
        from vector_quantize_pytorch import GroupedResidualFSQ

        self.quantizer = GroupedResidualFSQ(dim=32, levels=[5, 5, 5, 5], num_quantizers=2, groups=2)

    def forward(self, codes):
        b, _, t = codes.shape
        codes = codes.view(b, 2, 2, t).permute(1, 0, 3, 2)
        return self.quantizer.get_output_from_indices(codes).transpose(1, 2)


def test_get_at_as_gather_three_proofs():
    module = GfsqEmbed().eval()
    args, other = (torch.randint(0, 625, (2, 4, 13), generator=g),), (torch.randint(0, 625, (3, 4, 7), generator=g),)
    assert all_patches()["get_at_as_gather"]().applies(module)
    expected = module(*args)
    shapes = [{0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC}]
    with pytest.raises(Exception):  # noqa: B017 - einx/einops shape arithmetic in Python
        torch.onnx.export(module, args, dynamo=True, opset_version=18, dynamic_shapes=shapes)
    with pytest.raises(Exception):  # noqa: B017 - TorchScript baked the example's sizes
        _ort(_torchscript(module, args, dynamic=True), other)
    for exporter in ("dynamo", "torchscript"):
        with apply_patches(module, exporter) as applied:
            assert "get_at_as_gather" in applied
            eager = module(*args)
            if exporter == "dynamo":
                onnx_bytes = torch.onnx.export(module, args, dynamo=True, opset_version=18,
                                               dynamic_shapes=shapes).model_proto.SerializeToString()
            else:
                onnx_bytes = _torchscript(module, args, dynamic=True)
        torch.testing.assert_close(eager, expected, rtol=0, atol=0)
        for a in (args, other):
            np.testing.assert_allclose(_ort(onnx_bytes, a), module(*a).detach().numpy(), rtol=0, atol=ATOL)


# --- fairseq pad_to_multiple (HuBERT / wav2vec 2.0 data-dependent Python ints) ----------------

def test_pad_to_multiple_as_identity_three_proofs():
    torch.manual_seed(0)
    module = TinyFairseqEncoder().eval()

    def case(b, t):
        x = torch.randn(b, t, 32, generator=g)
        mask = torch.zeros(b, t, dtype=torch.bool)
        mask[-1, t - 3:] = True
        return x, mask

    args, other = case(2, 13), case(3, 21)  # neither length is a multiple of 8
    assert all_patches()["pad_to_multiple_as_identity"]().applies(module)
    with torch.no_grad():
        expected = module(*args)
    with pytest.raises(Exception, match="is_integer"):
        _torchscript(module, args, dynamic=True)
    for exporter in ("dynamo", "torchscript"):
        with torch.no_grad(), apply_patches(module, exporter) as applied:
            assert "pad_to_multiple_as_identity" in applied
            eager = module(*args)
            if exporter == "dynamo":
                onnx_bytes = torch.onnx.export(
                    module, args, dynamo=True, opset_version=18,
                    dynamic_shapes=[{0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}] * 2,
                ).model_proto.SerializeToString()
            else:
                onnx_bytes = _torchscript(module, args, dynamic=True)
        valid = ~args[1]
        torch.testing.assert_close(eager[valid], expected[valid], rtol=0, atol=ATOL)
        for a in (args, other):
            with torch.no_grad():
                ref = module(*a).numpy()
            got = _ort(onnx_bytes, a)
            keep = ~a[1].numpy()
            np.testing.assert_allclose(got[keep], ref[keep], rtol=0, atol=ATOL)


def test_patches_do_not_apply_to_unrelated_modules():
    lin = torch.nn.Linear(3, 3)
    for cls in all_patches().values():
        assert not cls().applies(lin)
