"""Every decoder recipe: export verified on 3 shapes, and greedy tokens from ONNX Runtime equal
transformers' generate token for token (batch of 2 prompts of different lengths, 32 tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_ARCHS, hf_greedy

from onnxport.runtime import Generator

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 600, 23, 8]]


@pytest.mark.parametrize("model_type", list(TINY_ARCHS))
def test_export_verified_and_greedy_parity(model_type, exported, tiny_checkpoints):
    bundle = exported(model_type)
    manifest = json.loads((bundle / "manifest.json").read_text())
    ver = manifest["verification"]
    assert ver["ok"] and len(ver["cases"]) == 4
    for case in ver["cases"]:
        for name, r in case["outputs"].items():
            assert r["max_abs_diff"] <= 1e-3 and r["cosine"] >= 0.9999, (case["shape"], name, r)

    gen = Generator(bundle)
    ours = gen.generate_ids(PROMPTS, max_new_tokens=32, eos_token_id=None)
    ref = hf_greedy(tiny_checkpoints(model_type), PROMPTS, 32)
    assert ours.padded.shape == (2, 32)
    np.testing.assert_array_equal(ours.padded, ref)
    # the two rows must not be trivially identical (a broken mask could make them so)
    assert not np.array_equal(ours.padded[0], ours.padded[1])
