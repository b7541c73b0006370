"""OpenVINO as a second runtime (runtime/openvino.py): the same generation loop on OpenVINO's CPU
plugin at f32 gives ONNX Runtime's greedy tokens for the default, GroupQueryAttention (com.microsoft
op; batches run one prompt at a time there), int4 (MatMulNBits), fp16 and split bundles, and
`onnxport generate --runtime openvino` prints ONNX Runtime's text for the trained demo model.
Uses the real `openvino` package; skipped with the reason when it does not import."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEMO_DIR
from typer.testing import CliRunner

pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 600, 23, 8]]
NEW = 16


def _both(bundle) -> tuple[list, list]:
    from onnxport.runtime import Generator

    return tuple(Generator(bundle, runtime=rt).generate_ids(PROMPTS, max_new_tokens=NEW, eos_token_id=None).padded.tolist()
                 for rt in ("onnxruntime", "openvino"))


@pytest.mark.parametrize("opts", [{}, {"attention": "gqa", "optimize": True}, {"split": {"pack": 1}, "kv_layout": "bshd"}],
                         ids=["default", "gqa", "split"])
def test_openvino_generates_onnxruntime_tokens(opts, exported):
    ort, ov = _both(exported("llama", **opts))
    assert ov == ort


def test_openvino_runs_int4_and_fp16_bundles(exported, tiny_checkpoints, tmp_path):
    from onnxport.api import export, quantize
    from onnxport.config import ExportConfig, QuantConfig

    quantize(exported("llama"), tmp_path / "q4", QuantConfig(bits=4, escalate=False, max_ppl_increase=10.0))
    export(tiny_checkpoints("llama"), tmp_path / "f16", ExportConfig(dtype="fp16"))
    for name in ("q4", "f16"):
        ort, ov = _both(tmp_path / name)
        assert ov == ort, name


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from onnxport.api import export
    from onnxport.config import ExportConfig

    out = tmp_path_factory.mktemp("ov") / "demo"
    export(DEMO_DIR, out, ExportConfig())
    return out


def test_openvino_logits_match_onnxruntime_at_f32_on_trained_weights(demo):
    """The f32 hint is what makes the two agree: OpenVINO's CPU default (bf16 on processors that
    have it) moved these logits by 0.087 here; at f32 they are 8.6e-6 apart (max |logit| 11)."""
    from onnxport.runtime import Generator

    ids = [284, 70, 288, 73, 66, 8, 78, 836]
    a = Generator(demo).logits(ids)
    b = Generator(demo, runtime="openvino").logits(ids)
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()


def test_generate_runtime_flag_prints_onnxruntime_text(demo):
    from onnxport.cli import app

    runs = {rt: CliRunner().invoke(app, ["generate", str(demo), "-p", "def fib(n):", "-n", "24", "--no-stream",
                                         "--runtime", rt]) for rt in ("onnxruntime", "openvino")}
    assert all(r.exit_code == 0 for r in runs.values()), {k: r.output for k, r in runs.items()}
    text = {rt: r.output.split("tokens/s", 1)[1] for rt, r in runs.items()}  # after the timing line
    assert text["openvino"] == text["onnxruntime"] and len(text["onnxruntime"].strip()) > 20
    bad = CliRunner().invoke(app, ["generate", str(demo), "-p", "x", "--runtime", "tensorrt"])
    assert bad.exit_code == 2 and "runtime 'tensorrt' is not one of" in bad.output and "Traceback" not in bad.output
