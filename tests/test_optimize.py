"""export --optimize: ONNX Runtime fusions, re-verified, greedy tokens unchanged."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from conftest import hf_greedy

PROMPTS = [[5, 17, 300, 42, 7], [11, 600, 23]]


def test_fusions_are_verified_recorded_and_keep_tokens(exported, tiny_checkpoints, tmp_path):
    from onnxport.bundle import Graph, read_manifest
    from onnxport.optimize.fusions import OrtFusions
    from onnxport.optimize.passes import GraphFile, Verified
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
    reject = lambda p, g: (False, "logits: max|diff| 3 (bound 0.001)", None)  # noqa: E731
    r = Verified(OrtFusions(), reject)(GraphFile(tmp_path, Graph("decoder", "model.onnx"))).record
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
    assert "gqa_rotary (gqa_rotary_layers 2, packed_qkv_layers 2, views_dropped 2)" in r.output and "right-padded" in r.output
    m = read_manifest(out)
    graph = m.graph("decoder")
    assert [p["name"] for p in graph.optimization] == ["ort_fusions", "matmul_packing", "reshape_chains", "gqa_rotary"]
    assert graph.padding == "right" and m.verification["ok"]
    assert any("right_pad" in c["shape"] for c in m.verification["cases"])
    assert (src / "model.onnx").read_bytes() == before  # the source bundle is untouched
    # the export's optional logits_to_keep input: taken out while the passes run, put back after
    assert list(read_manifest(src).graph("decoder").optional_inputs) == ["logits_to_keep"]
    assert list(graph.optional_inputs) == ["logits_to_keep"]
    assert "logits_to_keep" in {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input}
    gen = Generator(out)
    prompts = [[5, 17, 300, 42, 7, 9, 9], [11, 600, 23]]
    got = gen.generate_ids(prompts, max_new_tokens=16, eos_token_id=None).padded
    np.testing.assert_array_equal(got, hf_greedy(tiny_checkpoints("llama"), prompts, 16))
    # prompts of one length: the right-padded graph computes the prompt's last logits only
    same = [[5, 17, 300, 42], [11, 600, 23, 8]]
    step0 = {}
    got = gen.generate_ids(same, max_new_tokens=8, eos_token_id=None,
                           on_outputs=lambda step, outs: step0.setdefault(step, outs["logits"].shape)).padded
    assert step0[0] == (2, 1, 1024)
    np.testing.assert_array_equal(got, hf_greedy(tiny_checkpoints("llama"), same, 8))

    # optimizing twice, or a folder that is no bundle: refused, nothing written
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.onnx").write_bytes(before)
    for bad, why in ((out, "already optimized"), (tmp_path / "plain", "manifest")):
        r = CliRunner().invoke(app, ["optimize", str(bad), "-o", str(tmp_path / "again")])
        assert r.exit_code != 0 and why in r.output, r.output
        assert not (tmp_path / "again").exists()


def test_logits_to_keep_slices_before_the_lm_head(tmp_path):
    """optimize/logits_to_keep on small hand-written graphs: the lm_head found through a
    soft-capping Tanh / Mul, the optional input defaulting to every position, 1 giving the last
    position's logits exactly; a graph whose logits do not come from a weight MatMul is left as
    it was, with the reason; remove_logits_to_keep restores the graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnxport.optimize.logits_to_keep import add_logits_to_keep, remove_logits_to_keep

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 11)).astype(np.float32), "lm_head.weight")
    cap = numpy_helper.from_array(np.array(3.0, np.float32), "cap")
    x = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 11])
    capped = helper.make_graph([helper.make_node("Relu", ["hidden"], ["h"]),
                                helper.make_node("MatMul", ["h", "lm_head.weight"], ["z"]),
                                helper.make_node("Div", ["z", "cap"], ["d"]),
                                helper.make_node("Tanh", ["d"], ["t"]),
                                helper.make_node("Mul", ["t", "cap"], ["logits"])], "g", [x], [y], [w, cap])
    mixed = helper.make_graph([helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["z"]),
                               helper.make_node("Softmax", ["z"], ["logits"], axis=1)], "g", [x], [y], [w])
    feed = {"hidden": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    for name, graph in (("capped", capped), ("mixed", mixed)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        original = onnx.load(str(path))
        full = ort.InferenceSession(str(path)).run(["logits"], feed)[0]
        rec = add_logits_to_keep(path)
        if name == "mixed":  # Softmax over the sequence mixes positions: not sliceable
            assert not rec["applied"] and "Softmax" in rec["result"]
            assert onnx.load(str(path)) == original
            continue
        assert rec["applied"] and "MatMul" in rec["result"], rec
        assert add_logits_to_keep(path)["applied"] is False  # once only
        sess = ort.InferenceSession(str(path))
        np.testing.assert_array_equal(sess.run(["logits"], feed)[0], full)  # not fed: every position
        for k in (1, 2):
            got = sess.run(["logits"], {**feed, "logits_to_keep": np.array(k, np.int64)})[0]
            assert got.shape == (2, k, 11)
            np.testing.assert_allclose(got, full[:, -k:], rtol=1e-6, atol=1e-6)
        assert remove_logits_to_keep(path) and not remove_logits_to_keep(path)
        restored = onnx.load(str(path))
        assert [(n.op_type, list(n.input)) for n in restored.graph.node] == \
            [(n.op_type, list(n.input)) for n in original.graph.node]
        assert [i.name for i in restored.graph.input] == ["hidden"]
        assert {t.name for t in restored.graph.initializer} == {"lm_head.weight", "cap"}
