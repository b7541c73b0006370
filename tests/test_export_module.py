"""`onnxport export-module`: any submodule by dotted path with an input spec, through the CLI;
bad input gives one line, exit 2, and writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_cli_bad_input import assert_clean_failure, run

from onnxport.config import VerifyConfig
from onnxport.errors import InputError
from onnxport.recipes.parts import parse_input_spec


def test_export_module_whisper_encoder(encoder_checkpoints, tmp_path):
    out = tmp_path / "enc"
    res = run("export-module", encoder_checkpoints("whisper"), "-o", out, "--module", "encoder",
              "--input", "input_features:float32[batch,16,100]", "--output-name", "last_hidden_state")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    (g,) = manifest["graphs"]
    assert g["file"] == "encoder.onnx" and g["role"] == "module"
    assert g["inputs"] == [{"name": "input_features", "dtype": "float32", "dims": ["batch", 16, 100]}]
    assert g["outputs"][0]["dims"] == ["batch", 50, 64]
    assert manifest["verification"]["ok"]
    assert {r["sizes"]["batch"] for r in g["verification"]["results"]} == {2, 3}
    assert "encoder.onnx" in res.output


def test_export_module_names_derived_dims(encoder_checkpoints, tmp_path):
    """Qwen2.5-VL's patch merger alone: 4 patches merge into one token -> `num_patches_div4`."""
    out = tmp_path / "merger"
    res = run("export-module", encoder_checkpoints("qwen2_5_vl"), "-o", out, "--module", "model.visual.merger",
              "--input", "x:float32[num_patches=16,64]")
    assert res.exit_code == 0, res.output
    g = json.loads((out / "manifest.json").read_text())["graphs"][0]
    assert g["outputs"] == [{"name": "output", "dtype": "float32", "dims": ["num_patches_div4", 48]}]
    sizes = [r["sizes"]["num_patches"] for r in g["verification"]["results"]]
    assert sizes == [16, 32]


def test_export_command_handles_encoder_checkpoints_and_verify_reruns(exported_encoder, tmp_path):
    bundle, _ = exported_encoder("whisper")
    res = run("verify", bundle)
    assert res.exit_code == 0, res.output
    assert "audio.onnx" in res.output and "FAIL" not in res.output


def test_wrong_module_path_suggests_close_names(encoder_checkpoints, tmp_path):
    out = tmp_path / "x"
    res = run("export-module", encoder_checkpoints("whisper"), "-o", out, "--module", "encoderr.layer.0",
              "--input", "x:float32[batch,16,100]")
    assert_clean_failure(res, out, "not found", "encoder.layers.0", code=2)


@pytest.mark.parametrize("spec, needle", [("pixel_values:float32(1,3)", "malformed --input"),
                                          ("x:float8[1,2]", "unknown dtype"),
                                          ("x:float32[1,-2]", "malformed dim"),
                                          ("ids:int64[batch]=5..1", "empty value range")])
def test_malformed_input_spec(spec, needle, encoder_checkpoints, tmp_path):
    out = tmp_path / "x"
    res = run("export-module", encoder_checkpoints("whisper"), "-o", out, "--module", "encoder", "--input", spec)
    assert_clean_failure(res, out, needle, code=2)


def test_input_spec_grammar():
    s = parse_input_spec("input_ids:int64[batch,seq=16,4]=0..1000")
    assert (s.name, s.dtype, s.dims, dict(s.sizes), s.low, s.high) == ("input_ids", "int64", ("batch", "seq", 4),
                                                                       {"seq": 16}, 0, 1000)
    with pytest.raises(InputError):
        parse_input_spec("no_dtype[1]")


def test_inputs_the_module_rejects_name_the_problem(encoder_checkpoints, tmp_path):
    out = tmp_path / "x"
    res = run("export-module", encoder_checkpoints("whisper"), "-o", out, "--module", "encoder",
              "--input", "input_features:float32[batch,16,77]")
    assert_clean_failure(res, out, "PyTorch itself fails", code=2)


def test_dim_that_cannot_vary_is_reported(encoder_checkpoints, tmp_path):
    out = tmp_path / "x"
    res = run("export-module", encoder_checkpoints("whisper"), "-o", out, "--module", "encoder",
              "--input", "input_features:float32[batch,16,frames=100]")
    assert_clean_failure(res, out, "named dims change", "frames", code=2)


def test_unknown_rewrite_name(encoder_checkpoints, tmp_path):
    out = tmp_path / "x"
    res = run("export-module", encoder_checkpoints("whisper"), "-o", out, "--module", "encoder",
              "--input", "input_features:float32[batch,16,100]", "--no-rewrite", "stft_as_fft")
    assert_clean_failure(res, out, "not a rewrite", "stft_as_conv", code=2)


def test_remote_code_is_opt_in(encoder_checkpoints, tmp_path):
    ckpt = tmp_path / "remote"
    shutil.copytree(encoder_checkpoints("whisper"), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x"
    res = run("export-module", ckpt, "-o", out, "--module", "encoder", "--input", "input_features:float32[batch,16,100]")
    assert_clean_failure(res, out, "remote code", "--trust-remote-code", code=2)


def test_a_rewrite_that_changes_numerics_is_named(monkeypatch, tmp_path):
    """A (deliberately wrong) rewrite: the export fails, naming it, before anything is written."""
    import contextlib

    from onnxport import patches
    from onnxport.errors import VerificationError
    from onnxport.export.module import export_part
    from onnxport.recipes.parts import ModulePart, TensorSpec
    from onnxport.verify.module import part_check

    class Tanh(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    class WrongTanh(patches.Patch):
        name = "tanh_as_wrong"
        exporters = ("dynamo", "torchscript")

        def applies(self, module):
            return isinstance(module, Tanh)

        @contextlib.contextmanager
        def patched(self, module=None):
            orig = torch.tanh
            torch.tanh = torch.sigmoid
            try:
                yield
            finally:
                torch.tanh = orig

    patches.all_patches()
    monkeypatch.setitem(patches._REGISTRY, "tanh_as_wrong", WrongTanh)
    part = ModulePart("t", Tanh(), [TensorSpec("x", "float32", ("batch", 4))], ["y"], [{"batch": 2}, {"batch": 3}])
    with pytest.raises(VerificationError, match="rewrite tanh_as_wrong changes t's output y"):
        export_part(part, tmp_path, "dynamo", 18, part_check(VerifyConfig(atol=1e-4)))
    assert not list(tmp_path.iterdir())


def test_wrong_argument_name_lists_the_real_ones(encoder_checkpoints, tmp_path):
    out = tmp_path / "x"
    res = run("export-module", encoder_checkpoints("qwen2_5_vl"), "-o", out, "--module", "model.visual.merger",
              "--input", "hidden_states:float32[num_patches=16,64]")
    assert_clean_failure(res, out, "no argument 'hidden_states'", "its arguments: x", code=2)


def test_exporter_failure_names_the_cause_and_hints_the_fix(tmp_path):
    from onnxport.errors import ExportError
    from onnxport.export.module import export_part
    from onnxport.recipes.parts import ModulePart, TensorSpec
    from onnxport.verify.module import part_check

    class BranchOnValue(torch.nn.Module):  # a Python branch on tensor values
        def forward(self, x, n):
            return x * 2 if int(n.max().item()) > 1 else x * 3

    part = ModulePart("m", BranchOnValue(), [TensorSpec("x", "float32", ("rows", 3)), TensorSpec("n", "int64", (1,), low=1, high=3)],
                      ["y"], [{"rows": 4}, {"rows": 6}])
    with pytest.raises(ExportError) as err:
        export_part(part, tmp_path, "dynamo", 18, part_check(VerifyConfig(atol=1e-4)))
    assert "torch.onnx (dynamo) failed on m.onnx" in err.value.message
    assert "compute it outside the graph" in err.value.hint
    assert not list(tmp_path.iterdir())


def test_export_command_on_an_encoder_checkpoint(encoder_checkpoints, tmp_path):
    out = tmp_path / "siglip"
    res = run("export", encoder_checkpoints("siglip"), "-o", out)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnxport_task"] == "feature-extraction" and manifest["verification"]["ok"]
    assert "vision.onnx" in res.output and "ok" in res.output
    res = run("export", encoder_checkpoints("siglip"), "-o", tmp_path / "s2", "--layout", "split")
    assert_clean_failure(res, tmp_path / "s2", "applies to decoder LMs", code=2)
