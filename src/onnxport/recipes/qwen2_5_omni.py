"""Qwen2.5-Omni audio encoder (Whisper-like convs + transformer over 2*n_window-frame chunks,
stride-2 pooling). The original splits the mel features by lengths and pads the chunks with
`pad_sequence`, then attends within chunks via `cu_seqlens`: all data-dependent. The chunking,
the valid/pool index maps and the block-diagonal mask are computed outside the graph
(`onnxport.runtime.preprocess.qwen2_5_omni_audio`) and fed in; `varlen_attention_as_mask`
turns the chunked attention into one masked attention. Dims: `num_chunks`, `chunk_frames`,
`num_frames` (valid frames after the first conv), `num_audio_tokens` (after pooling)."""

from __future__ import annotations

import torch

from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe


class OmniAudioGraph(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, padded_feature, chunk_lengths, valid_indices, pool_indices, attention_mask):
        out = self.encoder(input_features=None, feature_lens=None, padded_feature=padded_feature,
                           chunk_lengths=chunk_lengths, valid_indices=valid_indices, pool_indices=pool_indices,
                           cu_seqlens=attention_mask, max_seqlen=0)
        return out.last_hidden_state


@register_recipe("qwen2_5_omni_audio_encoder", part="audio")
class Qwen25OmniAudio(EncoderRecipe):
    family = "qwen2_5_omni_audio"
    #: per-clip mel frame counts to verify at: one clip, two clips with ragged tail chunks
    clips = ([45], [45, 25], [100, 7, 60])

    def load_model(self, ckpt, dtype):
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

        from onnxport.recipes.base import from_pretrained

        return from_pretrained(Qwen2_5OmniAudioEncoder, ckpt, dtype, self.attn_implementation)

    def audio_tower(self, model):
        return model

    def parts(self, model):
        from onnxport.hf.compat import require_transformers
        from onnxport.recipes.parts import ModulePart, TensorSpec

        require_transformers(5, "precomputed audio chunks / indices / cu_seqlens as kwargs")
        from onnxport.runtime.preprocess import qwen2_5_omni_audio

        enc = self.audio_tower(model)
        cfg = enc.config
        meta = {"n_window": cfg.n_window, "num_mel_bins": cfg.num_mel_bins}
        inputs = [
            TensorSpec("padded_feature", "float32", ("num_chunks", cfg.num_mel_bins, "chunk_frames")),
            TensorSpec("chunk_lengths", "int64", ("num_chunks",)),
            TensorSpec("valid_indices", "int64", ("num_frames",)),
            TensorSpec("pool_indices", "int64", ("num_audio_tokens",)),
            TensorSpec("attention_mask", "float32", (1, 1, "num_frames", "num_frames")),
        ]

        def make_case(sizes):
            lens = torch.tensor(sizes["feature_lens"])
            g = torch.Generator().manual_seed(int(lens.sum()))
            feats = torch.randn(cfg.num_mel_bins, int(lens.sum()), generator=g)
            feeds = qwen2_5_omni_audio(feats.numpy(), lens.numpy(), meta)
            with torch.no_grad():
                expected = enc(feats, feature_lens=lens).last_hidden_state
            return [torch.from_numpy(feeds[i.name]) for i in inputs], [expected]

        sizes = []
        for lens in self.clips:
            feeds = qwen2_5_omni_audio(torch.zeros(cfg.num_mel_bins, sum(lens)).numpy(), lens, meta)
            sizes.append({"feature_lens": list(lens), "num_chunks": len(feeds["chunk_lengths"]),
                          "chunk_frames": feeds["padded_feature"].shape[2], "num_frames": len(feeds["valid_indices"]),
                          "num_audio_tokens": len(feeds["pool_indices"])})
        return [ModulePart("audio", OmniAudioGraph(enc), inputs, ["audio_embeds"], sizes,
                           output_dims={"audio_embeds": ["num_audio_tokens", cfg.output_dim]},
                           make_case=make_case, preprocess="qwen2_5_omni_audio", meta=meta)]
