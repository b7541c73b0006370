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
    ops = Counter((n.domain, n.op_type) for n in onnx.load(str(bundle / "model.onnx")).graph.node)
    assert ops[("com.microsoft", "GroupQueryAttention")] == m.model.num_layers
    assert ops[("", "Softmax")] == 0  # no unfused attention left
    # the model's rotary as one RotaryEmbedding for q and one for k per layer (no Neg left)
    assert ops[("com.microsoft", "RotaryEmbedding")] == 2 * m.model.num_layers and ops[("", "Neg")] == 0
    assert m.verification["ok"]
    # the prompt-after-cache case runs at batch 1 (ONNX Runtime's kernel), a batched padded decode instead
    shapes = [c["shape"] for c in m.verification["cases"]]
    assert "batch=1,seq=7,past=5" in shapes and "batch=2,seq=1,past=33,left_pad=4" in shapes
    passes = {r["name"]: r for r in graph.optimization}
    assert passes["matmul_packing"]["applied"] and passes["matmul_packing"]["fused"]["packed_matmul_groups"] == 4
    gen = Generator(bundle)
    assert gen.shared_buffer
    got = gen.generate_ids(PROMPTS, max_new_tokens=24, eos_token_id=None).padded
    np.testing.assert_array_equal(got, hf_greedy(tiny_checkpoints(model_type), PROMPTS, 24))


def test_gqa_custom_op_eager_body_matches_the_models_attention(tiny_checkpoints):
    """The custom op's torch body (what runs outside an export) is the model's attention: the
    wrapper in GQA mode gives the logits and cache of the eager model."""
    import torch

    from onnxport.api import load_model
    from onnxport.checkpoint import open_checkpoint
    from onnxport.config import ExportConfig
    from onnxport.export.decoder import flat_cache_wrapper, io_spec, wrapper_args
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

    from onnxport.hf.tiny import tiny_causal_lm

    ckpt = tmp_path / "ck"
    tiny_causal_lm("deepseek_v3").save_pretrained(ckpt, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / f, ckpt / f)
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--attention", "gqa"])
    assert res.exit_code == 2, res.output
    assert "--attention gqa does not fit" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()
