"""--attention gqa: each layer's attention as one com.microsoft.GroupQueryAttention node, the
cache appended inside it, traced from the model's own code (export/attention.py); with
--optimize also the ORT fusions and MatMul packing. Verified against PyTorch like any export,
and the shared-buffer generator (one cache buffer bound as past and present) gives
transformers' greedy tokens for a left-padded batch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import hf_greedy
from typer.testing import CliRunner

from onnxport.cli import app

PROMPTS = [[5, 17, 300, 42, 7, 99, 3, 8, 9, 10, 11, 12], [11, 600, 23]]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_gqa_export_is_verified_and_token_exact(model_type, exported, tiny_checkpoints):
    """llama (GQA 4/2 heads) and gemma2 (logit softcap, a sliding window smaller than the
    generated length, alternating with global layers)."""
    from onnxport.bundle import read_manifest
    from onnxport.runtime import Generator

    bundle = exported(model_type, attention="gqa", optimize=True)
    m = read_manifest(bundle)
    graph = m.graph("decoder")
    assert graph.attention == "com.microsoft.GroupQueryAttention"
    model = onnx.load(str(bundle / "model.onnx"))
    # (the optional logits_to_keep input's own Neg / Slice aside)
    ops = Counter((n.domain, n.op_type) for n in model.graph.node if not n.name.startswith("/logits_to_keep/"))
    assert ops[("com.microsoft", "GroupQueryAttention")] == m.model.num_layers
    assert ops[("", "Softmax")] == 0 and ops[("", "Neg")] == 0  # no unfused attention or rotary left
    assert m.verification["ok"]
    passes = {r["name"]: r for r in graph.optimization}
    assert passes["matmul_packing"]["applied"] and passes["matmul_packing"]["fused"]["packed_matmul_groups"] == 4
    shapes = [c["shape"] for c in m.verification["cases"]]
    # the prompt-after-cache case runs at batch 1 (ONNX Runtime's kernel), a batched padded decode instead
    assert "batch=1,seq=7,past=5" in shapes
    if model_type == "llama":
        # gqa_rotary: the rotary and the packed q/k/v inside GroupQueryAttention, seqlens from
        # the mask once; the graph takes right-padded batches and is verified with them
        assert passes["gqa_rotary"]["applied"], passes["gqa_rotary"]["result"]
        # (and the identity view after each GQA node: [batch_size, sequence_length, -1])
        assert passes["gqa_rotary"]["fused"] == {"gqa_rotary_layers": 2, "packed_qkv_layers": 2, "views_dropped": 2}
        assert all(u.op_type != "Reshape" for n in model.graph.node if n.op_type == "GroupQueryAttention"
                   for u in model.graph.node if n.output[0] in u.input)
        assert graph.padding == "right" and ops[("com.microsoft", "RotaryEmbedding")] == 0
        for node in (n for n in model.graph.node if n.op_type == "GroupQueryAttention"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["do_rotary"] == 1 and node.input[1] == "" and node.input[7] and len(node.input) == 9
        assert "batch=2,seq=6,past=0,right_pad=3" in shapes and "batch=2,seq=1,past=33,right_pad=4" in shapes
    else:
        # gemma2's sliding window lives in the attention bias: the graph keeps its rotary nodes
        # and left padding (one RotaryEmbedding for q and one for k per layer)
        assert not passes["gqa_rotary"]["applied"] and graph.padding is None
        assert ops[("com.microsoft", "RotaryEmbedding")] == 2 * m.model.num_layers
        assert "batch=2,seq=1,past=33,left_pad=4" in shapes
    gen = Generator(bundle)
    assert gen.shared_buffer and gen.right_padded == (model_type == "llama")
    seen = {}
    got = gen.generate_ids(PROMPTS, max_new_tokens=24, eos_token_id=None,
                           on_outputs=lambda step, outs: seen.setdefault(step, outs["logits"].copy())).padded
    np.testing.assert_array_equal(got, hf_greedy(tiny_checkpoints(model_type), PROMPTS, 24))
    # the prompt's outputs reach callers laid out as left-padded whatever the graph's padding:
    # the same as the default export's at every real position
    ref, last = {}, {}
    default = Generator(exported(model_type))
    # the default graph computes the prompt's logits at the last slot only (logits_to_keep) ...
    assert default.keeps_logits
    default.generate_ids(PROMPTS, max_new_tokens=1, eos_token_id=None,
                         on_outputs=lambda step, outs: last.setdefault(step, outs["logits"]))
    default.keeps_logits = False  # ... and at every slot without it
    default.generate_ids(PROMPTS, max_new_tokens=1, eos_token_id=None,
                         on_outputs=lambda step, outs: ref.setdefault(step, outs["logits"]))
    assert last[0].shape == (len(PROMPTS), 1, 1024) and ref[0].shape[1] == max(map(len, PROMPTS))
    np.testing.assert_allclose(last[0], ref[0][:, -1:], atol=1e-5)
    # the right-padded graph's prompt of several lengths: every position (the last slot is not
    # every row's last token); the left-padded one: the last slot alone
    n = seen[0].shape[1]
    assert n == (max(map(len, PROMPTS)) if model_type == "llama" else 1)
    for r, prompt in enumerate(PROMPTS):
        k = min(n, len(prompt))
        np.testing.assert_allclose(seen[0][r, -k:], ref[0][r, -k:], atol=2e-4)


def test_gqa_rotary_packs_qkv_biases_and_serves_a_right_padded_batch(tmp_path):
    """qwen2 (q/k/v biases, here random: a trained model's are not zero): gqa_rotary packs the
    three projections and their biases into one MatMul + Add feeding GroupQueryAttention; the
    graph verifies on right-padded cases and a batch of three prompt lengths gives
    transformers' greedy tokens (left-padded there)."""
    import torch
    from conftest import make_tiny_checkpoint
    from safetensors.torch import load_file, save_file

    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.runtime import Generator

    ckpt = make_tiny_checkpoint("qwen2", tmp_path / "ck")
    weights = load_file(str(ckpt / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    biases = [k for k in weights if k.endswith("_proj.bias")]
    assert len(biases) == 6
    for k in biases:
        weights[k] = torch.randn(weights[k].shape, generator=g) * 0.5
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    m = export(ckpt, tmp_path / "b", ExportConfig(attention="gqa", optimize=True))
    graph = m.graph("decoder")
    rec = next(r for r in graph.optimization if r["name"] == "gqa_rotary")
    assert rec["applied"] and rec["fused"]["packed_qkv_layers"] == 2 and graph.padding == "right"
    assert m.verification["ok"]
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node)
    assert ops["Split"] == 2 and ops["Add"] == 2  # gate/up splits; one packed bias Add per layer
    prompts = [*PROMPTS, [7, 8, 9, 10, 11, 12, 13]]
    got = Generator(tmp_path / "b").generate_ids(prompts, max_new_tokens=16, eos_token_id=None).padded
    np.testing.assert_array_equal(got, hf_greedy(ckpt, prompts, 16))


def test_gqa_custom_op_eager_body_matches_the_models_attention(tiny_checkpoints):
    """The custom op's torch body (what runs outside an export) is the model's attention: the
    wrapper in GQA mode gives the logits and cache of the eager model."""
    import torch

    from onnxport.checkpoint import open_checkpoint
    from onnxport.config import ExportConfig
    from onnxport.export.decoder import flat_cache_wrapper, io_spec, wrapper_args
    from onnxport.export.load import load_model
    from onnxport.recipes import get_recipes
    from onnxport.spec import ShapeCase, feeds

    ckpt = open_checkpoint(tiny_checkpoints("gemma2"))
    recipe = get_recipes(ckpt.model_type, ("decoder",), ckpt.config)["decoder"]
    model = load_model(recipe, ckpt)
    kv = recipe.kv_spec(model)
    inputs, _ = io_spec(kv, 1024, ExportConfig())
    for case in (ShapeCase(2, 6, 0, left_pad=3), ShapeCase(2, 1, 20, left_pad=4)):
        x = {k: torch.from_numpy(v) for k, v in feeds(inputs, case.sizes, 0, 1024, left_pad=case.left_pad).items()}
        with torch.no_grad():
            ref = flat_cache_wrapper(model, kv, "bhsd")(*wrapper_args(inputs, x))
            got = flat_cache_wrapper(model, kv, "bhsd", gqa=True)(*wrapper_args(inputs, x))
        keep = x["attention_mask"][:, -case.seq:].bool()
        np.testing.assert_allclose(got[0][keep].numpy(), ref[0][keep].numpy(), atol=2e-5, rtol=1e-5)
        for a, b in zip(got[1:], ref[1:]):  # presents (pad slots hold pad-token keys in both)
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5, rtol=1e-5)


def test_gqa_refuses_a_cache_it_cannot_hold(tiny_checkpoints, tmp_path):
    """MLA (deepseek_v3: keys wider than values) has no GroupQueryAttention form: one line."""
    import shutil

    from conftest import DEMO_DIR, TOKENIZER_FILES

    from onnxport.testing.tiny import tiny_causal_lm

    ckpt = tmp_path / "ck"
    tiny_causal_lm("deepseek_v3").save_pretrained(ckpt, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / f, ckpt / f)
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--attention", "gqa"])
    assert res.exit_code == 2, res.output
    assert "--attention gqa does not fit" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()
