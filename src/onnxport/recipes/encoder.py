"""Encoder recipes: vision towers, audio encoders, codecs. A recipe loads the model and returns
its `ModulePart`s (what to export: module, inputs with named dims, sizes to verify at); the
export driver (onnxport.export.module) does the rest. Subclasses override `parts`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from onnxport.recipes.base import Recipe, from_pretrained

if TYPE_CHECKING:
    import torch

    from onnxport.checkpoint import Checkpoint
    from onnxport.recipes.parts import ModulePart


class EncoderRecipe(Recipe):
    task: ClassVar[str] = "feature-extraction"
    #: transformers class that loads the checkpoint
    model_class: ClassVar[str] = ""
    attn_implementation: ClassVar[str] = "eager"

    def load_model(self, ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
        import transformers

        return from_pretrained(getattr(transformers, self.model_class), ckpt, dtype, self.attn_implementation)

    def parts(self, model) -> list[ModulePart]:
        raise NotImplementedError
