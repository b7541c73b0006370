"""onnxruntime-genai runs onnxport bundles as they are: every monolithic decoder bundle carries a
genai_config.json (bundle/genai.py), and genai's own generation loop gives transformers' greedy
tokens for the default graph (shared-buffer off) and the GroupQueryAttention graph (shared-buffer
on), fp32 and fp16, and onnxport's own tokens for an int4 bundle. Bundles genai's config cannot
describe (split layout, bshd or renamed caches) have no such file, and the manifest says why.

Uses the real `onnxruntime-genai` package (in the test extras); skipped with the reason when it
does not import. Bundles come from the session's `exported` fixture (shared with test_layouts,
test_attention, test_split, test_export_options: no extra export)."""

from __future__ import annotations

import json

import pytest
from conftest import genai_greedy, hf_greedy

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 600, 23, 8]]
NEW = 12


def _same_until_eos(got: list[int], want: list[int], eos) -> None:
    """genai stops at the bundle's EOS (transformers' reference here runs past it)."""
    eos = set(eos if isinstance(eos, list) else [eos])
    assert got == want[:len(got)], (got, want)
    assert len(got) == len(want) or got[-1] in eos, (got, want)


def _interop(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["interop"]["onnxruntime-genai"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_genai_runs_the_default_bundle_with_transformers_tokens(family, exported, tiny_checkpoints):
    bundle = exported(family)
    cfg = json.loads((bundle / "genai_config.json").read_text())
    assert _interop(bundle) == {"file": "genai_config.json", "type": family, "past_present_share_buffer": False}
    mf = json.loads((bundle / "manifest.json").read_text())
    assert "genai_config.json" in mf["files"]  # sealed with the rest
    assert cfg["model"]["decoder"]["num_hidden_layers"] == mf["kv_cache"]["num_layers"]
    ref = hf_greedy(tiny_checkpoints(family), PROMPTS, NEW, per_row=True)
    for prompt, want in zip(PROMPTS, ref):
        _same_until_eos(genai_greedy(bundle, prompt, NEW), list(want), cfg["model"].get("eos_token_id", []))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_genai_shares_the_cache_buffer_of_the_gqa_graph(family, exported, tiny_checkpoints):
    """GroupQueryAttention appends in place: genai hands it one preallocated buffer (gemma2:
    sliding-window layers shorter than the generated length)."""
    bundle = exported(family, attention="gqa", optimize=True)
    assert _interop(bundle)["past_present_share_buffer"] is True
    eos = json.loads((bundle / "genai_config.json").read_text())["model"].get("eos_token_id", [])
    ref = hf_greedy(tiny_checkpoints(family), PROMPTS, NEW, per_row=True)
    for prompt, want in zip(PROMPTS, ref):
        _same_until_eos(genai_greedy(bundle, prompt, NEW), list(want), eos)


def test_genai_runs_int4_default_and_gqa_and_fp16_bundles_as_onnxport_does(exported, tiny_checkpoints, tmp_path):
    from onnxport.api import export, quantize
    from onnxport.config import ExportConfig, QuantConfig
    from onnxport.runtime import Generator

    q4, q4_gqa, f16 = tmp_path / "q4", tmp_path / "q4-gqa", tmp_path / "f16"
    quantize(exported("llama"), q4, QuantConfig(bits=4, block_size=32, escalate=False, max_ppl_increase=10.0))
    quantize(exported("llama", attention="gqa", optimize=True), q4_gqa,
             QuantConfig(bits=4, block_size=32, escalate=False, max_ppl_increase=10.0))
    assert _interop(q4_gqa)["past_present_share_buffer"] is True
    export(tiny_checkpoints("llama"), f16, ExportConfig(dtype="fp16"))
    for bundle in (q4, q4_gqa, f16):
        assert (bundle / "genai_config.json").is_file(), bundle
        ours = Generator(bundle).generate_ids(PROMPTS[:1], max_new_tokens=NEW, eos_token_id=None).tokens[0]
        eos = json.loads((bundle / "genai_config.json").read_text())["model"].get("eos_token_id", [])
        _same_until_eos(genai_greedy(bundle, PROMPTS[0], NEW), list(ours), eos)


@pytest.mark.parametrize("case, reason", [
    ({"split": {"pack": 1}, "kv_layout": "bshd"}, "split layout"),
    ({"kv_layout": "bshd", "kv_naming": "seed"}, "cache layout"),
])
def test_no_genai_config_where_genai_cannot_run_the_bundle(case, reason, exported):
    bundle = exported("llama", **case)
    assert not (bundle / "genai_config.json").exists()
    record = _interop(bundle)
    assert record["file"] is None and reason in record["reason"], record
