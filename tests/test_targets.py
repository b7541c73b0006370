"""Targets (targets/): `export --target T` presets for cpu, tensorrt, openvino and npu export
the trained demo model and the qwen2 tiny model, record what they chose, and pass their own
`onnxport check`; check reports what a target rejects (com.microsoft ops for TensorRT, dynamic
dims and a monolithic layout for an NPU), runs the real toolchain where it installs (OpenVINO:
compiled, run and compared with ONNX Runtime; an op it cannot convert is named), and an OpenVINO
run of the `--target openvino` demo bundle gives ONNX Runtime's greedy tokens."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from conftest import DEMO_DIR
from typer.testing import CliRunner

from onnxport.cli import app

TARGETS = ("cpu", "tensorrt", "openvino", "npu")


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_checkpoints):
    """(model, target) -> bundle, exported once through the CLI."""
    root = tmp_path_factory.mktemp("targets")
    cache = {}

    def get(model: str, target: str):
        if (model, target) not in cache:
            src = DEMO_DIR if model == "demo" else tiny_checkpoints(model)
            out = root / f"{model}-{target}"
            res = CliRunner().invoke(app, ["export", str(src), "-o", str(out), "--target", target])
            assert res.exit_code == 0, res.output
            cache[(model, target)] = (out, res.output)
        return cache[(model, target)]

    return get


def _check(bundle, target) -> tuple[int, dict]:
    res = CliRunner().invoke(app, ["check", str(bundle), "--target", target, "--json"])
    return res.exit_code, json.loads(res.output[res.output.index("{"):])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ["demo", "qwen2"])
def test_preset_exports_verifies_records_and_passes_its_own_check(model, target, made):
    from onnxport.targets import get_target

    bundle, output = made(model, target)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["verification"]["ok"]
    recorded = manifest["export"]["target"]
    assert recorded["name"] == target and recorded["flags"] == {
        k: v for k, v in get_target(target).preset.items() if k not in ("attention",) or v != "default"}
    assert f"target {target}:" in output
    code, record = _check(bundle, target)
    assert code == 0 and record["ok"] and record["errors"] == 0, record["findings"]
    if target == "npu":
        assert manifest["layout"]["kind"] == "split" and manifest["layout"]["static"]
        assert all(isinstance(d, int) for g in manifest["graphs"] if g["file"].endswith(".onnx")
                   for t in g["inputs"] for d in t["dims"])
    if target == "cpu":
        assert manifest["graphs"][0]["attention"] == "com.microsoft.GroupQueryAttention"


def test_check_names_what_each_target_rejects(made, tmp_path):
    from onnxport.api import quantize
    from onnxport.config import QuantConfig

    fast, _ = made("qwen2", "cpu")  # GroupQueryAttention + fusions
    code, record = _check(fast, "tensorrt")
    assert code == 4 and not record["ok"]
    ops = {f["op"] for f in record["findings"] if f["severity"] == "error"}
    assert "com.microsoft.GroupQueryAttention" in ops
    q4 = tmp_path / "q4"
    quantize(fast, q4, QuantConfig(bits=4, escalate=False, max_ppl_increase=10.0))
    code, record = _check(q4, "tensorrt")
    assert "com.microsoft.MatMulNBits" in {f["op"] for f in record["findings"] if f["severity"] == "error"}
    code, record = _check(q4, "openvino")  # OpenVINO converts both contrib ops, and matches ORT
    assert code == 0 and record["ok"], record["findings"]
    assert any("batch > 1" in f["message"] for f in record["findings"] if f["severity"] == "warning")
    default, _ = made("demo", "openvino")
    code, record = _check(default, "npu")
    messages = [f["message"] for f in record["findings"] if f["severity"] == "error"]
    assert code == 4 and any("monolithic layout" in m for m in messages) and any("dynamic dims" in m for m in messages)


def test_an_op_openvino_cannot_convert_is_named(made, tmp_path):
    from onnxport.bundle.seal import reseal

    bundle = tmp_path / "b"
    shutil.copytree(made("demo", "openvino")[0], bundle)
    m = onnx.load(str(bundle / "model.onnx"))
    node = next(n for n in m.graph.node if n.op_type == "Softmax")
    node.domain, node.op_type = "org.example", "FancySoftmax"
    m.opset_import.append(onnx.helper.make_opsetid("org.example", 1))
    onnx.save(m, str(bundle / "model.onnx"))
    reseal(bundle)
    code, record = _check(bundle, "openvino")
    assert code == 4 and any("FancySoftmax" in f["message"] for f in record["findings"] if f["severity"] == "error")
    code, record = _check(bundle, "cpu")  # ONNX Runtime cannot load it either
    assert code == 4 and any("cannot load" in f["message"] for f in record["findings"])


def test_openvino_generates_onnxruntime_tokens_for_its_target_bundle(made):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from onnxport.runtime import Generator

    bundle, _ = made("demo", "openvino")
    prompts = [[284, 70, 288, 73, 66, 8, 78, 836], [11, 600, 23, 8]]
    ort = Generator(bundle).generate_ids(prompts, max_new_tokens=24, eos_token_id=None).padded
    ov = Generator(bundle, runtime="openvino").generate_ids(prompts, max_new_tokens=24, eos_token_id=None).padded
    assert (ov == ort).all()


def test_an_option_given_with_the_target_wins(tiny_checkpoints, tmp_path):
    res = CliRunner().invoke(app, ["export", str(tiny_checkpoints("llama")), "-o", str(tmp_path / "o"), "--target",
                                   "npu", "--opset", "14", "--no-verify"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["export"]["opset"] == 14 and "opset" not in m["export"]["target"]["flags"]
    bad = CliRunner().invoke(app, ["export", str(tiny_checkpoints("llama")), "-o", str(tmp_path / "x"), "--target", "tpu"])
    assert bad.exit_code == 2 and "unknown target 'tpu'" in bad.output and not (tmp_path / "x").exists()


def test_calibration_set_matches_each_graph_and_reproduces_its_outputs(made, tmp_path):
    """`onnxport calib` on the --target npu bundle: every graph gets samples whose arrays have
    exactly its input names, dtypes and (static) shapes, in the four layouts; feeding a sample
    to ONNX Runtime gives the outputs recorded beside it."""
    import numpy as np
    import onnxruntime as ort

    bundle, _ = made("qwen2", "npu")
    prompts = tmp_path / "p.txt"
    prompts.write_text("The os module provides\ndef fib(n):\n")
    out = tmp_path / "calib"
    res = CliRunner().invoke(app, ["calib", str(bundle), "-o", str(out), "--prompts", str(prompts), "-n", "3"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    summary = json.loads((out / "calib.json").read_text())
    graphs = [g for g in manifest["graphs"] if g["file"].endswith(".onnx")]
    assert set(summary["graphs"]) == {g["file"] for g in graphs}
    for g in graphs:
        d = out / g["file"].removesuffix(".onnx")
        samples = sorted((d / "samples").glob("*.npz"))
        assert samples and len((d / "dataset.txt").read_text().splitlines()) == len(samples)
        assert len((d / "input_list.txt").read_text().splitlines()) == len(samples)
        sess = ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
        for k, f in enumerate(samples[:3]):
            x = dict(np.load(f))
            assert list(x) == [t["name"] for t in g["inputs"]]
            for t in g["inputs"]:
                assert str(x[t["name"]].dtype) == t["dtype"] and list(x[t["name"]].shape) == t["dims"]
                assert (d / t["name"] / f"{f.stem}.raw").stat().st_size == x[t["name"]].nbytes
                np.testing.assert_array_equal(np.load(d / t["name"] / f"{f.stem}.npy"), x[t["name"]])
            want = dict(np.load(d / "outputs" / f.name))
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, x)))
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    again = CliRunner().invoke(app, ["calib", str(bundle), "-o", str(out), "--force", "-n", "1"])
    assert again.exit_code == 0, again.output  # a calibration set onnxport wrote may be replaced
    mono, _ = made("demo", "openvino")
    res = CliRunner().invoke(app, ["calib", str(mono), "-o", str(tmp_path / "c2")])
    assert res.exit_code == 2 and "not a split bundle" in res.output and not (tmp_path / "c2").exists()
