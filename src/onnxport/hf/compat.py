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


def build_dynamic_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """A DynamicCache pre-filled with per-layer (key, value) tensors in [B, H, S, D]."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    if hasattr(cache, "layers") or hasattr(cache, "layer_class_to_replicate"):
        # 5.x: fill layers directly. `update` on an empty layer concatenates onto a 1-D empty
        # tensor, which the exporters turn into a rank-mismatched Concat.
        from transformers.cache_utils import DynamicLayer

        layers = []
        for k, v in pairs:
            layer = DynamicLayer()
            layer.dtype, layer.device = k.dtype, k.device
            layer.keys, layer.values = k, v
            layer.is_initialized = True
            layers.append(layer)
        cache.layers = layers
        return cache
    for i, (k, v) in enumerate(pairs):  # 4.x
        cache.update(k, v, i)
    return cache


def cache_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) tensors of a transformers cache, whatever its version."""
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


def require_transformers(major: int, why: str) -> None:
    """Fail in one line when a recipe needs a newer transformers major than installed."""
    if TRANSFORMERS_VERSION.major < major:
        raise UnsupportedModelError(
            f"this recipe needs transformers >= {major} ({why}); installed {transformers.__version__}",
            f"pip install 'transformers>={major},<{major + 1}'")


def probe_cache(model):
    """The KV cache the model itself returns for a 2-token input: per-layer key/value heads and
    widths (`spec.KVSpec`). A cache that holds something other than key/value tensors per
    layer (mamba-style conv/ssm state, linear attention) fails in one line naming it."""
    from onnxport.spec import KVSpec, LayerKV

    kwargs = {}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.arange(2)[None]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                        use_cache=True, return_dict=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - the model's own failure on a plain text input
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "LinearAttention" in line or "mamba" in line.lower():
            raise UnsupportedModelError(f"{type(model).__name__} keeps recurrent state in its cache ({line})",
                                        "recurrent (mamba / linear-attention) caches are not exported yet") from e
        raise UnsupportedModelError(f"{type(model).__name__} fails in PyTorch on a 2-token text input with a cache: "
                                    f"{type(e).__name__}: {line}",
                                    "check the checkpoint's config; export its parts with onnxport export-module") from e
    cache = output_cache(out)
    if cache is None:
        raise UnsupportedModelError(f"{type(model).__name__} returns no KV cache with use_cache=True",
                                    "export it without a cache with onnxport export-module")
    layers = getattr(cache, "layers", None)
    if layers is not None:
        odd = sorted({type(layer).__name__ for layer in layers} - KV_LAYER_CLASSES)
        if odd:
            what = ("recurrent state" if any("Linear" in n or "Mamba" in n for n in odd) else
                    "a sparse-attention indexer cache (DSA)" if any("Indexed" in n for n in odd) else "extra state")
            raise UnsupportedModelError(
                f"{type(model).__name__} keeps {what} in its cache ({', '.join(odd)}), not only key/value tensors",
                "only key/value caches are exported yet; use onnxport export-module for its parts")
    try:
        pairs = cache_pairs(cache)
    except TypeError:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses its own cache type {type(cache).__name__} (recurrent or custom state)",
            "only key/value caches are exported yet; use onnxport export-module for its parts") from None
    specs = []
    for k, v in pairs:
        if k is None or v is None or k.dim() != 4 or v.dim() != 4:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s cache layers are not [batch, heads, seq, dim] key/value tensors",
                "only key/value caches are exported yet")
        specs.append(LayerKV(int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3])))
    return KVSpec(tuple(specs))
