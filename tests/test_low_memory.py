"""Bounded-memory export (`--low-memory`): the decoder is traced on the meta device and every
weight is streamed from the safetensors checkpoint into the graph's external data, cast once
to the graph dtype. Proven on a tied, bf16-stored checkpoint with a lowered external-data
threshold: verification passes, greedy tokens equal transformers', every weight is accounted
for, and no parameter of the traced model ever holds data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import hf_greedy, make_tiny_checkpoint
from onnxport.cli import app
from onnxport.runtime import Generator

PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 600, 23]]


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
    from onnxport import export
    from onnxport.config import ExportConfig
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
        manifest = export(bf16_checkpoint, out, ExportConfig(low_memory=True, external_data_threshold_bytes=1))
    finally:
        stream.skeleton_model = orig
    return out, manifest, materialized


def test_low_memory_export_verifies_and_matches_transformers(low_memory_bundle, bf16_checkpoint):
    out, manifest, materialized = low_memory_bundle
    assert not materialized  # the traced model never held a weight
    assert manifest.verification["ok"]
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
