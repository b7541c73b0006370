"""Xcodec2 decoder path: FSQ codes -> codebook lookup -> Vocos-style backbone (ResNet +
transformer) -> ISTFT head (polar spectrum, irfft, overlap-add with "same" padding). The head is
complex-valued; dynamo represents that itself, TorchScript (older opsets, NPU flows) needs the
`complex_as_real_pair` rewrite. Dims: `num_codes` (50 Hz tokens) -> `audio_length` samples."""

from __future__ import annotations

import math

import torch

from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe


class CodesToAudio(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, audio_codes):
        return self.model.decode(audio_codes=audio_codes).audio_values


@register_recipe("xcodec2", part="codec")
class Xcodec2Decoder(EncoderRecipe):
    family = "xcodec2"
    task = "audio-decoding"
    model_class = "Xcodec2Model"
    num_codes = (12, 29)

    def parts(self, model):
        from onnxport.recipes.parts import ModulePart, TensorSpec

        cfg = model.config
        codebook = math.prod(cfg.quantization_levels)
        codes = TensorSpec("audio_codes", "int64", ("batch_size", 1, "num_codes"), low=0, high=codebook)
        sizes = [{"batch_size": b, "num_codes": n} for b, n in zip((1, 2), self.num_codes)]
        return [ModulePart("decoder", CodesToAudio(model), [codes], ["audio_values"], sizes,
                           output_dims={"audio_values": ["batch_size", 1, "audio_length"]}, role="vocoder",
                           meta={"hop_length": cfg.hop_length, "sampling_rate": cfg.sampling_rate,
                                 "codebook_size": codebook})]
