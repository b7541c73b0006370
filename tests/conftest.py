"""Tiny random checkpoints built from transformers' own config classes, exported once per
session and shared by the tests that read them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Every test traces what it exports: a template kept by a user's earlier export, or by one test
# for another (export/template.py), would let a test pass on a graph it did not trace.
# tests/test_template.py turns them on in its own folder.
os.environ["ONNXPORT_TEMPLATES"] = "off"

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


def make_tiny_checkpoint(model_type: str, out: Path, untrained_norms: bool = False, **overrides) -> Path:
    """hidden 64, 2 layers, vocab 1024 (the demo tokenizer's), GQA 4/2 heads.

    initializer_range 0.2 (not 0.02) spreads the logits of a random model so greedy argmax
    has no near-ties that fp32 kernel differences could flip; parity stays exact equality.
    Norm weights are randomized (trained ones are not all ones) unless `untrained_norms`: a
    freshly initialised model's all-ones norms, which exporters deduplicate and fold."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from onnxport.testing.tiny import randomize_norms

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
    if not untrained_norms:
        randomize_norms(model)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """model_type -> checkpoint folder (built lazily, once per session); "llama@untrained":
    the same with a freshly initialised model's all-ones norms."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            name, _, variant = model_type.partition("@")
            cache[model_type] = make_tiny_checkpoint(name, root / model_type.replace("@", "-"),
                                                     untrained_norms=variant == "untrained")
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


def hf_greedy(checkpoint: Path, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0, eos_id=None,
              per_row: bool = False, model=None):
    """transformers' own generate on the same checkpoint, left-padded batch (or each prompt
    alone: `per_row`), greedy."""
    from onnxport.testing.tiny import hf_greedy as reference

    return reference(checkpoint, prompts, max_new_tokens, pad_id, eos_id, model=model, per_row=per_row)


def genai_greedy(bundle, prompt: list[int], new: int) -> list[int]:
    """onnxruntime-genai's own loop on the bundle folder (its genai_config.json), greedy, one
    prompt; stops at the bundle's EOS as genai does."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def _tiny_encoder_model(kind: str):
    """(model, transformers-loadable) for the encoder families; configs follow each model's
    real structure at hidden 32-64, 1-2 layers."""
    import transformers as T

    audio_feat = dict(conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128)
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=128, image_size=32, patch_size=8))
    if kind == "whisper":
        return T.WhisperModel(T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                              decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                              num_mel_bins=16, max_source_positions=50, max_target_positions=32,
                                              vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                              decoder_start_token_id=1))
    if kind == "hubert":
        return T.HubertModel(T.HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **audio_feat))
    if kind == "wav2vec2-conformer":
        return T.Wav2Vec2ConformerModel(T.Wav2Vec2ConformerConfig(conv_depthwise_kernel_size=7,
                                                                  position_embeddings_type="relative", **audio_feat))
    if kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=16, out_hidden_size=48, fullatt_block_indexes=[1])
        text = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=300,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})
        return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vision, text_config=text))
    if kind == "qwen2_5_omni_audio_encoder":
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

        return Qwen2_5OmniAudioEncoder(T.Qwen2_5OmniAudioEncoderConfig(
            num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, d_model=64,
            output_dim=48, n_window=10, max_source_positions=200))
    if kind == "xcodec2":
        semantic = T.Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, output_hidden_size=32)
        return T.Xcodec2Model(T.Xcodec2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            head_dim=16, encoder_hidden_size=8, downsampling_ratios=[2, 2], semantic_model_config=semantic.to_dict(),
            quantization_dim=96, quantization_levels=[4, 4, 4]))
    if kind == "minicpmv4_6":
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=4, insert_layer_id=0, window_kernel_size=[2, 2])
        text = dict(model_type="qwen3", hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, vocab_size=300, head_dim=12)
        return T.MiniCPMV4_6ForConditionalGeneration(T.MiniCPMV4_6Config(vision_config=vision, text_config=text,
                                                                          insert_layer_id=0))
    raise KeyError(kind)


ENCODER_KINDS = ("siglip", "whisper", "hubert", "wav2vec2-conformer", "qwen2_5_vl", "qwen2_5_omni_audio_encoder",
                 "xcodec2", "minicpmv4_6")


def make_tiny_encoder_checkpoint(kind: str, out: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = _tiny_encoder_model(kind).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def encoder_checkpoints(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_encoder_checkpoint(kind, tmp_path_factory.mktemp(f"ckpt-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def exported_encoder(encoder_checkpoints, tmp_path_factory):
    """kind -> (bundle folder, manifest); each exported once per session."""
    from onnxport.api import export_encoder
    from onnxport.config import ExportConfig

    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            out = tmp_path_factory.mktemp(f"bundle-{kind}") / "bundle"
            made[kind] = (out, export_encoder(encoder_checkpoints(kind), out, ExportConfig(exporter="auto")).to_dict())
        return made[kind]

    return get
