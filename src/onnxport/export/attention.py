"""Attention as ONNX Runtime's fused `com.microsoft::GroupQueryAttention` (`--attention gqa`).

The model's own attention modules run as usual (projections, qk-norms, rotary); only the part
after the rotary, which transformers hands to its attention interface, becomes one GQA node:
grouped-query attention with the cache append inside (past + new keys -> present), the scale,
an optional logit softcap, and an additive `attention_bias` (causal, padding, sliding window)
built from the 2-D attention_mask input alone. Because nothing depends on the past input's
length, the same graph also runs with a fixed-size cache buffer bound as both past and
present (GQA's shared-buffer mode: the runtime's copy-free loop). It is how onnxruntime-genai's builder writes attention, minus its
hand-written graph: everything else is still traced from the model's code.

How it is traced: transformers calls the attention function with the keys and values *after*
its cache update. `gqa_cache` remembers each layer's past before the update and returns the new
keys/values alone; the registered attention function (`onnxport_gqa`) calls a torch custom op
with (query, new key, new value, past key, past value, mask) whose ONNX translation is the GQA
node, and stores GQA's presents, which the wrapper returns. The custom op's eager body is the
same math in torch (used when the model runs outside an export).

Limits (ONNX Runtime's CPU kernel): key and value heads of one width (no MLA), no attention
sinks, and a prompt that continues a cache (sequence_length > 1 with a past) runs one row at a
time (batch 1); generation (prefill from an empty cache, then one token per step) is not
affected. Models whose attention needs more than this fail verification and are refused.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

#: the name transformers' attention and mask interfaces know this implementation by
GQA_IMPLEMENTATION = "onnxport_gqa"

_current_cache: contextvars.ContextVar = contextvars.ContextVar("onnxport_gqa_cache", default=None)


@torch.library.custom_op("onnxport::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, attention_bias: torch.Tensor, num_heads: int,
                          kv_num_heads: int, scale: float, softcap: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's semantics: query [B, S, H*D], key/value [B, S, Hkv*D], past
    [B, Hkv, P, D], attention_bias [B or 1, 1, S, P+S] (additive, causal included) ->
    (output [B, S, H*D], present key/value [B, Hkv, P+S, D])."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    q = query.view(b, s, num_heads, d).transpose(1, 2)
    k = torch.cat([past_key, key.view(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    v = torch.cat([past_value, value.view(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    rep = num_heads // kv_num_heads
    scores = torch.matmul(q, k.repeat_interleave(rep, dim=1).transpose(2, 3)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores + attention_bias, dim=-1)
    out = torch.matmul(probs, v.repeat_interleave(rep, dim=1))
    return out.transpose(1, 2).reshape(b, s, num_heads * d), k, v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_bias, num_heads, kv_num_heads, scale, softcap):
    b, s, _ = query.shape
    _, hk, p, d = past_key.shape
    return (query.new_empty(b, s, num_heads * d), past_key.new_empty(b, hk, p + s, d),
            past_value.new_empty(b, hk, p + s, d))


def gqa_onnx(query, key, value, past_key, past_value, attention_bias, num_heads: int, kv_num_heads: int,
             scale: float, softcap: float):
    """The custom op's ONNX translation: one GroupQueryAttention node. seqlens_k and
    total_sequence_length follow from the mask's width: every row counts all past slots
    (left padding is masked by attention_bias, as transformers masks it)."""
    from onnxscript import INT32
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_gqa_schema()
    msft = Opset("com.microsoft", 1)
    total = op.Shape(attention_bias, start=3, end=4)  # int64 [1]
    batch = op.Shape(query, start=0, end=1)
    seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=INT32.dtype)
    total_scalar = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=INT32.dtype)
    out, present_key, present_value = msft.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_scalar, None, None, None, attention_bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap)
    return out, present_key, present_value


def _register_gqa_schema() -> None:
    """onnx's schema registry knows only standard ops; onnxscript builds a node from a schema.
    Register GroupQueryAttention's (the inputs, outputs and attributes onnxport uses, as ONNX
    Runtime declares them) once per process."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("GroupQueryAttention", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    opt = OpSchema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "P"}
    inputs = [OpSchema.FormalParameter(n, types.get(n, "T"), "", param_option=opt if i not in (0, 5, 6) else
                                       OpSchema.FormalParameterOption.Single) for i, n in enumerate(names)]
    outputs = [OpSchema.FormalParameter(n, "T", "") for n in ("output", "present_key", "present_value")]
    attrs = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
             OpSchema.Attribute("softcap", OpSchema.AttrType.FLOAT, ""),
             OpSchema.Attribute("local_window_size", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, "")]
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=attrs))


@torch.library.custom_op("onnxport::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """com.microsoft.RotaryEmbedding's semantics (non-interleaved, full head width): x [B, S,
    H*D], position_ids [B, S], caches [max_positions, D/2] -> x rotated per position."""
    b, s, _ = x.shape
    xs = x.view(b, s, num_heads, -1)
    half = xs.shape[-1] // 2
    cos = cos_cache[position_ids].unsqueeze(2)
    sin = sin_cache[position_ids].unsqueeze(2)
    x1, x2 = xs[..., :half], xs[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).reshape(b, s, -1)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads):
    return x.new_empty(x.shape)


def rotary_onnx(x, position_ids, cos_cache, sin_cache, num_heads: int):
    from onnxscript.values import Opset

    _register_rotary_schema()
    return Opset("com.microsoft", 1).RotaryEmbedding(x, position_ids, cos_cache, sin_cache, num_heads=num_heads,
                                                     interleaved=0)


def _register_rotary_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("RotaryEmbedding", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    onnx.defs.register_schema(OpSchema(
        "RotaryEmbedding", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("input", "T", ""), OpSchema.FormalParameter("position_ids", "M", ""),
                OpSchema.FormalParameter("cos_cache", "T", ""), OpSchema.FormalParameter("sin_cache", "T", "")],
        outputs=[OpSchema.FormalParameter("output", "T", "")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("rotary_embedding_dim", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]))


TRANSLATIONS = {torch.ops.onnxport.group_query_attention.default: gqa_onnx,
                torch.ops.onnxport.rotary_embedding.default: rotary_onnx}


def gqa_attention_forward(module, query, key, value, attention_mask, scaling: float | None = None,
                          dropout: float = 0.0, softcap: float | None = None, **kwargs):
    """transformers' attention-interface signature: query [B, H, S, D], key/value the *new*
    [B, Hkv, S, D] (GQACache returns them without the past). Returns ([B, S, H, D], None)."""
    cache = _current_cache.get()
    if cache is None:
        raise RuntimeError("onnxport_gqa attention runs only inside onnxport's GQA export wrapper")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("attention sinks have no GroupQueryAttention input on CPU")
    b, h, s, d = query.shape
    hk = key.shape[1]
    if value.shape[-1] != d or key.shape[-1] != d:
        raise NotImplementedError("GroupQueryAttention needs keys and values of the query's head width")
    past_key, past_value = cache.onnxport_past[module.layer_idx]
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    bias = attention_bias(cache.onnxport_mask, s, window, query.dtype)
    scale = float(scaling if scaling is not None else d ** -0.5)
    q = query.transpose(1, 2).reshape(b, s, h * d)
    k = key.transpose(1, 2).reshape(b, s, hk * d)
    rotary = getattr(cache, "onnxport_rotary", None)
    if rotary is not None:  # the model's rotary was deferred to here (see deferred_rotary)
        positions, cos_cache, sin_cache = rotary
        q = torch.ops.onnxport.rotary_embedding(q, positions, cos_cache, sin_cache, h)
        k = torch.ops.onnxport.rotary_embedding(k, positions, cos_cache, sin_cache, hk)
    out, present_key, present_value = torch.ops.onnxport.group_query_attention(
        q, k, value.transpose(1, 2).reshape(b, s, hk * d), past_key, past_value, bias, h, hk, scale,
        float(softcap or 0.0))
    cache.onnxport_present[module.layer_idx] = (present_key, present_value)
    return out.view(b, s, h, d), None


def attention_bias(mask_2d: torch.Tensor, s: int, window: int | None, dtype) -> torch.Tensor:
    """[B, 1, S, T] additive bias from the [B, T] padding mask, T counting every slot (past
    and new): the new queries sit in the last S slots; a key is visible when it is valid, not
    after the query, and (sliding layers) fewer than `window` slots before it. Built from the
    mask alone, not from the cache's length, so one graph serves a growing cache and a shared
    fixed-size buffer (GQA writes in place; total_sequence_length = T)."""
    t = mask_2d.shape[1]
    k = torch.arange(t, device=mask_2d.device)
    q = torch.arange(t - s, t, device=mask_2d.device)
    allowed = k[None, :] <= q[:, None]
    if window is not None:
        allowed = allowed & ((q[:, None] - k[None, :]) < window)
    allowed = allowed[None, None] & mask_2d[:, None, None, :].bool()
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


_registered = False


def register() -> None:
    """Make `onnxport_gqa` known to transformers' attention and mask interfaces (the mask is
    transformers' own additive eager mask)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA_IMPLEMENTATION, gqa_attention_forward)
    AttentionMaskInterface.register(GQA_IMPLEMENTATION, eager_mask)
    _registered = True


def gqa_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], mask_2d: torch.Tensor):
    """A cache pre-filled with the pasts whose `update` keeps the past aside and returns the
    new keys/values alone (GQA appends them itself); it carries the 2-D padding mask the
    attention bias is built from."""
    from onnxport.hf.compat import build_dynamic_cache

    cache = build_dynamic_cache(pairs)
    cache.onnxport_past = {i: kv for i, kv in enumerate(pairs)}
    cache.onnxport_present = {}
    cache.onnxport_mask = mask_2d
    original = cache.update

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        original(key_states, value_states, layer_idx, *args, **kwargs)  # keeps the lengths right
        return key_states, value_states

    cache.update = update
    return cache


@contextlib.contextmanager
def gqa_attention(model, cache):
    """Inside: the model's attention runs through `onnxport_gqa` with `cache`."""
    register()
    configs = [c for c in _configs(model.config)]
    saved = [(c, c._attn_implementation) for c in configs]
    token = _current_cache.set(cache)
    try:
        for c in configs:
            c._attn_implementation = GQA_IMPLEMENTATION
        yield
    finally:
        _current_cache.reset(token)
        for c, impl in saved:
            c._attn_implementation = impl


def standard_rotary(fn, head_dim: int) -> bool:
    """Whether `fn(q, k, cos, sin)` is the rotate-half rotary (llama's apply_rotary_pos_emb)
    over the full head width, checked numerically: only then may RotaryEmbedding replace it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, head_dim, generator=g)
    k = torch.randn(2, 1, 5, head_dim, generator=g)
    freqs = torch.randn(2, 5, head_dim // 2, generator=g)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)

    def ref(x):
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    try:
        got_q, got_k = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: not the standard rotary
        return False
    return bool(torch.allclose(got_q, ref(q), atol=1e-5) and torch.allclose(got_k, ref(k), atol=1e-5))


def prepare_rotary(model, head_dim: int, max_positions: int):
    """(modeling module, its apply_rotary_pos_emb, cos cache, sin cache) when the model's
    attention applies the standard rotary (rotate-half, full head width, a position-only
    rope type) through its modeling module's `apply_rotary_pos_emb`; else None. Called
    outside the trace: it checks the function numerically and computes the caches over
    `max_positions` from the model's own rotary module (scaling variants included)."""
    import sys

    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary_module = getattr(base, "rotary_emb", None)
    attn = next((m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")), None)
    module = sys.modules.get(type(attn).__module__) if attn is not None else None
    fn = getattr(module, "apply_rotary_pos_emb", None) if module is not None else None
    rope = getattr(rotary_module, "rope_type", "default") if rotary_module is not None else None
    if fn is None or rotary_module is None or rope not in ("default", "linear", "llama3", "yarn"):
        return None
    if not standard_rotary(fn, head_dim):
        return None
    try:
        with torch.no_grad():
            positions = torch.arange(max_positions, dtype=torch.int64)[None]
            cos, sin = rotary_module(torch.zeros(1, dtype=torch.float32), positions)
    except Exception:  # noqa: BLE001 - a rotary module with another signature: leave it in the model
        return None
    if (cos.device.type == "meta" or cos.shape[-1] != head_dim  # meta: a --low-memory trace, no values
            or not torch.equal(cos[..., : head_dim // 2], cos[..., head_dim // 2:])):
        return None
    half = head_dim // 2
    return module, fn, cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


@contextlib.contextmanager
def deferred_rotary(plan, cache, position_ids):
    """Inside (with a `prepare_rotary` plan): the modeling module's apply_rotary_pos_emb passes
    q and k through unrotated, and the attention function rotates them with one
    com.microsoft.RotaryEmbedding each instead of ~14 slice / neg / concat / mul / add nodes."""
    if plan is None or position_ids is None or position_ids.dim() != 2:
        yield False
        return
    module, fn, cos_cache, sin_cache = plan
    cache.onnxport_rotary = (position_ids, cos_cache, sin_cache)
    module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield True
    finally:
        module.apply_rotary_pos_emb = fn
        cache.onnxport_rotary = None


def _configs(config):
    yield config
    for name in ("text_config", "decoder", "language_config"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            yield sub
