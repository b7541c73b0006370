"""The layout matrix: every layout option onnxport offers for decoders (monolithic, TorchScript
at opset 13, bshd caches, split with one or N layers per file, static shapes, rope outside the
graph, argmax / top-k heads) on the decoder families the NPU notes name (llama, qwen2, gemma2:
sliding-window layers, soft-capping, a (1 + w) norm), each exported with its own verification
and generating transformers' greedy tokens. These combinations broke silently before (issue
26: a gemma2 block of sliding layers only, untrained all-ones norms under TorchScript); any
failure here fails the build.

Bundles shared with other modules come from the session's `exported` fixture (same key, one
export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import hf_greedy

from onnxport.runtime import Generator

FAMILIES = ("llama", "qwen2", "gemma2")
PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 600, 23, 8]]
NEW = 12
STATIC = {"static": True, "max_len": 48, "prefill_len": 16}
TS13 = {"exporter": "torchscript", "opset": 13}
#: name -> (export options, split options or None, checkpoint variant)
LAYOUTS = {
    "monolithic": ({}, None, ""),
    "monolithic-bshd-torchscript-opset13": ({"kv_layout": "bshd", **TS13}, None, ""),
    "split": ({"kv_layout": "bshd"}, {"pack": 1}, ""),
    "split-pack2-rope-outside-topk": ({"kv_layout": "bhsd"}, {"pack": 2, "rope": "outside", "head": "topk:4"}, ""),
    "static-pack2-opset13-argmax": ({"kv_layout": "bshd", **TS13}, {**STATIC, "pack": 2, "head": "argmax"}, ""),
    "static-pack1-opset13-argmax-untrained-norms": (TS13, {**STATIC, "pack": 1, "head": "argmax"}, "@untrained"),
    "static-dynamo-bshd-rope-outside-topk": ({"kv_layout": "bshd"},
                                             {**STATIC, "pack": 1, "rope": "outside", "head": "topk:8"}, ""),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_exports_verifies_and_generates_transformers_tokens(family, layout, exported, tiny_checkpoints):
    opts, split, variant = LAYOUTS[layout]
    bundle = exported(family + variant, split=split, **opts)
    mf = json.loads((bundle / "manifest.json").read_text())
    assert mf["verification"]["ok"]
    if split is not None:
        shapes = {c["shape"].split(" ")[0] for c in mf["verification"]["cases"]}
        assert {"embedding.onnx", "lm_head.onnx", "end-to-end"} <= shapes
        # each block declares exactly the masks its layers read (a window-only pack: no full mask)
        for g in mf["graphs"]:
            if g["role"] in ("block", "block_cache"):
                names = {i["name"] for i in g["inputs"]}
                windows = g["sliding_windows"] or [None]
                assert ("attention_mask" in names) == any(w is None for w in windows), (g["file"], names)
                assert ("sliding_attention_mask" in names) == any(w is not None for w in windows), g["file"]
    ours = Generator(bundle).generate_ids(PROMPTS, max_new_tokens=NEW, eos_token_id=None).padded
    np.testing.assert_array_equal(ours, hf_greedy(tiny_checkpoints(family + variant), PROMPTS, NEW))
