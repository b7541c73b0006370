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


def test_optimize_command_on_an_exported_bundle(exported, tiny_checkpoints, tmp_path):
    """`onnxport optimize B -o OUT`: the passes of export --optimize on a bundle already written
    (here `--attention gqa`: the rotary and packed q/k/v go inside GroupQueryAttention), each
    verified against the export's checkpoint; the result takes right-padded batches and still
    gives transformers' greedy tokens. Bad inputs are one-line errors that write nothing."""
    from typer.testing import CliRunner

    from onnxport.bundle import read_manifest
    from onnxport.cli import app
    from onnxport.runtime import Generator

    src = exported("llama", attention="gqa")
    before = (src / "model.onnx").read_bytes()
    out = tmp_path / "opt"
    r = CliRunner().invoke(app, ["optimize", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "gqa_rotary (gqa_rotary_layers 2, packed_qkv_layers 2)" in r.output and "right-padded" in r.output
    m = read_manifest(out)
    graph = m.graph("decoder")
    assert [p["name"] for p in graph.optimization] == ["ort_fusions", "matmul_packing", "reshape_chains", "gqa_rotary"]
    assert graph.padding == "right" and m.verification["ok"]
    assert any("right_pad" in c["shape"] for c in m.verification["cases"])
    assert (src / "model.onnx").read_bytes() == before  # the source bundle is untouched
    prompts = [[5, 17, 300, 42, 7, 9, 9], [11, 600, 23]]
    got = Generator(out).generate_ids(prompts, max_new_tokens=16, eos_token_id=None).padded
    np.testing.assert_array_equal(got, hf_greedy(tiny_checkpoints("llama"), prompts, 16))

    # optimizing twice, or a folder that is no bundle: refused, nothing written
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.onnx").write_bytes(before)
    for bad, why in ((out, "already optimized"), (tmp_path / "plain", "manifest")):
        r = CliRunner().invoke(app, ["optimize", str(bad), "-o", str(tmp_path / "again")])
        assert r.exit_code != 0 and why in r.output, r.output
        assert not (tmp_path / "again").exists()
