"""One checkpoint, several parts: a Qwen2.5-VL checkpoint gives its text decoder (token parity
with transformers) and its vision encoder in one `onnxport export`; `--part` picks one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.runtime import EncoderRunner, Generator

PROMPTS = [[5, 17, 200, 42, 7, 99], [11, 250, 23]]


@pytest.fixture(scope="module")
def vl_bundle(encoder_checkpoints, tmp_path_factory):
    ckpt = encoder_checkpoints("qwen2_5_vl")
    out = tmp_path_factory.mktemp("vl") / "bundle"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return ckpt, out


def test_both_parts_in_one_bundle(vl_bundle):
    _, out = vl_bundle
    mf = json.loads((out / "manifest.json").read_text())
    assert [(p["name"], p["kind"]) for p in mf["parts"]] == [("decoder", "decoder"), ("vision", "encoder")]
    assert all(p["verification"]["ok"] for p in mf["parts"])
    assert {g["file"]: g["part"] for g in mf["graphs"]} == {"model.onnx": "decoder", "embed_tokens.onnx": "decoder",
                                                            "vision.onnx": "vision"}
    # the text decoder takes inputs_embeds and mrope position ids; the embedding graph maps ids
    decoder = next(g for g in mf["graphs"] if g["file"] == "model.onnx")
    assert [(i["name"], i["dims"]) for i in decoder["inputs"][:3]] == [
        ("inputs_embeds", ["batch_size", "sequence_length", 48]),
        ("attention_mask", ["batch_size", "total_sequence_length"]),
        ("position_ids", [3, "batch_size", "sequence_length"])]
    assert mf["verification"]["embedding"]["ok"]
    skipped = mf["weights"]["skipped"]
    # the vision tower is another part: declared, with the reason, never silently dropped
    assert skipped and all(k.startswith("model.visual.") for k in skipped if "visual" in k)
    assert all(v.startswith("belongs to model.visual, another part") for k, v in skipped.items() if "visual" in k)


def test_text_decoder_greedy_tokens_equal_transformers(vl_bundle):
    from transformers import Qwen2_5_VLForConditionalGeneration

    ckpt, out = vl_bundle
    ours = Generator(out).generate_ids(PROMPTS, max_new_tokens=12, eos_token_id=None).padded
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    longest = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(PROMPTS):
        ids[r, longest - len(p):] = torch.tensor(p)
        mask[r, longest - len(p):] = 1
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[:, longest:].numpy()
    np.testing.assert_array_equal(ours, ref)


def test_vision_part_runs_from_raw_inputs(vl_bundle):
    _, out = vl_bundle
    runner = EncoderRunner(out)
    grid = np.array([[1, 8, 8]])
    pixels = np.random.default_rng(0).standard_normal((64, 3 * 2 * 4 * 4)).astype(np.float32)
    emb = runner(pixels, grid)["image_embeds"]
    assert emb.shape == (16, 48) and np.isfinite(emb).all()


def test_part_option_picks_one_part(encoder_checkpoints, tmp_path):
    out = tmp_path / "text"
    res = CliRunner().invoke(app, ["export", str(encoder_checkpoints("qwen2_5_vl")), "-o", str(out), "--part", "decoder"])
    assert res.exit_code == 0, res.output
    mf = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in mf["parts"]] == ["decoder"]
    assert [g["file"] for g in mf["graphs"]] == ["model.onnx", "embed_tokens.onnx"]
    res = CliRunner().invoke(app, ["export", str(encoder_checkpoints("qwen2_5_vl")), "-o", str(tmp_path / "x"),
                                   "--part", "audio"])
    assert res.exit_code == 2 and "has no part 'audio'" in res.output and "decoder, vision" in res.output
    assert not (tmp_path / "x").exists()
