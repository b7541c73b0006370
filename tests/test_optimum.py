"""optimum loads onnxport bundles as they are: `ORTModelForCausalLM.from_pretrained(bundle)` on a
default and a GroupQueryAttention bundle generates transformers' greedy tokens (and onnxport's).
optimum-onnx needs transformers < 4.58, so this runs in the transformers 4.57 job
(.ci/transformers4 installs it); elsewhere it is skipped with that reason."""

from __future__ import annotations

import pytest
from conftest import hf_greedy

pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed (the transformers 4.57 job installs it)")

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 600, 23, 8]]
NEW = 12


@pytest.mark.parametrize("opts", [{}, {"attention": "gqa", "optimize": True}], ids=["default", "gqa"])
def test_optimum_generates_transformers_tokens_from_a_bundle(opts, exported, tiny_checkpoints):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from onnxport.runtime import Generator

    bundle = exported("llama", **opts)
    model = ORTModelForCausalLM.from_pretrained(bundle, use_cache=True)
    ref = hf_greedy(tiny_checkpoints("llama"), PROMPTS, NEW, per_row=True)
    ours = Generator(bundle)
    for prompt, want in zip(PROMPTS, ref):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        got = out[0, len(prompt):].tolist()
        assert got == list(want), (got, want)
        assert got == ours.generate_ids([prompt], max_new_tokens=NEW, eos_token_id=None).tokens[0]
