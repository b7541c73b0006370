"""export --optimize: ONNX Runtime fusions, re-verified, greedy tokens unchanged."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from conftest import hf_greedy

PROMPTS = [[5, 17, 300, 42, 7], [11, 600, 23]]


def test_fusions_are_verified_recorded_and_keep_tokens(exported, tiny_checkpoints, tmp_path):
    from onnxport.bundle import read_manifest
    from onnxport.optimize.fusions import fuse_for_ort
    from onnxport.runtime import Generator

    bundle = exported("qwen3", optimize=True)
    m = read_manifest(bundle)
    rec = m.graph("decoder").optimization[0]
    assert rec["name"] == "ort_fusions" and rec["applied"], rec
    ops = Counter(n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node)
    # qwen3: 2 layers x (input, post-attention norms) + q_norm / k_norm per layer + final norm
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] >= 5, ops
    assert rec["fused"].get("rms_normalization", 0) + rec["fused"].get("skip_rms_normalization", 0) >= 5
    assert m.verification["ok"] and "max|diff|" in rec["result"]
    got = Generator(bundle).generate_ids(PROMPTS, max_new_tokens=12, eos_token_id=None).padded
    np.testing.assert_array_equal(got, hf_greedy(tiny_checkpoints("qwen3"), PROMPTS, 12))

    # a pass whose candidate fails verification is rolled back: the graph stays byte-identical
    before = (exported("qwen3") / "model.onnx").read_bytes()
    copy = tmp_path / "model.onnx"
    copy.write_bytes(before)
    r = fuse_for_ort(copy, lambda p: (False, "logits: max|diff| 3 (bound 0.001)"))
    assert not r["applied"] and r["result"].startswith("rolled back") and r["fused"], r
    assert copy.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
