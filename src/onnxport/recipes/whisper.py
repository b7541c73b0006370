"""Whisper encoder. transformers' WhisperEncoder requires exactly 2 * max_source_positions mel
frames (30 s), so only the batch is dynamic; the frames dim is fixed as in the model."""

from __future__ import annotations

from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe


@register_recipe("whisper", part="audio")
class WhisperEncoder(EncoderRecipe):
    family = "whisper"
    model_class = "WhisperModel"

    def parts(self, model):
        from onnxport.recipes.parts import ModulePart, NamedInputs, TensorSpec

        cfg = model.config
        frames = 2 * cfg.max_source_positions
        spec = TensorSpec("input_features", "float32", ("batch_size", cfg.num_mel_bins, frames))
        module = NamedInputs(model.get_encoder(), ["input_features"], keep=["last_hidden_state"])
        return [ModulePart("audio", module, [spec], ["last_hidden_state"], [{"batch_size": 1}, {"batch_size": 3}],
                           output_dims={"last_hidden_state": ["batch_size", cfg.max_source_positions, cfg.d_model]})]
