"""transformers 4.x / 5.x differences, in one place.

- 4.5x `DynamicCache` keeps `key_cache` / `value_cache` lists; 5.x keeps `cache.layers[i].keys`.
- 4.5x `from_pretrained(torch_dtype=...)`; 5.x renamed it `dtype=` (the old name warns).
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    if TRANSFORMERS_VERSION >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


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
        return config.get_text_config(decoder=True) if "decoder" in _params(config.get_text_config) else config.get_text_config()
    return config


def _params(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
