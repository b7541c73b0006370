"""wav2vec 2.0 family speech encoders (HuBERT, wav2vec2, wav2vec2-conformer, data2vec-audio):
raw waveform + padding mask -> frame features. `audio_length` samples become `num_frames`
frames through the conv feature extractor. wav2vec2-conformer with relative position
embeddings fails in the dynamo exporter (a view of a non-contiguous tensor with symbolic
strides, torch 2.13), so `exporter="auto"` falls back to TorchScript there."""

from __future__ import annotations

from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe

CLASSES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "wav2vec2-conformer": "Wav2Vec2ConformerModel",
           "data2vec-audio": "Data2VecAudioModel"}


@register_recipe(*CLASSES, part="audio")
class Wav2Vec2Like(EncoderRecipe):
    family = "wav2vec2"

    @property
    def model_class(self) -> str:
        return CLASSES[self.model_type]

    def parts(self, model):
        from onnxport.recipes.parts import ModulePart, NamedInputs, TensorSpec

        cfg = model.config
        # a padding mask only matters (and is only used) with layer-norm feature extractors
        with_mask = cfg.feat_extract_norm == "layer"
        specs = [TensorSpec("input_values", "float32", ("batch_size", "audio_length"))]
        if with_mask:
            specs.append(TensorSpec("attention_mask", "int64", ("batch_size", "audio_length")))
        module = NamedInputs(model, [s.name for s in specs], keep=["last_hidden_state"])
        sizes = []
        for batch, length in ((2, 4000), (3, 6400)):
            frames = int(model._get_feat_extract_output_lengths(length))
            sizes.append({"batch_size": batch, "audio_length": length, "num_frames": frames})
        return [ModulePart("audio", module, specs, ["last_hidden_state"], sizes,
                           output_dims={"last_hidden_state": ["batch_size", "num_frames", cfg.hidden_size]})]
