"""Bounded-memory export (`--low-memory`): the decoder is traced on the meta device and every
weight is streamed from the safetensors checkpoint into the graph's external data, cast once
to the graph dtype. Proven on a tied, bf16-stored checkpoint with a lowered external-data
threshold: verification passes, greedy tokens equal transformers', every weight is accounted
for, and no parameter of the traced model ever holds data.

Verification stays bounded too, proven here with a lowered segment budget: ONNX Runtime runs
the graph segment by segment (runtime/segments.py: each segment's weights loaded alone, the
results equal to one session's), and the PyTorch reference is the meta model whose modules
read their weights from the checkpoint only while they run (export/stream.StreamedForward)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import hf_greedy, make_tiny_checkpoint
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.runtime import Generator

PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 600, 23]]
#: a segment budget far below the tiny model's ~0.56 MB of fp32 weights: many segments
SEGMENT_BYTES = 40_000


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """qwen2 (tied embeddings) saved in bfloat16, as real checkpoints ship."""
    from transformers import AutoModelForCausalLM

    out = make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("ckpt") / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(out)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def low_memory_bundle(bf16_checkpoint, tmp_path_factory):
    from onnxport.api import export
    from onnxport.config import ExportConfig, VerifyConfig
    from onnxport.export import stream

    materialized = []
    orig = stream.skeleton_model

    def spy(*a, **kw):
        model, buffers = orig(*a, **kw)
        materialized.extend(n for n, p in model.named_parameters() if p.device.type != "meta")
        return model, buffers

    stream.skeleton_model = spy
    try:
        out = tmp_path_factory.mktemp("b") / "bundle"
        manifest = export(bf16_checkpoint, out, ExportConfig(low_memory=True, external_data_threshold_bytes=1),
                          VerifyConfig(segment_bytes=SEGMENT_BYTES))
    finally:
        stream.skeleton_model = orig
    return out, manifest, materialized


def test_low_memory_export_verifies_and_matches_transformers(low_memory_bundle, bf16_checkpoint):
    out, manifest, materialized = low_memory_bundle
    assert not materialized  # the traced model never held a weight
    assert manifest.verification["ok"]
    checks = manifest.verification["checks"]
    assert checks["onnxruntime"]["mode"] == "segments" and checks["onnxruntime"]["segments"] >= 8
    assert checks["pytorch"].startswith("streamed")
    assert manifest.weights["skipped"] == {"lm_head.weight": "tied to model.embed_tokens.weight"}
    assert (out / "model.onnx.data").stat().st_size > 0
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["graphs"][0]["external_data"] == ["model.onnx.data"]
    from transformers import AutoModelForCausalLM

    # the graph computes in float32 (the export dtype); so must the reference (5.x would load bf16)
    ref_model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    ours = Generator(out).generate_ids(PROMPTS, max_new_tokens=12, eos_token_id=None).padded
    np.testing.assert_array_equal(ours, hf_greedy(bf16_checkpoint, PROMPTS, 12, model=ref_model))


def test_low_memory_graph_equals_the_in_memory_export(low_memory_bundle, bf16_checkpoint, tmp_path):
    """Same checkpoint, both paths: the streamed weights are the loaded ones (cast bf16 -> fp32)."""
    from onnxport.runtime.session import make_session
    from onnxport.spec import DECODER_CASES, feeds

    res = CliRunner().invoke(app, ["export", str(bf16_checkpoint), "-o", str(tmp_path / "ref"), "--no-verify"])
    assert res.exit_code == 0, res.output
    a = make_session(low_memory_bundle[0] / "model.onnx")
    b = make_session(tmp_path / "ref" / "model.onnx")
    from onnxport.bundle import read_manifest

    graph = read_manifest(tmp_path / "ref").graph("decoder")
    x = feeds(graph.inputs, DECODER_CASES[1].sizes, 0, 1024, left_pad=DECODER_CASES[1].left_pad)
    np.testing.assert_allclose(a.run(["logits"], x)[0], b.run(["logits"], x)[0], atol=1e-5, rtol=1e-5)


def test_a_model_in_memory_is_verified_in_one_session(bf16_checkpoint, tmp_path, monkeypatch):
    """The same segment budget, the model loaded whole: ONNX Runtime runs the graph as one
    session (faster and lighter than segments while it fits in a quarter of the available
    memory); past that share it runs in segments, and --low-memory always does (above)."""
    from onnxport.api import export
    from onnxport.config import ExportConfig, VerifyConfig
    from onnxport.runtime import segments

    cfg = ExportConfig(external_data_threshold_bytes=1)
    m = export(bf16_checkpoint, tmp_path / "a", cfg, VerifyConfig(segment_bytes=SEGMENT_BYTES))
    assert m.verification["ok"] and m.verification["checks"]["onnxruntime"]["mode"] == "one session"
    assert segments.segment_budget(SEGMENT_BYTES, bounded=True) == SEGMENT_BYTES
    monkeypatch.setattr(segments, "available_memory", lambda: 4 * SEGMENT_BYTES)  # a quarter: one segment's worth
    m = export(bf16_checkpoint, tmp_path / "b", cfg, VerifyConfig(segment_bytes=SEGMENT_BYTES))
    assert m.verification["ok"] and m.verification["checks"]["onnxruntime"]["mode"] == "segments"


def test_low_memory_refuses_split_layout_in_one_line(bf16_checkpoint, tmp_path):
    res = CliRunner().invoke(app, ["export", str(bf16_checkpoint), "-o", str(tmp_path / "b"), "--low-memory",
                                   "--layout", "split"])
    assert res.exit_code == 2, res.output
    assert "--low-memory" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_low_memory_refuses_a_renamed_checkpoint_tensor(bf16_checkpoint, tmp_path):
    """A tensor the model has no parameter for is never dropped or guessed."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(bf16_checkpoint, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.norm.weight_renamed"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--low-memory"])
    assert res.exit_code != 0, res.output
    assert "weight_renamed" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_segmented_run_equals_one_session(low_memory_bundle):
    """Cut anywhere, the segments compute the whole graph: same outputs as one session, for
    every verification shape, at budgets from one node per segment to the whole graph."""
    import onnx

    from onnxport.bundle import read_manifest
    from onnxport.runtime.segments import SegmentedRunner, plan_segments, weight_bytes
    from onnxport.runtime.session import make_session
    from onnxport.spec import DECODER_CASES, feeds

    out = low_memory_bundle[0]
    graph = read_manifest(out).graph("decoder")
    structure = onnx.load(str(out / graph.file), load_external_data=False)
    total = weight_bytes(structure)
    xs = [feeds(graph.inputs, c.sizes, i, 1024, left_pad=c.left_pad) for i, c in enumerate(DECODER_CASES)]
    whole = make_session(out / graph.file)
    refs = [dict(zip(graph.output_names, whole.run(graph.output_names, x))) for x in xs]
    for budget in (1, SEGMENT_BYTES, total):
        segments = plan_segments(structure, budget)
        assert (len(segments) == 1) == (budget == total)
        # each segment holds at most the budget, unless one node alone reads more
        assert all(s.weight_bytes <= budget or s.stop - s.start == 1 for s in segments)
        got = SegmentedRunner(out / graph.file, budget, structure=structure).run(graph.output_names, xs)
        for ref, g in zip(refs, got):
            for name in graph.output_names:
                np.testing.assert_allclose(g[name], ref[name], atol=1e-5, rtol=1e-5, err_msg=f"{name} at {budget}")


def test_streamed_reference_holds_one_module_at_a_time(bf16_checkpoint):
    """The streamed PyTorch model computes transformers' logits, and between module calls no
    parameter holds data."""
    from transformers import AutoModelForCausalLM

    from onnxport.checkpoint import open_checkpoint
    from onnxport.export.stream import skeleton_model, streamed_reference
    from onnxport.recipes import get_recipes

    ckpt = open_checkpoint(bf16_checkpoint)
    recipe = get_recipes(ckpt.model_type, ("decoder",), ckpt.config)["decoder"]
    model, buffers = skeleton_model(recipe, ckpt, torch.float32)
    streamer = streamed_reference(model, ckpt, buffers, torch.float32)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert all(p.device.type == "meta" for p in model.parameters())
    largest = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in model.modules())
    assert streamer.peak_module_bytes == largest < sum(p.numel() * 4 for p in model.parameters()) / 2
    ref_model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_low_memory_fp16_is_guarded_and_verified_in_segments(bf16_checkpoint, tmp_path):
    """--low-memory --dtype fp16: the guard's range pass and every candidate check run in
    segments against the streamed reference; the PyTorch reference runs once per shape."""
    from onnxport.api import export
    from onnxport.config import ExportConfig, VerifyConfig
    from onnxport.export import stream

    calls = []
    orig = stream.StreamedForward._loader

    def counting(self, module, prefix, names):
        hook = orig(self, module, prefix, names)

        def wrapped(m, args):
            if prefix == "lm_head":
                calls.append(1)
            return hook(m, args)

        return wrapped

    stream.StreamedForward._loader = counting
    try:
        manifest = export(bf16_checkpoint, tmp_path / "b", ExportConfig(low_memory=True, dtype="fp16",
                                                                      external_data_threshold_bytes=1),
                          VerifyConfig(segment_bytes=SEGMENT_BYTES))
    finally:
        stream.StreamedForward._loader = orig
    v = manifest.verification
    assert v["ok"] and v["tolerance"]["dtype"] == "float16"
    assert v["checks"]["onnxruntime"]["mode"] == "segments"
    assert manifest.graph("decoder").precision["dtype"] == "float16"
    # 4 verification shapes + the prefixes that make the 2 cases' past caches, each computed
    # once for the fp32 check and every fp16 candidate
    assert len(calls) == 6
