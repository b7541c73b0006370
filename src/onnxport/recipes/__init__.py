"""Recipe registry: a recipe says WHAT to export for a model family (parts, inputs, dims).

Add an architecture by adding one file here with a `@register_recipe("model_type", ...)` class;
every module in this package is imported on first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil

from onnxport.errors import UnsupportedModelError
from onnxport.recipes.base import DecoderLM, Recipe

_REGISTRY: dict[str, type[Recipe]] = {}
_LOADED = False


def register_recipe(*model_types: str):
    def deco(cls: type[Recipe]) -> type[Recipe]:
        for mt in model_types:
            if mt in _REGISTRY and _REGISTRY[mt] is not cls:
                raise ValueError(f"model_type {mt!r} registered twice ({_REGISTRY[mt].__name__}, {cls.__name__})")
            _REGISTRY[mt] = cls
        cls.model_types = tuple(model_types)
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def all_recipes() -> dict[str, type[Recipe]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_recipe(model_type: str) -> Recipe:
    recipes = all_recipes()
    if model_type not in recipes:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no recipe; supported: {', '.join(recipes)}",
            "use a supported checkpoint, export a submodule with onnxport export-module, or add a recipe file in onnxport/recipes/",
        )
    return recipes[model_type](model_type)


__all__ = ["DecoderLM", "Recipe", "all_recipes", "get_recipe", "register_recipe"]
