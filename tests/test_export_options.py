"""Export options (kv layout / naming, TorchScript exporter, opset), graph contract, manifest,
weight accounting, and verification that fails loudly on a wrong graph."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from conftest import hf_greedy
from typer.testing import CliRunner

from onnxport.runtime import Generator

PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 600, 23]]
ALLOWED_DIMS = {"batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"}


def graph_dims(path):
    m = onnx.load(str(path), load_external_data=False)
    return m, {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(m.graph.input) + list(m.graph.output)
    }


def test_bshd_seed_naming_contract_and_parity(exported, tiny_checkpoints):
    bundle = exported("llama", kv_layout="bshd", kv_naming="seed")
    m, dims = graph_dims(bundle / "model.onnx")
    # what a caller must feed; logits_to_keep is optional (backed by an initializer)
    defaults = {t.name for t in m.graph.initializer}
    names = [v.name for v in m.graph.input if v.name not in defaults]
    assert names == ["input_ids", "attention_mask", "position_ids",
                     "past_key_in0", "past_value_in0", "past_key_in1", "past_value_in1"]
    assert [v.name for v in m.graph.input if v.name in defaults] == ["logits_to_keep"]
    assert [v.name for v in m.graph.output] == ["logits", "past_key0", "past_value0", "past_key1", "past_value1"]
    assert dims["past_key_in0"] == ["batch_size", "past_sequence_length", 2, 16]
    assert dims["past_value1"] == ["batch_size", "total_sequence_length", 2, 16]
    ours = Generator(bundle).generate_ids(PROMPTS, max_new_tokens=16, eos_token_id=None)
    np.testing.assert_array_equal(ours.padded, hf_greedy(tiny_checkpoints("llama"), PROMPTS, 16))


def test_torchscript_exporter_parity(exported, tiny_checkpoints):
    bundle = exported("llama", exporter="torchscript", opset=17)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["export"]["exporter"] == "torchscript" and manifest["verification"]["ok"]
    m, dims = graph_dims(bundle / "model.onnx")
    assert m.opset_import[0].version == 17 or any(o.version == 17 for o in m.opset_import if o.domain == "")
    assert dims["present.1.value"] == ["batch_size", 2, "total_sequence_length", 16]
    ours = Generator(bundle).generate_ids(PROMPTS, max_new_tokens=16, eos_token_id=None)
    np.testing.assert_array_equal(ours.padded, hf_greedy(tiny_checkpoints("llama"), PROMPTS, 16))


@pytest.mark.parametrize("opts", [{}, {"exporter": "torchscript", "opset": 17}])
def test_dims_are_named_no_exporter_leftovers(exported, opts):
    m, dims = graph_dims(exported("llama", **opts) / "model.onnx")
    for name, ds in dims.items():
        for d in ds:
            assert isinstance(d, int) or d in ALLOWED_DIMS, (name, ds)
    for vi in m.graph.value_info:
        for d in vi.type.tensor_type.shape.dim:
            assert not re.fullmatch(r"s\d+.*|unk__\d+", d.dim_param or "x"), (vi.name, d.dim_param)


def test_manifest_records_everything(exported, tiny_checkpoints):
    bundle = exported("qwen2")
    mf = json.loads((bundle / "manifest.json").read_text())
    assert mf["schema_version"] == 2
    assert [(p["name"], p["kind"], p["graphs"]) for p in mf["parts"]] == [("decoder", "decoder", ["model.onnx"])]
    assert mf["parts"][0]["verification"]["ok"] and mf["graphs"][0]["part"] == "decoder"
    assert set(mf["versions"]) >= {"onnxport", "torch", "transformers", "onnx", "onnxruntime"}
    assert re.fullmatch(r"[0-9a-f]{64}", mf["source"]["sha256"])
    assert mf["model"]["model_type"] == "qwen2" and mf["kv_cache"]["num_kv_heads"] == 2
    # where the export's time went, stage by stage
    phases = mf["export"]["phases"]
    assert set(phases) == {"load", "export", "verify", "optimize"} and all(v >= 0 for v in phases.values())
    assert phases["export"] > 0 and phases["verify"] > 0 and sum(phases.values()) <= mf["export"]["seconds"]
    g = mf["graphs"][0]
    assert g["role"] == "decoder" and g["file"] == "model.onnx"
    assert g["inputs"][0] == {"name": "input_ids", "dtype": "int64", "dims": ["batch_size", "sequence_length"]}
    # tied lm_head: not in the graph, and said so
    assert mf["weights"]["skipped"] == {"lm_head.weight": "tied to model.embed_tokens.weight"}
    assert mf["weights"]["in_graph"] > 10
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (bundle / f).is_file()
    assert not list(bundle.parent.glob(".*partial-*"))


def test_unused_checkpoint_weight_fails_export(tiny_checkpoints, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from onnxport.api import export
    from onnxport.errors import ExportError

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints("llama"), ck)
    sd = load_file(ck / "model.safetensors")
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="not used by the model: model.layers.0.mlp.extra_proj.weight"):
        export(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_missing_from_graph_is_detected(tiny_checkpoints):
    from onnxport.checkpoint import open_checkpoint
    from onnxport.errors import ExportError
    from onnxport.export.load import load_model
    from onnxport.export.weights import account_weights
    from onnxport.recipes import get_recipe

    ck = open_checkpoint(tiny_checkpoints("llama"))
    model = load_model(get_recipe("llama"), ck)
    arrays = {n: p.detach().numpy() for n, p in model.named_parameters()}
    assert account_weights(model, set(ck.tensors), arrays)["in_graph"] == len(arrays)
    # transposed copies are found by content (TorchScript folds transposes into new names)
    renamed = {f"onnx::MatMul_{i}": a.T.copy() for i, a in enumerate(arrays.values())}
    assert account_weights(model, set(ck.tensors), renamed)["in_graph"] == len(arrays)
    arrays.pop("model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ExportError, match="model.layers.1.mlp.down_proj.weight"):
        account_weights(model, set(ck.tensors), arrays)


def test_verify_cli_passes_then_fails_loudly_on_a_corrupted_graph(exported, tmp_path):
    from onnxport.cli import app

    bundle = tmp_path / "b"
    shutil.copytree(exported("llama"), bundle)
    res = CliRunner().invoke(app, ["verify", str(bundle)])
    assert res.exit_code == 0, res.output
    # corrupt one weight, found by its checkpoint name
    m = onnx.load(str(bundle / "model.onnx"))
    for init in m.graph.initializer:
        if init.name == "model.embed_tokens.weight":
            arr = onnx.numpy_helper.to_array(init).copy()
            arr *= 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            break
    else:
        raise AssertionError("embedding weight not found by name")
    onnx.save(m, str(bundle / "model.onnx"))
    before = (bundle / "manifest.json").read_text()
    res = CliRunner().invoke(app, ["verify", str(bundle)])
    assert res.exit_code == 4, res.output
    assert "verification failed: logits at batch=1,seq=1,past=0" in res.output
    # a failed re-check does not overwrite the record of the export that passed
    assert (bundle / "manifest.json").read_text() == before


def test_tiny_epsilon_survives_the_exporters_optimizer(tmp_path):
    """onnxscript's `x + 0` rule matched constants within 1e-8, dropping an RMSNorm's eps of
    1e-8 (helium): an all-zero pad embedding then normalised to 0 * inf = NaN."""
    import torch

    from onnxport.export.graph import export_graph
    from onnxport.runtime.session import make_session
    from onnxport.spec import TensorSpec

    class Norm(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)

    spec = [TensorSpec("x", "float32", ("batch_size", 8))]
    out = tmp_path / "norm.onnx"
    export_graph(Norm(), (torch.ones(2, 8),), spec, [TensorSpec("y", "float32", ("batch_size", 8))], out,
                 "dynamo", 18, 1 << 30)
    x = np.zeros((2, 8), np.float32)
    x[1] = 3.0
    y = make_session(out).run(None, {"x": x})[0]
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, Norm()(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_no_package_is_also_a_function(tmp_path):
    """`onnxport.export` is the export stage's package and nothing else: the functions are
    `onnxport.api`'s (no module pretends to be callable)."""
    import types

    import onnxport
    import onnxport.api
    import onnxport.export.decoder  # noqa: F401
    from onnxport.errors import CheckpointError

    assert isinstance(onnxport.export, types.ModuleType) and not callable(onnxport.export)
    assert type(onnxport.export) is types.ModuleType
    with pytest.raises(CheckpointError, match="does not exist"):
        onnxport.api.export(tmp_path / "missing", tmp_path / "out")
