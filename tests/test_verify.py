"""The comparison and its tolerances: explicit per dtype, scaled with the reference's magnitude
(large activations as in trained models), and strict enough to catch a real graph error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from onnxport.config import VerifyConfig
from onnxport.verify.compare import compare

FP32 = VerifyConfig()


def test_fp32_kernel_noise_on_large_activations_passes():
    rng = np.random.default_rng(0)
    ref = np.clip(rng.standard_normal(4096) * 300, -1000, 1000).astype(np.float32)
    ref[7] = 1300.0  # a residual stream as large as a trained 135M model's block 11
    got = ref * (1 + 1e-6 * rng.standard_normal(4096)).astype(np.float32)
    r = compare(got, ref, FP32.atol, FP32.min_cosine, FP32.rtol)
    assert r["max_abs_diff"] > FP32.atol  # an absolute 1e-3 alone would fail this
    assert r["ok"] and r["bound"] == pytest.approx(FP32.atol + FP32.rtol * 1300.0)


def test_real_errors_still_fail():
    rng = np.random.default_rng(1)
    ref = (rng.standard_normal(4096) * 400).astype(np.float32)
    wrong = ref.copy()
    wrong[:8] *= 1.01  # a 1 % error in a few values (a wrong mask row, a bad rotary position)
    assert not compare(wrong, ref, FP32.atol, FP32.min_cosine, FP32.rtol)["ok"]
    small = rng.standard_normal(4096).astype(np.float32)
    assert not compare(small + 2e-3, small, FP32.atol, FP32.min_cosine, FP32.rtol)["ok"]
    assert not compare(np.full(3, np.nan, np.float32), np.zeros(3, np.float32), 1, 0.5)["ok"]
    assert "shape" in compare(np.zeros(3), np.zeros(4), 1, 0.5)["error"]


def test_split_export_verifies_a_model_with_large_activations(tiny_checkpoints, tmp_path):
    """Scaled MLP outputs push the residual stream (block outputs) to ~1e4, as large as in
    trained models; fp32 kernel noise there exceeds an absolute 1e-3, the magnitude-scaled
    bound holds, and the greedy tokens still equal transformers'."""
    from conftest import hf_greedy
    from safetensors.torch import load_file, save_file

    from onnxport.api import export
    from onnxport.config import ExportConfig, SplitConfig
    from onnxport.runtime import Generator

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints("llama"), ck)
    sd = load_file(ck / "model.safetensors")
    for k in list(sd):
        if "down_proj" in k:
            sd[k] = sd[k] * 3000.0
    save_file({k: v.contiguous() for k, v in sd.items()}, ck / "model.safetensors", metadata={"format": "pt"})
    mf = export(ck, tmp_path / "b", ExportConfig(kv_layout="bshd"), split=SplitConfig(pack=2))
    outs = [o for c in mf.verification["cases"] for o in c["outputs"].values() if "max_abs_ref" in o]
    assert max(o["max_abs_ref"] for o in outs) > 1e4
    assert max(o["max_abs_diff"] for o in outs) > FP32.atol  # an absolute bound alone would reject it
    assert mf.verification["ok"]
    prompts = [[5, 17, 300, 42]]
    ours = Generator(tmp_path / "b").generate_ids(prompts, max_new_tokens=8, eos_token_id=None).padded
    np.testing.assert_array_equal(ours, hf_greedy(ck, prompts, 8))
