"""SigLIP vision tower at its trained image size (dynamic batch). transformers'
`interpolate_pos_encoding` computes the new grid from Python ints, so a graph traced with it is
only valid at the traced size; deployments fix the image size anyway (224/384/512)."""

from __future__ import annotations

from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe


@register_recipe("siglip", "siglip_vision_model", part="vision")
class SiglipVision(EncoderRecipe):
    family = "siglip"

    @property
    def model_class(self) -> str:
        return "SiglipModel" if self.model_type == "siglip" else "SiglipVisionModel"

    def vision(self, model):
        # SiglipModel holds the tower as .vision_model (transformers 5.x: the tower is the
        # SiglipVisionModel itself; 4.x: SiglipVisionModel wraps it as .vision_model too)
        return getattr(model, "vision_model", model)

    def parts(self, model):
        from onnxport.recipes.parts import ModulePart, NamedInputs, TensorSpec

        cfg = self.vision(model).config
        side = cfg.image_size
        spec = TensorSpec("pixel_values", "float32", ("batch_size", cfg.num_channels, side, side))
        module = NamedInputs(self.vision(model), ["pixel_values"], keep=["last_hidden_state", "pooler_output"])
        sizes = [{"batch_size": 2}, {"batch_size": 1}, {"batch_size": 3}]
        num_patches = (side // cfg.patch_size) ** 2
        return [ModulePart("vision", module, [spec], ["last_hidden_state", "pooler_output"], sizes,
                           output_dims={"last_hidden_state": ["batch_size", num_patches, cfg.hidden_size],
                                        "pooler_output": ["batch_size", cfg.hidden_size]})]
