"""Every transformers 4.x / 5.x difference onnxport depends on, in one place, each with a test
per tested major (tests/test_hf_compat.py).

- Cache container: 4.5x `DynamicCache` keeps `key_cache` / `value_cache` lists; 5.x keeps
  `cache.layers[i].keys` / `.values` (and an empty `update` concatenates onto a 1-D tensor).
- The cache argument's name: `past_key_value` on decoder layers before 4.56, `past_key_values`
  from 4.56 to 5.23, `cache` from 5.24 on (the old names warn until 5.40, then go).
  The model's output field followed: `out.past_key_values` -> `out.cache`.
- `from_pretrained(torch_dtype=...)` before 4.56, `dtype=` after (the old name warns).
- Multimodal configs nest the decoder's config (`get_text_config(decoder=True)`).

Never hard-code one of these names elsewhere: ask this module.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version

from onnxport.errors import UnsupportedModelError

TRANSFORMERS_VERSION = Version(transformers.__version__)
#: cache layers that hold exactly one key and one value tensor per layer
KV_LAYER_CLASSES = {"DynamicLayer", "DynamicSlidingWindowLayer"}
#: 5.x cache layers with fixed-size conv / recurrent states (mamba, gated delta net, ...), alone
#: or beside a key/value cache; DummyLayer keeps nothing (MLP-only layers)
STATE_LAYER_CLASSES = {"LinearAttentionLayer", "LinearAttentionAndFullAttentionLayer",
                       "LinearAttentionAndSlidingWindowAttentionLayer"}
EMPTY_LAYER_CLASSES = {"DummyLayer"}
#: key/value plus a growing [batch, seq, dim] indexer key cache (DSA sparse attention)
INDEXED_LAYER_CLASSES = {"DynamicIndexedLayer"}
#: names transformers has used for the cache argument, newest first
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def dtype_kwarg(dtype: torch.dtype) -> dict:
    if TRANSFORMERS_VERSION >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def cache_kwarg(fn) -> str:
    """The name under which `fn` (a model's or a decoder layer's forward) takes the cache.

    Read from the signature (decorators keep it with functools.wraps); a forward that takes
    **kwargs only gets the name this transformers version uses."""
    params = inspect.signature(fn).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return "cache" if TRANSFORMERS_VERSION >= Version("5.24") else (
        "past_key_values" if TRANSFORMERS_VERSION >= Version("4.56") else "past_key_value")


def output_cache(out):
    """The cache a model's forward returned (`out.cache` on 5.24+, `out.past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None


def build_dynamic_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], encoder_decoder: bool = False):
    """A DynamicCache pre-filled with per-layer (key, value) tensors in [B, H, S, D]
    (`encoder_decoder`: as the self-attention half of an EncoderDecoderCache)."""
    from transformers.cache_utils import DynamicCache

    if encoder_decoder:
        from transformers.cache_utils import EncoderDecoderCache

        return EncoderDecoderCache(build_dynamic_cache(pairs), DynamicCache())

    cache = DynamicCache()
    if hasattr(cache, "layers") or hasattr(cache, "layer_class_to_replicate"):
        # 5.x: fill layers directly. `update` on an empty layer concatenates onto a 1-D empty
        # tensor, which the exporters turn into a rank-mismatched Concat.
        from transformers.cache_utils import DynamicLayer

        cache.layers = [_fill_kv(DynamicLayer(), k, v) for k, v in pairs]
        return cache
    for i, (k, v) in enumerate(pairs):  # 4.x
        cache.update(k, v, i)
    return cache


def _fill_kv(layer, k: torch.Tensor, v: torch.Tensor):
    """A 5.x cache layer holding `k` / `v` as if `update` had run (without its empty-tensor concat)."""
    layer.dtype, layer.device = k.dtype, k.device
    layer.keys, layer.values = k, v
    layer.is_initialized = True
    return layer


def cache_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) tensors of a transformers cache, whatever its version (of its
    self-attention half for an encoder-decoder cache)."""
    if hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)):
        return [(kv[0], kv[1]) for kv in cache]
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def text_config(config):
    """The decoder's config (multimodal configs nest it)."""
    if hasattr(config, "get_text_config"):
        fn = config.get_text_config
        return fn(decoder=True) if "decoder" in inspect.signature(fn).parameters else fn()
    return config


def generate_pad_position() -> int:
    """The position_ids value transformers' `generate` gives left-padded slots: 1 on 4.x
    (`masked_fill_(attention_mask == 0, 1)`), 0 once `_prepare_position_ids_for_generation`
    exists (5.x). Asked of transformers itself, not assumed from the version."""
    from transformers.generation.utils import GenerationMixin

    fn = getattr(GenerationMixin, "_prepare_position_ids_for_generation", None)
    if fn is None:
        return 1
    try:
        pos = fn(None, torch.tensor([[0, 5]]), {"attention_mask": torch.tensor([[0, 1]])})
        return int(pos[0, 0])
    except Exception:  # noqa: BLE001 - a changed private helper: keep the documented 4.x value
        return 1


def require_transformers(major: int, why: str) -> None:
    """Fail in one line when a recipe needs a newer transformers major than installed."""
    if TRANSFORMERS_VERSION.major < major:
        raise UnsupportedModelError(
            f"this recipe needs transformers >= {major} ({why}); installed {transformers.__version__}",
            f"pip install 'transformers>={major},<{major + 1}'")


def _probe_forward(model):
    """The cache the model itself returns for a 2-token input (one-line refusal on failure)."""
    device = next(model.parameters()).device  # "meta" for a bounded-memory export: shapes only
    kwargs = {}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.arange(2, device=device)[None]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1, 2]], device=device),
                        attention_mask=torch.ones(1, 2, dtype=torch.long, device=device),
                        use_cache=True, return_dict=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - the model's own failure on a plain text input
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnsupportedModelError(f"{type(model).__name__} fails in PyTorch on a 2-token text input with a cache: "
                                    f"{type(e).__name__}: {line}",
                                    "check the checkpoint's config; export its parts with onnxport export-module") from e
    return output_cache(out)


def _layer_states(layer) -> tuple:
    """A 5.x linear-attention layer's conv / recurrent states as StateSpecs (shape without batch)."""
    from onnxport.spec import StateSpec

    states = []
    for kind, tensors in (("conv", getattr(layer, "conv_states", {})), ("recurrent", getattr(layer, "recurrent_states", {}))):
        for idx in sorted(tensors):
            t = tensors[idx]
            if t is not None:
                states.append(StateSpec(kind, int(idx), tuple(int(d) for d in t.shape[1:])))
    return tuple(states)


def probe_cache(model):
    """The cache the model itself returns for a 2-token input: per-layer key/value heads and
    widths and, on 5.x, the fixed-size conv / recurrent states of mamba and linear-attention
    layers (`spec.KVSpec`). A cache that holds anything else (DSA indexer caches, custom cache
    classes, 4.x mamba caches) fails in one line naming it. A model that returns no cache at
    all gets an empty KVSpec (the graph recomputes the whole sequence each step)."""
    from onnxport.spec import KVSpec, LayerKV

    cache = _probe_forward(model)
    if cache is None:  # openai-gpt, xlm, xlnet: every step reads the whole sequence
        return KVSpec(())
    layers = getattr(cache, "layers", None)
    if layers is not None:
        odd = sorted({type(layer).__name__ for layer in layers} - KV_LAYER_CLASSES - STATE_LAYER_CLASSES
                     - EMPTY_LAYER_CLASSES - INDEXED_LAYER_CLASSES)
        if any(getattr(layer, "indexer_position_ids", None) is not None for layer in layers):
            odd.append("DynamicIndexedLayer with indexer positions")
        if odd:
            what = ("a sparse-attention indexer cache (DSA)" if any("Indexed" in n for n in odd) else "extra state")
            raise UnsupportedModelError(
                f"{type(model).__name__} keeps {what} in its cache ({', '.join(odd)}), not only key/value tensors "
                "and recurrent states", "use onnxport export-module for its parts")
        if any(type(layer).__name__ in STATE_LAYER_CLASSES | EMPTY_LAYER_CLASSES | INDEXED_LAYER_CLASSES
               for layer in layers):
            specs = []
            for layer in layers:
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                heads = (int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3])) if (
                    k is not None and v is not None and k.dim() == 4) else (0, 0, 0, 0)
                ik = getattr(layer, "indexer_keys", None)
                specs.append(LayerKV(*heads, states=_layer_states(layer),
                                     indexer_dim=int(ik.shape[-1]) if ik is not None and ik.dim() == 3 else 0))
            return KVSpec(tuple(specs))
    try:
        pairs = cache_pairs(cache)
    except TypeError:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses its own cache type {type(cache).__name__} (recurrent or custom state)",
            "only key/value caches and 5.x linear-attention states are exported; use onnxport export-module "
            "for its parts") from None
    specs = []
    for k, v in pairs:
        if k is None or v is None or k.dim() != 4 or v.dim() != 4:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s cache layers are not [batch, heads, seq, dim] key/value tensors",
                "only key/value caches are exported yet")
        specs.append(LayerKV(int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3])))
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None and any(k is not None and k.numel() for k, _ in cache_pairs(cross)):
        raise UnsupportedModelError(f"{type(model).__name__} fills a cross-attention cache from an encoder",
                                    "export the encoder-decoder model's parts with onnxport export-module")
    return KVSpec(tuple(specs), encoder_decoder=hasattr(cache, "self_attention_cache"))


def build_state_cache(kv, tensors: dict):
    """A 5.x DynamicCache for one decode step of a model with recurrent layers or DSA indexer
    caches: `tensors` maps (layer, "key" | "value" | "indexer_key" | state suffix) to tensors. States are cloned (the step
    updates them in place) and marked as having a previous state, so the model takes its
    single-token recurrent path; key/value layers grow like DynamicLayer (windows come from
    the model's masks, as in `build_dynamic_cache`)."""
    from transformers import cache_utils as cu

    cache = cu.DynamicCache()
    layers = []
    for i, spec in enumerate(kv.layers):
        if spec.states:
            n = 1 + max(st.index for st in spec.states)
            layer = (cu.LinearAttentionAndFullAttentionLayer(number_of_states=n) if spec.has_kv
                     else cu.LinearAttentionLayer(number_of_states=n))
            for st in spec.states:
                t = tensors[(i, st.suffix)].clone()
                layer.dtype, layer.device = t.dtype, t.device
                if st.kind == "conv":
                    layer.conv_states[st.index] = t
                    layer.conv_kernel_size[st.index] = st.shape[-1]
                    layer.is_conv_states_initialized[st.index] = True
                else:
                    layer.recurrent_states[st.index] = t
                    layer.is_recurrent_states_initialized[st.index] = True
                layer.has_previous_state[st.index] = True
        elif spec.indexer_dim:
            layer = cu.DynamicIndexedLayer()
            t = tensors[(i, "indexer_key")]
            layer.indexer_dtype, layer.indexer_device = t.dtype, t.device
            layer.indexer_keys, layer.is_indexer_initialized = t, True
        elif spec.has_kv:
            layer = cu.DynamicLayer()
        else:
            layer = cu.DummyLayer()
        if spec.has_kv:
            _fill_kv(layer, tensors[(i, "key")], tensors[(i, "value")])
        layers.append(layer)
    cache.layers = layers
    return cache


def state_cache_tensors(cache, kv) -> list:
    """The flat outputs of `build_state_cache`'s cache after a step, in `spec.cache_entries` order."""
    out = []
    for layer, spec in zip(cache.layers, kv.layers):
        if spec.has_kv:
            out += [layer.keys, layer.values]
        if spec.indexer_dim:
            out.append(layer.indexer_keys)
        for st in spec.states:
            out.append((layer.conv_states if st.kind == "conv" else layer.recurrent_states)[st.index])
    return out
