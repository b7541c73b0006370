"""Tiny random configs of any transformers model_type, derived from the type's own defaults:
hidden 64, 2 layers, 4/2 heads, vocab 1024, nested sub-configs too, MoE and MLA widths kept
consistent. `bench/breadth.py` runs every causal-LM type through them; the tests use them to
prove the generic decoder's cache variants (MLA, MoE, ALiBi, hybrid sliding layers)."""

from __future__ import annotations

import re

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, POSITIONS = 64, 2, 4, 2, 128, 1024, 512
#: smaller than prompt + new tokens, so sliding layers really slide
SLIDING_WINDOW = 16

# Config field names, by what they mean; each transformers family picks its own spelling.
HIDDEN_KEYS = {"hidden_size", "n_embd", "n_embed", "d_model", "dim", "model_dim", "embed_dim", "hidden_dim",
               "word_embed_proj_dim", "d_embed", "embedding_size", "projection_dim", "text_hidden_size",
               "out_hidden_size", "projector_hidden_size"}
LAYER_KEYS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
              "num_decoder_layers", "num_encoder_layers", "depth"}
HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
             "encoder_attention_heads"}
KV_HEAD_KEYS = {"num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "n_head_kv",
                "num_kv_heads_per_layer"}
HEAD_DIM_KEYS = {"head_dim", "kv_channels", "attention_head_dim", "d_head", "d_kv", "attention_head_size"}
FFN_KEYS = {"intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size",
            "d_ff", "d_inner", "mlp_dim", "ffn_size"}
MOE_FFN_KEYS = {"moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "expert_ffn_dim"}
EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
               "n_experts"}
TOPK_KEYS = {"num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "num_selected_experts",
             "experts_per_token", "top_k_experts", "moe_top_k"}
POSITION_KEYS = {"max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "max_sequence_length",
                 "seq_length", "max_target_positions", "max_source_positions"}
DROP_KEYS = {"quantization_config", "auto_map", "_name_or_path", "transformers_version", "architectures"}


def _per_layer_pick(d: dict, n_layers: int) -> list[int]:
    """Which LAYERS (2) of the `n_layers` layers to keep: the first ones, the last of them
    replaced by the first of another kind when a per-layer list (layer_types first) has more than
    one kind and the first ones are all alike, so hybrids keep both."""
    lists = [d["layer_types"]] if isinstance(d.get("layer_types"), list) else []
    lists += [v for v in d.values() if isinstance(v, list) and len(v) == n_layers]
    for lst in lists:
        if len(lst) == n_layers:
            other = next((i for i, x in enumerate(lst) if x != lst[0]), None)
            if other is not None:
                return list(range(LAYERS - 1)) + [other] if other >= LAYERS - 1 else list(range(LAYERS))
    return list(range(LAYERS))


def _small_int(k: str, v: int) -> int:
    """The tiny value of one integer config field (v itself when no rule names it)."""
    rules = [
        (HIDDEN_KEYS, HIDDEN), (HEAD_KEYS, HEADS), (HEAD_DIM_KEYS, HIDDEN // HEADS), (FFN_KEYS, FFN),
        (MOE_FFN_KEYS, FFN // 2), (LAYER_KEYS, min(v, LAYERS)), (KV_HEAD_KEYS, min(v, KV_HEADS)),
        (EXPERT_KEYS, min(v, 4)), (TOPK_KEYS, min(v, 2)), ({"n_group", "topk_group", "num_expert_group"}, 1),
        ({"first_k_dense_replace", "first_k_dense", "num_dense_layers"}, min(v, 1)),
        (POSITION_KEYS, min(v, POSITIONS) if v > 0 else v), ({"sliding_window"}, SLIDING_WINDOW),
        # 2 layers of different kinds cannot share caches (gemma3n)
        ({"num_kv_shared_layers"}, 0),
    ]
    for keys, value in rules:
        if k in keys:
            return value
    return VOCAB if k.endswith("vocab_size") else v


def shrink(d: dict) -> dict:
    """A tiny copy of a config dict (to_dict() form); nested sub-configs shrink the same way."""
    d = {k: v for k, v in d.items() if k not in DROP_KEYS}
    n_layers = next((d[k] for k in LAYER_KEYS if isinstance(d.get(k), int)), None)
    pick = _per_layer_pick(d, n_layers) if n_layers and n_layers > LAYERS else None
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and pick and v and all(str(i).isdigit() and isinstance(x, dict) for i, x in v.items()):
            # per_layer_config {"05": {...}}: overrides of the layers we keep, renumbered
            out[k] = {f"{pick.index(int(i)):02d}": shrink(x) for i, x in v.items() if int(i) in pick}
        elif isinstance(v, dict) and ("model_type" in v or k.endswith("_config")):
            out[k] = shrink(v)
        elif isinstance(v, bool) or v is None:
            out[k] = v
        elif isinstance(v, int):
            out[k] = _small_int(k, v)
        elif isinstance(v, list) and pick and len(v) == n_layers:
            out[k] = [_small_int(k, v[i]) if isinstance(v[i], int) and not isinstance(v[i], bool) else v[i]
                      for i in pick]
        elif isinstance(v, list) and k.endswith(("layers", "layer_indices", "layers_idx", "block_indexes",
                                                  "layer_ids", "idxs")) and all(isinstance(i, int) for i in v):
            # indices of layers of some kind: keep the kind present in the 2 layers we keep
            out[k] = sorted({min(i, LAYERS - 1) for i in v})
        else:
            out[k] = v
    if "initializer_range" in out or "model_type" in out:
        out["initializer_range"] = 0.2
    for k in ("eos_token_id", "bos_token_id"):
        if k in out:
            out[k] = None
    if "pad_token_id" in out:
        out["pad_token_id"] = 0
    for k in HEAD_DIM_KEYS & out.keys():  # some defaults leave head_dim unset (ministral, nemotron)
        if out[k] is None and any(out.get(h) for h in HEAD_KEYS):
            out[k] = HIDDEN // HEADS
    if any(k in out for k in EXPERT_KEYS) and not any(k in out for k in ("enable_moe_block",)):
        # some defaults leave the expert counts unset (deepseek_v2 top-k, dots1 all of them)
        for k in EXPERT_KEYS & out.keys():
            out[k] = 4 if out[k] is None else out[k]
        for k in TOPK_KEYS & out.keys():
            out[k] = 2 if out[k] is None else out[k]
        if out.get("n_shared_experts", 0) is None:
            out["n_shared_experts"] = 1
    if "kv_lora_rank" in out:  # MLA (deepseek_v2/v3 and kin): every width must agree
        out.update(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
        if "num_key_value_heads" in out:  # MLA expands the latent to every head
            out["num_key_value_heads"] = HEADS
        if out.get("q_lora_rank"):
            out["q_lora_rank"] = 32
        if "qk_head_dim" in out:
            out["qk_head_dim"] = 24
        if "head_dim" in out:
            out["head_dim"] = 8
    # mamba heads must tile expand * hidden (bamba, granitemoehybrid, mamba2, ...)
    if isinstance(out.get("mamba_n_heads"), int):
        expand = out.get("mamba_expand", 2)
        out["mamba_n_heads"] = HEADS
        out["mamba_d_head"] = expand * HIDDEN // HEADS
        if out.get("mamba_d_ssm"):  # falcon_h1
            out["mamba_d_ssm"] = HEADS * out["mamba_d_head"]
    if isinstance(out.get("mamba_headdim"), int) and out.get("n_mamba_heads"):  # zamba2
        out["mamba_headdim"] = out.get("mamba_expand", 2) * HIDDEN // out["n_mamba_heads"]
    for k in ("n_groups", "mamba_n_groups", "mamba_ngroups"):  # groups must divide the (4) heads
        if isinstance(out.get(k), int):
            out[k] = 1
    _keep_an_attention_layer(out)
    if str(out.get("model_type")).startswith("dots3") and "qk_nope_head_dim" in out:  # MLA-wide sliding layers
        out["head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    if out.get("model_type") == "mamba2" or ("expand" in out and "num_heads" in out and "head_dim" in out):
        out["head_dim"] = out.get("expand", 2) * HIDDEN // out["num_heads"]
    return out


def _keep_an_attention_layer(out: dict) -> None:
    """Hybrid mamba/attention defaults whose 2 kept layers would all be recurrent: make layer 1
    attention (some families cannot even generate with a cache of recurrent layers only)."""
    if "attn_layer_indices" in out and not out["attn_layer_indices"] and "mamba_d_state" in out:
        out["attn_layer_indices"] = [1]  # bamba
    if "attn_layer_period" in out:  # jamba
        out.update(attn_layer_period=2, attn_layer_offset=1)
    types = out.get("layer_types") or out.get("layers_block_type")
    if isinstance(types, list) and types and set(types) == {"linear_attention"}:  # granitemoehybrid
        out["layer_types"] = ["linear_attention", "attention"]
        out.pop("layers_block_type", None)
    if isinstance(out.get("block_types"), list) and "attention" not in out["block_types"][:LAYERS]:
        out["block_types"] = ["recurrent", "attention"]  # recurrent_gemma


def _set_none(d: dict, key: str, value) -> bool:
    """Set `key` to `value` wherever it is None in `d` and its sub-configs; whether any was."""
    hit = d.get(key, 0) is None
    if hit:
        d[key] = value
    return any([hit] + [_set_none(v, key, value) for v in d.values() if isinstance(v, dict)])


def tiny_config(model_type: str):
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type).to_dict()
    small = shrink(base)
    small.pop("model_type", None)
    small["dtype"] = "float32"
    small["is_decoder"] = True  # bert-likes build their causal LM head only as decoders
    for _ in range(4):
        try:
            return AutoConfig.for_model(model_type, **small)
        except Exception as e:  # noqa: BLE001 - strict configs want an int where we said None
            m = re.search(r"Field '(\w+)' expected int, got NoneType", str(e))
            if not m or not _set_none(small, m.group(1), 1):  # a token id the prompts do not use
                raise
    return AutoConfig.for_model(model_type, **small)


def randomize_norms(model) -> None:
    """Trained norm weights are not all ones (nor biases zero), and no trained matrix is all
    zeros (afmoe initialises its router to zeros: every expert ties, and ONNX TopK breaks ties
    differently from torch.topk); a test must not rely on either."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if p.abs().mean() > 0.5 else 0.0, 0.1)
            elif p.dim() >= 2 and p.is_floating_point() and not p.any():
                p.normal_(0.0, 0.2)


def tiny_causal_lm(model_type: str, seed: int = 0):
    """A random tiny causal LM of `model_type` (its own defaults, shrunk), norms randomized."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    randomize_norms(model)
    return model


def hf_greedy(checkpoint, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0, eos_id=None, model=None,
              per_row: bool = False):
    """transformers' own `generate` on a left-padded batch, greedy: the reference tokens.

    `per_row`: each prompt alone, outputs padded with `pad_id` after an early stop (models with
    recurrent state, whose padded batches push pad tokens through the recurrence)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    if per_row:
        rows = [hf_greedy(checkpoint, [p], max_new_tokens, pad_id, eos_id, model)[0] for p in prompts]
        out = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=np.int64)
        for r, row in enumerate(rows):
            out[r, :len(row)] = row
        return out
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = p
        mask[r, longest - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
    return out[:, longest:].numpy()
