"""Encoder recipes: each tiny model is exported once (ExportConfig(exporter="auto")) and verified
by onnxport against PyTorch at >= 2 input sizes; these tests check what was recorded, re-run the
graphs through the torch-free runtime on sizes never used during export, and check the numpy
preprocessing against the transformers code it replaces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ENCODER_KINDS
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.config import VerifyConfig
from onnxport.runtime import EncoderRunner

ATOL = 1e-4  # fp32 encoders; observed max|diff| 1e-7 .. 4e-6
#: the named dims each encoder's graph must carry (inputs then outputs)
EXPECTED_DIMS = {
    "siglip": {"pixel_values": ["batch_size", 3, 32, 32], "last_hidden_state": ["batch_size", 16, 64]},
    "whisper": {"input_features": ["batch_size", 16, 100], "last_hidden_state": ["batch_size", 50, 64]},
    "hubert": {"input_values": ["batch_size", "audio_length"], "attention_mask": ["batch_size", "audio_length"],
               "last_hidden_state": ["batch_size", "num_frames", 64]},
    "wav2vec2-conformer": {"input_values": ["batch_size", "audio_length"],
                           "last_hidden_state": ["batch_size", "num_frames", 64]},
    "qwen2_5_vl": {"pixel_values": ["num_patches", 96], "window_index": ["num_merged_patches"],
                   "attention_mask": [1, 1, "num_patches", "num_patches"], "image_embeds": ["num_merged_patches", 48]},
    "qwen2_5_omni_audio_encoder": {"padded_feature": ["num_chunks", 16, "chunk_frames"],
                                   "attention_mask": [1, 1, "num_frames", "num_frames"],
                                   "audio_embeds": ["num_audio_tokens", 48]},
    "xcodec2": {"audio_codes": ["batch_size", 1, "num_codes"], "audio_values": ["batch_size", 1, "audio_length"]},
    "minicpmv4_6": {"pixel_values": [1, 3, 4, "num_patches_x_patch"], "window_index": ["num_patches"],
                    "vision_embeds": [1, "num_patches_div4", 64], "hidden_states": ["merged_height", 2, "merged_width", 2, 64],
                    "image_embeds": ["num_image_tokens", 48]},
}
#: parameters the exported part legitimately does not read (training-only / other modality)
EXPECTED_NOT_READ = {"siglip": [], "whisper": [], "hubert": ["target.masked_spec_embed"], "qwen2_5_vl": [],
                     "qwen2_5_omni_audio_encoder": ["encoder.audio_bos_eos_token.weight"], "minicpmv4_6": []}
EXPECTED_PATCHES = {"qwen2_5_vl": ["varlen_attention_as_mask"], "qwen2_5_omni_audio_encoder": ["varlen_attention_as_mask"],
                    "minicpmv4_6": ["varlen_attention_as_mask"]}


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_encoder_export_is_verified_at_several_sizes(kind, exported_encoder):
    bundle, manifest = exported_encoder(kind)
    assert manifest["verification"]["ok"]
    dims, patches = {}, set()
    for graph in manifest["graphs"]:
        assert (bundle / graph["file"]).is_file()
        results = graph["verification"]["results"]
        sizes = {tuple((k, str(v)) for k, v in r["sizes"].items()) for r in results}
        assert len(sizes) >= 2
        for r in results:
            assert r["ok"] and r["max_abs_diff"] <= ATOL and r["cosine"] > 0.9999, r
        dims.update({io["name"]: io["dims"] for io in graph["inputs"] + graph["outputs"]})
        patches.update(graph["patches"])
        if kind in EXPECTED_NOT_READ:
            assert graph["weights"]["not_read"] == EXPECTED_NOT_READ[kind]
    for name, want in EXPECTED_DIMS[kind].items():
        assert dims[name] == want, (name, dims[name])
    assert sorted(patches) == EXPECTED_PATCHES.get(kind, [])


def test_exported_graph_has_no_exporter_symbols(exported_encoder):
    import onnx

    bundle, manifest = exported_encoder("hubert")
    m = onnx.load(str(bundle / manifest["graphs"][0]["file"]))
    params = {d.dim_param for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
              for d in vi.type.tensor_type.shape.dim if d.dim_param}
    assert params == {"batch_size", "audio_length", "num_frames"}


def test_qwen2_5_vl_runtime_from_raw_pixels_matches_transformers(exported_encoder, encoder_checkpoints):
    """A grid never seen during export (and two images packed), through EncoderRunner's numpy
    preprocessing: equals transformers' visual(pixel_values, grid_thw)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    bundle, _ = exported_encoder("qwen2_5_vl")
    runner = EncoderRunner(bundle)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(encoder_checkpoints("qwen2_5_vl"),
                                                               attn_implementation="eager").eval()
    for grid in ([[1, 16, 8]], [[1, 4, 4], [2, 8, 12]]):
        grid = torch.tensor(grid)
        n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        pixels = torch.randn(n, 96, generator=torch.Generator().manual_seed(n))
        got = runner(pixels.numpy(), grid.numpy())["image_embeds"]
        with torch.no_grad():
            want = model.model.visual(pixels, grid_thw=grid).pooler_output.numpy()
        assert got.shape == want.shape == (n // 4, 48)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_qwen2_5_omni_audio_runtime_from_mel_matches_transformers(exported_encoder, encoder_checkpoints):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    bundle, _ = exported_encoder("qwen2_5_omni_audio_encoder")
    runner = EncoderRunner(bundle)
    model = Qwen2_5OmniAudioEncoder.from_pretrained(encoder_checkpoints("qwen2_5_omni_audio_encoder"),
                                                    attn_implementation="eager").eval()
    for lens in ([63], [20, 41, 5]):
        lens_t = torch.tensor(lens)
        mel = torch.randn(16, sum(lens), generator=torch.Generator().manual_seed(sum(lens)))
        got = runner(mel.numpy(), lens_t.numpy())["audio_embeds"]
        with torch.no_grad():
            want = model(mel, feature_lens=lens_t).last_hidden_state.numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_minicpmv4_6_runtime_vision_then_merger_matches_transformers(exported_encoder, encoder_checkpoints):
    """Two images of sizes not used at export: vision.onnx on the packed patches, then
    merger.onnx once per image (tokens reshaped to its 2x2 merge grid) == get_image_features."""
    from transformers import MiniCPMV4_6ForConditionalGeneration

    bundle, _ = exported_encoder("minicpmv4_6")
    vision, merger = EncoderRunner(bundle, "vision"), EncoderRunner(bundle, "merger")
    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(encoder_checkpoints("minicpmv4_6"),
                                                                attn_implementation="eager").eval()
    sizes = np.array([[16, 8], [4, 8]])
    n = int((sizes[:, 0] * sizes[:, 1]).sum())
    pixels = np.random.default_rng(0).standard_normal((1, 3, 4, n * 4)).astype(np.float32)
    tokens = vision(pixels, sizes)["vision_embeds"][0]
    got, start = [], 0
    for h, w in (sizes // 2).tolist():
        x = tokens[start:start + h * w].reshape(h // 2, 2, w // 2, 2, -1)
        got.append(merger(hidden_states=x)["image_embeds"])
        start += h * w
    with torch.no_grad():
        want = model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(sizes)).pooler_output
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=ATOL)


def test_minicpm_nearest_position_ids_equal_transformers():
    from transformers import vision_utils as vu

    from onnxport.runtime.preprocess import nearest_position_ids

    for sizes in ([[8, 8]], [[12, 16], [5, 7]], [[3, 30]]):
        t = torch.tensor(sizes)
        np.testing.assert_array_equal(nearest_position_ids(t.numpy(), 8), vu.get_vision_nearest_position_ids(t, 8).numpy())


@pytest.mark.parametrize("grid", [[[1, 8, 8]], [[1, 12, 16]], [[2, 4, 6], [1, 10, 4]], [[1, 16, 30]]])
def test_vision_preprocessing_equals_transformers(grid):
    from transformers import vision_utils as vu

    from onnxport.runtime.preprocess import (
        vision_cu_seqlens,
        vision_position_ids,
        vision_window_index,
    )

    g = torch.tensor(grid)
    np.testing.assert_array_equal(vision_position_ids(g.numpy(), 2), vu.get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(vision_cu_seqlens(g.numpy()), vu.get_vision_cu_seqlens(g).numpy())
    idx, cu = vision_window_index(g.numpy(), 2, 16, 4)
    ref_idx, ref_cu = vu.get_vision_window_index(g, spatial_merge_size=2, window_size=16, patch_size=4)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@pytest.mark.parametrize("lens", [[45], [45, 25], [100, 7, 60], [20, 40]])
def test_omni_audio_preprocessing_equals_transformers(lens):
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as om

    from onnxport.runtime.preprocess import block_diagonal_mask, qwen2_5_omni_audio

    lens_t = torch.tensor(lens)
    mel = torch.randn(16, sum(lens))
    feeds = qwen2_5_omni_audio(mel.numpy(), lens_t.numpy(), {"n_window": 10})
    padded, chunk_lengths = om.chunk_and_pad_features(mel, lens_t, 10)
    np.testing.assert_array_equal(feeds["padded_feature"], padded.numpy())
    np.testing.assert_array_equal(feeds["chunk_lengths"], chunk_lengths.numpy())
    np.testing.assert_array_equal(feeds["valid_indices"], om.get_valid_indices(chunk_lengths).numpy())
    np.testing.assert_array_equal(feeds["pool_indices"], om.get_pool_indices(lens_t).numpy())
    cu = om.get_audio_cu_seqlens(chunk_lengths).numpy()
    np.testing.assert_array_equal(feeds["attention_mask"], block_diagonal_mask(cu))


def test_xcodec2_torchscript_opset17_needs_and_records_the_complex_rewrites(encoder_checkpoints, tmp_path):
    """The NPU path: TorchScript at opset 17 has neither complex tensors nor Col2Im; with
    complex_as_real_pair + fold_as_conv_transpose the waveform matches PyTorch."""
    from onnxport.api import export_encoder
    from onnxport.config import ExportConfig

    manifest = export_encoder(encoder_checkpoints("xcodec2"), tmp_path / "b",
                              ExportConfig(exporter="torchscript", opset=17)).to_dict()
    (g,) = manifest["graphs"]
    assert g["exporter"] == "torchscript" and g["opset"] == 17
    assert set(g["patches"]) == {"complex_as_real_pair", "fold_as_conv_transpose"}
    for r in g["verification"]["results"]:
        assert r["snr_db"] is None or r["snr_db"] > 80, r  # fp32: ~110 dB observed
    runner = EncoderRunner(tmp_path / "b")
    codes = np.random.default_rng(0).integers(0, 64, size=(1, 1, 40))
    audio = runner(audio_codes=codes)["audio_values"]
    assert audio.shape == (1, 1, 40 * 4)


class ChatTTSLikeDecoder(torch.nn.Module):
    """ChatTTS' DVAE decode path at tiny size: GFSQ codes (GroupedResidualFSQ, as ChatTTS builds
    it) -> conv decoder to a mel -> Vocos-style head (magnitude/phase -> polar -> torch.istft).
    chattts itself needs torchaudio (a different torch), so the structure is rebuilt from
    vector-quantize-pytorch here."""

    def __init__(self):
        super().__init__()
        from vector_quantize_pytorch import GroupedResidualFSQ

        self.quantizer = GroupedResidualFSQ(dim=32, levels=[5, 5, 5, 5], num_quantizers=2, groups=2)
        self.decoder = torch.nn.Sequential(torch.nn.Conv1d(32, 64, 3, padding=1), torch.nn.GELU(),
                                           torch.nn.Conv1d(64, 64, 3, padding=1))
        self.head = torch.nn.Linear(64, 2 * 17)
        self.register_buffer("window", torch.hann_window(32))

    def forward(self, codes):
        b, _, t = codes.shape
        x = self.quantizer.get_output_from_indices(codes.view(b, 2, 2, t).permute(1, 0, 3, 2)).transpose(1, 2)
        x = self.head(self.decoder(x).transpose(1, 2)).transpose(1, 2)
        mag, phase = x.chunk(2, dim=1)
        spec = torch.polar(torch.exp(mag).clamp(max=1e2), phase)
        return torch.istft(spec, 32, 8, window=self.window, center=True)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_chattts_like_gfsq_istft_decoder_waveform(exporter, tmp_path):
    from onnxport.export.module import export_part
    from onnxport.recipes.parts import ModulePart, TensorSpec
    from onnxport.verify.module import part_check

    torch.manual_seed(0)
    module = ChatTTSLikeDecoder().eval()
    spec = TensorSpec("codes", "int64", ("batch_size", 4, "num_codes"), low=0, high=625)
    part = ModulePart("dvae_vocoder", module, [spec], ["waveform"], [{"batch_size": 2, "num_codes": 20},
                                                                   {"batch_size": 1, "num_codes": 37}],
                      output_dims={"waveform": ["batch_size", "audio_length"]}, role="vocoder")
    entry = export_part(part, tmp_path, exporter, 18, part_check(VerifyConfig()))
    assert "get_at_as_gather" in entry.patches and "istft_as_conv" in entry.patches
    for r in entry.verification["results"]:
        assert r["snr_db"] is None or r["snr_db"] > 60, r  # DFT as matmul vs FFT in fp32


def test_max_graph_size_cuts_an_encoder_into_a_verified_chain(encoder_checkpoints, exported_encoder, tmp_path):
    """--max-graph-size on an encoder (the SigLIP tower, cut far below its ~0.5 MB of weights):
    consecutive graphs each under the size (unless one node alone reads more), each with
    its own data file, recorded as the graph's chain, verified against PyTorch end to end; the
    runtime chains them to the one-file graph's outputs."""
    import onnx

    from onnxport.runtime import EncoderRunner
    from onnxport.runtime.segments import weight_bytes

    budget = 60_000
    out = tmp_path / "cut"
    res = CliRunner().invoke(app, ["export", str(encoder_checkpoints("siglip")), "-o", str(out),
                                   "--max-graph-size", str(budget)])
    assert res.exit_code == 0, res.output
    mf = json.loads((out / "manifest.json").read_text())
    g = mf["graphs"][0]
    chain = g["chain"]
    assert len(chain) >= 4 and g["file"] == chain[0]["file"] and g["verification"]["ok"]
    for c in chain:
        part = onnx.load(str(out / c["file"]), load_external_data=False)
        nodes = len(part.graph.node)
        assert weight_bytes(part) <= budget or nodes == 1, (c["file"], weight_bytes(part))
        assert set(g["files"]) >= {c["file"]}
    assert not (out / "vision.onnx").exists()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = EncoderRunner(out)(pixel_values=x)
    ref = EncoderRunner(exported_encoder("siglip")[0])(pixel_values=x)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=1e-5)


def test_verify_rechecks_a_cut_encoder_chain(encoder_checkpoints, tmp_path):
    """`onnxport verify` on a bundle whose encoder was cut: the chain is what it checks."""
    out = tmp_path / "cut"
    res = CliRunner().invoke(app, ["export", str(encoder_checkpoints("siglip")), "-o", str(out),
                                   "--max-graph-size", "60000", "--no-verify"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    g = json.loads((out / "manifest.json").read_text())["graphs"][0]
    assert len(g["chain"]) >= 4 and g["verification"]["ok"]
