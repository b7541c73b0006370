"""Tiny random checkpoints built from transformers' own config classes, exported once per
session and shared by the tests that read them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "onnxport" / "demo_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: every decoder family the core issue promises, with the config quirks each needs
TINY_ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 32},
    "phi3": {},
    # sliding_window smaller than prompt + new tokens, so the sliding layers really slide
    "gemma2": {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16},
}


def make_tiny_checkpoint(model_type: str, out: Path, **overrides) -> Path:
    """hidden 64, 2 layers, vocab 1024 (the demo tokenizer's), GQA 4/2 heads.

    initializer_range 0.2 (not 0.02) spreads the logits of a random model so greedy argmax
    has no near-ties that fp32 kernel differences could flip; parity stays exact equality."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        # no EOS: parity runs the full length; EOS stopping is tested with an explicit id
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    kw.update(TINY_ARCHS.get(model_type, {}))
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # trained norms are not all ones; don't let a test rely on that
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if p.abs().mean() > 0.5 else 0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """model_type -> checkpoint folder (built lazily, once per session)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = make_tiny_checkpoint(model_type, root / model_type)
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def exported(tiny_checkpoints, tmp_path_factory):
    """(model_type, options) -> bundle folder, exported once per session."""
    from onnxport.api import export
    from onnxport.config import ExportConfig

    root = tmp_path_factory.mktemp("bundles")
    cache: dict[tuple, Path] = {}

    def get(model_type: str, split: dict | None = None, **opts) -> Path:
        from onnxport.config import SplitConfig

        key = (model_type, tuple(sorted(opts.items())), tuple(sorted((split or {}).items())))
        if key not in cache:
            parts = [model_type, *(f"{k}_{v}" for k, v in sorted({**opts, **(split or {})}.items()))]
            out = root / "-".join(p.replace(":", "") for p in parts)
            export(tiny_checkpoints(model_type), out, ExportConfig(**opts),
                   split=SplitConfig(**split) if split is not None else None)
            cache[key] = out
        return cache[key]

    return get


def hf_greedy(checkpoint: Path, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0, eos_id=None):
    """transformers' own generate on the same checkpoint, left-padded batch, greedy."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = p
        mask[r, longest - len(p):] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
    return out[:, longest:].numpy()
