"""The ChatTTS / MiniCPM-o 2.6 TTS model, built from its pieces (no transformers class holds it):
config, checkpoint reading and writing, and the modules under ChatTTS' own names, so the state
dict reads like its checkpoints. The export recipe is recipes/chattts.py."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from onnxport.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from onnxport.checkpoint import Checkpoint

MODEL_TYPE = "chattts"


# --- config and checkpoint ------------------------------------------------------------------------

@dataclass
class ChatTTSConfig:
    """config.json of a `chattts` checkpoint. Defaults are MiniCPM-o 2.6's TTS (ChatTTS' DVAE and
    Vocos settings); `talker` holds LlamaConfig fields."""

    num_text_tokens: int = 21178
    #: codebook size + 1: the last code is the audio EOS
    num_audio_tokens: int = 626
    num_vq: int = 4
    #: width of the conditioning vectors (MiniCPM-o: the LLM's hidden size)
    spk_emb_dim: int = 3584
    #: conditioning vectors per utterance when the caller gives none (the default speaker)
    num_spk_embs: int = 1
    audio_bos_token_id: int = 21132
    #: how text becomes the talker's prompt (then `audio_bos_token_id`); tokenized without
    #: the tokenizer's own special tokens
    text_template: str = "[Stts]{text}[Ptts]"
    #: EOS is masked before this many frames, as ChatTTS' / MiniCPM-o's `min_new_token`
    min_new_token: int = 0
    max_new_token: int = 2048
    sample_rate: int = 24000
    #: sampling defaults (ChatTTS' infer_code: temperature 0.3, top_p 0.7, top_k 20)
    temperature: float = 0.3
    top_p: float = 0.7
    top_k: int = 20
    talker: dict = field(default_factory=lambda: dict(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_key_value_heads=12,
        num_hidden_layers=20, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0))
    dvae: dict = field(default_factory=lambda: dict(
        levels=[5, 5, 5, 5], groups=2, residuals=2, dim=1024, bn_dim=128, hidden=256, n_layer=12,
        kernel=7, dilation=2, num_mels=100))
    vocos: dict = field(default_factory=lambda: dict(
        dim=512, intermediate_dim=1536, num_layers=8, n_fft=1024, hop_length=256))
    model_type: str = MODEL_TYPE
    architectures: list = field(default_factory=lambda: ["ChatTTSModel"])

    @classmethod
    def from_dict(cls, d: dict) -> ChatTTSConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def audio_eos(self) -> int:
        return self.num_audio_tokens - 1

    @property
    def hidden_size(self) -> int:
        return int(self.talker["hidden_size"])

    def check(self) -> None:
        d = self.dvae
        codebook = math.prod(d["levels"])
        if self.num_vq != d["groups"] * d["residuals"]:
            raise CheckpointError(f"config.json: num_vq {self.num_vq} != dvae groups x residuals "
                                  f"({d['groups']} x {d['residuals']})", "fix config.json")
        if self.num_audio_tokens != codebook + 1:
            raise CheckpointError(f"config.json: num_audio_tokens {self.num_audio_tokens} != codebook size "
                                  f"{codebook} (prod of dvae levels) + 1 (the audio EOS)", "fix config.json")
        if "{text}" not in self.text_template:
            raise CheckpointError("config.json: text_template has no {text}", 'e.g. "[Stts]{text}[Ptts]"')


def _vector_quantize():
    try:
        from vector_quantize_pytorch import GroupedResidualFSQ
    except ImportError:
        raise InputError("the chattts DVAE is built from vector-quantize-pytorch, which is not installed",
                         "pip install 'onnxport[tts]' (it pins vector-quantize-pytorch)") from None
    return GroupedResidualFSQ


# --- modules (ChatTTS' names, so the state dict reads like its checkpoints) ------------------------

class ConvNeXtBlock(nn.Module):
    """ChatTTS / Vocos ConvNeXt block on [B, C, T]: depthwise (dilated) conv, LayerNorm,
    pointwise MLP, layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, kernel: int, dilation: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.pwconv2(self.act(self.pwconv1(y))) * self.gamma
        return x + y.transpose(1, 2)


class GFSQ(nn.Module):
    """ChatTTS' GFSQ, decode side: codes [B, num_vq, T] (group-major) -> features [B, dim, T]."""

    def __init__(self, dim: int, levels: list[int], groups: int, residuals: int):
        super().__init__()
        self.quantizer = _vector_quantize()(dim=dim, levels=list(levels), num_quantizers=residuals, groups=groups)
        self.G, self.R = groups, residuals

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        x = x.view(x.size(0), x.size(1), self.G, self.R).permute(2, 0, 1, 3)
        return self.quantizer.get_output_from_indices(x).transpose(1, 2)


class DVAEDecoder(nn.Module):
    def __init__(self, idim: int, odim: int, n_layer: int, bn_dim: int, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.conv_in = nn.Sequential(nn.Conv1d(idim, bn_dim, 3, 1, 1), nn.GELU(), nn.Conv1d(bn_dim, hidden, 3, 1, 1))
        self.decoder_block = nn.ModuleList(ConvNeXtBlock(hidden, hidden * 4, kernel, dilation) for _ in range(n_layer))
        self.conv_out = nn.Conv1d(hidden, odim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)
        for block in self.decoder_block:
            y = block(y)
        return self.conv_out(y)


class DVAE(nn.Module):
    """Codes [B, num_vq, T] -> mel [B, num_mels, 2T] (ChatTTS DVAE.forward(mode="decode"))."""

    def __init__(self, cfg: dict):
        super().__init__()
        dim = cfg["dim"]
        self.coef = nn.Parameter(torch.rand(1, cfg["num_mels"], 1))
        self.decoder = DVAEDecoder(dim // 2, dim // 2, cfg["n_layer"], cfg["bn_dim"], cfg["hidden"], cfg["kernel"],
                                   cfg["dilation"])
        self.out_conv = nn.Conv1d(dim // 2, cfg["num_mels"], 3, 1, 1, bias=False)
        self.vq_layer = GFSQ(dim, cfg["levels"], cfg["groups"], cfg["residuals"])

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        feats = self.vq_layer._embed(codes)
        # the two halves of the feature interleave in time: twice the frame rate, half the width
        feats = feats.view(feats.size(0), 2, feats.size(1) // 2, feats.size(2)).permute(0, 2, 3, 1).flatten(2)
        dec_out = self.out_conv(self.decoder(feats))
        return torch.mul(dec_out, self.coef, out=dec_out)


class ISTFTHead(nn.Module):
    """Vocos ISTFTHead, "center" padding: [B, T, dim] -> waveform [B, hop * (T - 1)]."""

    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.out = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.out(x).transpose(1, 2)
        mag, phase = x.chunk(2, dim=1)
        mag = torch.clip(torch.exp(mag), max=1e2)
        # Vocos writes mag * (cos p + 1j sin p): the same spectrum
        spec = torch.polar(mag, phase)
        return torch.istft(spec, self.n_fft, self.hop_length, self.n_fft, window=self.window, center=True)


class Vocos(nn.Module):
    """mel [B, num_mels, T] -> waveform [B, hop * (T - 1)] (Vocos.decode: backbone + head)."""

    def __init__(self, num_mels: int, cfg: dict):
        super().__init__()
        dim, layers = cfg["dim"], cfg["num_layers"]
        self.embed = nn.Conv1d(num_mels, dim, 7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, cfg["intermediate_dim"], 7, 1, 1.0 / layers)
                                      for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = ISTFTHead(dim, cfg["n_fft"], cfg["hop_length"])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.head(self.final_layer_norm(x.transpose(1, 2)))


class Projector(nn.Module):
    """MiniCPM-o's MultiModalProjector (LLM width -> talker width)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(x)))


class ChatTTSModel(nn.Module):
    """The whole TTS model; `generate_codes` + `decode_waveform` are the PyTorch reference."""

    def __init__(self, config: ChatTTSConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config = config
        h = config.hidden_size
        self.projector = Projector(config.spk_emb_dim, h)
        self.emb_text = nn.Embedding(config.num_text_tokens, h)
        self.emb_code = nn.ModuleList(nn.Embedding(config.num_audio_tokens, h) for _ in range(config.num_vq))
        self.head_code = nn.ModuleList(
            nn.utils.parametrizations.weight_norm(nn.Linear(h, config.num_audio_tokens, bias=False), name="weight")
            for _ in range(config.num_vq))
        llama = LlamaConfig(**{**config.talker, "vocab_size": 1, "bos_token_id": None, "eos_token_id": None,
                                "pad_token_id": None})
        llama._attn_implementation = "eager"
        self.model = LlamaModel(llama)
        # ChatTTS deletes it too: the talker only ever reads inputs_embeds
        del self.model.embed_tokens
        self.dvae = DVAE(config.dvae)
        self.vocos = Vocos(config.dvae["num_mels"], config.vocos)
        #: mean and std of the speaker embeddings (ChatTTS' spk_stat): the mean is the default speaker
        self.register_buffer("spk_stat", torch.zeros(2, config.spk_emb_dim))

    # --- the pieces the graphs export ---------------------------------------------------------------

    def condition(self, spk_emb: torch.Tensor) -> torch.Tensor:
        """[B, C, spk_emb_dim] -> [B, C, hidden]: projected and L2-normalized (MiniCPM-o)."""
        return F.normalize(self.projector(spk_emb), p=2, dim=-1)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb_text(input_ids)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, S, num_vq] -> [B, S, hidden]: each codebook's embedding, summed."""
        return torch.stack([emb(codes[..., i]) for i, emb in enumerate(self.emb_code)], 3).sum(3)

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S, hidden] -> [B, S, num_vq, num_audio_tokens]."""
        return torch.stack([head(hidden) for head in self.head_code], 2)

    def default_speaker(self) -> torch.Tensor:
        return self.spk_stat[0].expand(self.config.num_spk_embs, -1)

    def prompt_embeds(self, input_ids: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """The talker's prefix: conditioning vectors first, then the prompt's text embeddings."""
        speaker = self.default_speaker() if speaker is None else speaker
        cond = self.condition(speaker.reshape(1, -1, self.config.spk_emb_dim).expand(input_ids.shape[0], -1, -1))
        return torch.cat([cond, self.embed_text(input_ids)], dim=1)

    # --- the reference generation loop ------------------------------------------------------------

    @torch.no_grad()
    def generate_codes(self, input_ids: torch.Tensor, speaker: torch.Tensor | None = None, max_frames: int = 2048,
                       min_frames: int | None = None) -> torch.Tensor:
        """Greedy audio codes [frames, num_vq] for one prompt [1, S] (audio_bos last): each step
        takes every codebook's argmax; EOS is masked for the first `min_frames` frames; a frame
        in which any codebook predicts EOS ends the utterance and is dropped."""
        from onnxport.hf.compat import cache_kwarg, output_cache

        min_frames = self.config.min_new_token if min_frames is None else min_frames
        kw = cache_kwarg(self.model.forward)
        eos = self.config.audio_eos
        out = self.model(inputs_embeds=self.prompt_embeds(input_ids, speaker), use_cache=True, return_dict=True)
        frames = []
        for step in range(max_frames):
            logits = self.code_logits(out.last_hidden_state[:, -1:])[0, -1]
            if step < min_frames:
                logits[:, eos] = -torch.inf
            frame = logits.argmax(-1)
            if bool((frame == eos).any()):
                break
            frames.append(frame)
            out = self.model(inputs_embeds=self.embed_codes(frame[None, None]), use_cache=True, return_dict=True,
                             **{kw: output_cache(out)})
        return torch.stack(frames) if frames else torch.zeros(0, self.config.num_vq, dtype=torch.long)

    @torch.no_grad()
    def decode_waveform(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, num_vq, T] -> (mel [B, num_mels, 2T], waveform [B, samples])."""
        mel = self.dvae(codes)
        return mel, self.vocos(mel)

    # --- checkpoint ---------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors (what `load_chattts` reads)."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().contiguous().clone() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        return out


def load_chattts(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> ChatTTSModel:
    """The model of a `chattts` checkpoint, from safetensors only; every tensor the model has must
    be in the checkpoint and every checkpoint tensor must be one of the model's (onnxport never
    exports random weights, nor ignores one silently)."""
    from safetensors.torch import load_file

    if ckpt.pickle_weights:
        raise CheckpointError("chattts checkpoints are read from safetensors only",
                              "convert the weights to model.safetensors")
    config = ChatTTSConfig.from_dict(ckpt.config)
    model = ChatTTSModel(config)
    state: dict[str, torch.Tensor] = {}
    for f in ckpt.weight_files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what, names = ("missing from", missing) if missing else ("not a tensor of the model, in", unexpected)
        raise CheckpointError(f"{len(names)} tensor(s) {what} the checkpoint: {', '.join(sorted(names)[:4])}"
                              + (" ..." if len(names) > 4 else ""),
                              "the weights do not belong to this config.json")
    return model.to(dtype).eval()


