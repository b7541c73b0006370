"""Recipe registry keyed by (model_type, part): what to export for each part of a checkpoint.

One checkpoint yields every part it has: `qwen2_5_vl` gives a text `decoder` and a `vision`
encoder. A family file registers the parts that need hooks (`@register_recipe("qwen2_5_vl",
part="vision")`); every model_type in transformers' causal-LM mapping gets the generic
`decoder` part without a file (`GenericDecoder`: the model's own forward with a flat cache).
Every module in this package is imported on first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil

from onnxport.errors import InputError, UnsupportedModelError
from onnxport.recipes.base import DecoderLM, Recipe

_REGISTRY: dict[tuple[str, str], type[Recipe]] = {}
_LOADED = False
#: the order parts are exported and listed in
PART_ORDER = ("decoder", "vision", "merger", "audio", "talker", "codec")


def register_recipe(*model_types: str, part: str | None = None):
    """Register a recipe class for `model_types`; `part` defaults to the class's `part`."""

    def deco(cls: type[Recipe]) -> type[Recipe]:
        p = part or cls.part
        for mt in model_types:
            key = (mt, p)
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"{key} registered twice ({_REGISTRY[key].__name__}, {cls.__name__})")
            _REGISTRY[key] = cls
        cls.model_types = tuple(dict.fromkeys((*cls.model_types, *model_types)))
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "parts"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def registered() -> dict[tuple[str, str], type[Recipe]]:
    """(model_type, part) -> recipe class for the family files (the generic decoder not included)."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def causal_lm_types() -> list[str]:
    """Every model_type transformers can build a causal LM for (the generic decoder's reach)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def parts_for(model_type: str, config: dict | None = None) -> dict[str, type[Recipe]]:
    """part name -> recipe class for a model_type, in PART_ORDER; the generic decoder fills
    `decoder` for any causal-LM type without a family file, except for checkpoints of
    encoder-decoder models (whisper, bart: their decoder reads encoder states) unless the
    checkpoint itself is the *ForCausalLM. A checkpoint saved from *ForCausalLM classes only
    (WhisperForCausalLM: the decoder without its encoder) has only the decoder part. Parts the
    checkpoint does not have (`Recipe.present_in(config)`) are left out."""
    config = config or {}
    found = {p: cls for (mt, p), cls in registered().items() if mt == model_type and cls.present_in(config)}
    archs = [str(a) for a in config.get("architectures") or []]
    causal_only = bool(archs) and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    seq2seq = config.get("is_encoder_decoder") and not causal_only
    if causal_only:
        # a family's seq2seq decoder recipe (whisper's reads encoder states) does not fit a
        # checkpoint of the decoder alone: the generic decoder does
        from onnxport.recipes.base import DecoderLM

        found = {p: cls for p, cls in found.items() if p == "decoder" and issubclass(cls, DecoderLM)}
    if "decoder" not in found and not seq2seq and model_type in causal_lm_types():
        from onnxport.recipes.generic import GenericDecoder

        found["decoder"] = GenericDecoder
    order = {p: i for i, p in enumerate(PART_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def get_recipes(model_type: str, parts: tuple[str, ...] | None = None, config: dict | None = None
                ) -> dict[str, Recipe]:
    """Instantiated recipes for the requested parts (default: every part the type has)."""
    available = parts_for(model_type, config)
    if not available:
        known = sorted({mt for mt, _ in registered()})
        lms = causal_lm_types()
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no recipe; supported: the {len(lms)} transformers causal-LM types "
            f"({', '.join(t for t in ('llama', 'mistral', 'qwen2', 'gemma2', 'phi3') if t in lms)}, ...; "
            f"`onnxport recipes --all` lists them) and {', '.join(known)}",
            "export a submodule with onnxport export-module, or add a recipe file in onnxport/recipes/",
        )
    if parts:
        unknown = [p for p in parts if p not in available]
        if unknown:
            raise InputError(f"model_type {model_type!r} has no part {unknown[0]!r}",
                             f"its parts: {', '.join(available)}")
        available = {p: available[p] for p in parts}
    return {p: cls(model_type) for p, cls in available.items()}


def encoder_recipe(model_type: str, config: dict | None = None) -> Recipe | None:
    """The first non-decoder part's recipe, or None."""
    for part, cls in parts_for(model_type, config).items():
        if part != "decoder":
            return cls(model_type)
    return None


def get_recipe(model_type: str, part: str | None = None, config: dict | None = None) -> Recipe:
    """The recipe of one part (default: the decoder if the type has one, else its first part)."""
    recipes = get_recipes(model_type, (part,) if part else None, config)
    return recipes.get("decoder") or next(iter(recipes.values()))


__all__ = ["DecoderLM", "Recipe", "causal_lm_types", "get_recipe", "get_recipes", "parts_for", "register_recipe",
           "registered"]
