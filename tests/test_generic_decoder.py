"""The generic decoder: transformers causal LMs with no recipe file export through their own
forward with a flat cache, and their greedy tokens equal transformers'. One type per cache or
forward variant: MLA with different key/value widths + MoE routing (deepseek_v3), a sparse-
attention (DSA) indexer key cache beside MLA (deepseek_v32), a differently named head (gpt_neox `embed_out`), ALiBi without position_ids
(bloom), hybrid sliding/full layers (gemma3_text), the causal-LM head of an encoder-decoder
family (bart: cross-attention declared unused, transformers' forced EOS at the last step),
recurrent state beside attention (qwen3_next: gated delta net conv + recurrent states, a
one-token-per-call graph), pure recurrence (mamba), a BERT-like decoder whose cache sits in an
encoder-decoder cache (rembert), a model without any cache (openai-gpt). Caches that hold
something else (deepseek_v4's compressed-attention state) fail in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DEMO_DIR, TOKENIZER_FILES, hf_greedy
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.runtime import Generator

PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 600, 23]]


def tiny_checkpoint(model_type: str, out):
    from onnxport.testing.tiny import tiny_causal_lm

    tiny_causal_lm(model_type).save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / f, out / f)
    return out


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32", "gpt_neox", "bloom", "gemma3_text", "bart",
                                        "qwen3_next", "mamba", "rembert", "openai-gpt"])
def test_generic_decoder_token_parity(model_type, tmp_path):
    ckpt = tiny_checkpoint(model_type, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["model"]["recipe"] == "GenericDecoder" and mf["verification"]["ok"]
    step_only = bool(mf["kv_cache"].get("step_only"))
    ours = Generator(out).generate_ids(PROMPTS, max_new_tokens=16, eos_token_id=None).padded
    # recurrent state: each prompt alone (a padded batch pushes pads through the recurrence)
    np.testing.assert_array_equal(ours, hf_greedy(ckpt, PROMPTS, 16, per_row=step_only))
    inputs = {i["name"]: i["dims"] for i in mf["graphs"][0]["inputs"]}
    outputs = {i["name"]: i["dims"] for i in mf["graphs"][0]["outputs"]}
    if model_type in ("qwen3_next", "mamba"):  # fixed-size states in and out, one token per call
        assert step_only and inputs["input_ids"] == ["batch_size", 1]
        conv = inputs["past_key_values.0.conv_state"]
        assert conv[0] == "batch_size" and all(isinstance(d, int) for d in conv[1:])
        assert outputs["present.0.recurrent_state"] == inputs["past_key_values.0.recurrent_state"]
        assert [n for n, _, _ in mf["kv_cache"]["states"]][:2] == ["past_key_values.0.conv_state",
                                                                    "past_key_values.0.recurrent_state"]
    if model_type == "qwen3_next":  # layer 1 is full attention: a growing key/value cache
        assert inputs["past_key_values.1.key"][2] == "past_sequence_length"
        assert "past_key_values.0.key" not in inputs
    if model_type == "deepseek_v32":  # the indexer keys grow with the sequence, like keys
        assert inputs["past_key_values.0.indexer_key"][:2] == ["batch_size", "past_sequence_length"]
        assert outputs["present.0.indexer_key"][:2] == ["batch_size", "total_sequence_length"]
    if model_type == "openai-gpt":  # no cache: the whole sequence each call
        assert not mf["kv_cache"]["names"] and inputs["attention_mask"] == ["batch_size", "sequence_length"]
    if model_type == "deepseek_v3":  # MLA: keys carry the rope part, values do not
        k, v = inputs["past_key_values.0.key"], inputs["past_key_values.0.value"]
        assert k[3] != v[3] and mf["kv_cache"]["layers"][0][1] == k[3]
    if model_type == "bloom":  # ALiBi: positions come from the mask
        assert "position_ids" not in inputs
    if model_type == "bart":
        skipped = mf["weights"]["skipped"]
        assert skipped and all("encoder_attn" in k for k in skipped if "cross-attention" in skipped[k])
        assert any("cross-attention" in v for v in skipped.values())


def test_unknown_cache_state_is_a_one_line_refusal(tmp_path):
    ckpt = tiny_checkpoint("deepseek_v4", tmp_path / "ckpt")
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    assert "DeepseekV4" in res.output and "Traceback" not in res.output and "hint:" in res.output
    assert not (tmp_path / "b").exists()


def test_recurrent_state_refuses_split_layout(tmp_path):
    ckpt = tiny_checkpoint("lfm3", tmp_path / "ckpt")
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--layout", "split"])
    assert res.exit_code == 2, res.output
    assert "recurrent states" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()
