"""ChatTTS / MiniCPM-o 2.6 TTS: text -> audio codes (a Llama talker) -> mel (DVAE) -> waveform (Vocos).

No transformers class exists for this structure, so the family is built here from its pieces, as
ChatTTS (`ChatTTS/model/gpt.py`, `dvae.py`) and MiniCPM-o (`ConditionalChatTTS`) build it:

- `projector` (MiniCPM-o's MultiModalProjector: linear -> relu -> linear, then L2-normalized)
  maps the conditioning vectors (a speaker embedding, or the LLM hidden states MiniCPM-o passes)
  to the talker's width; they come first in the KV cache.
- `emb_text` embeds text token ids; `emb_code[i]` embeds codebook i's code, summed over the
  `num_vq` codebooks per frame.
- `model`: transformers' `LlamaModel` without its token embedding, fed `inputs_embeds`.
- `head_code[i]` (weight-normed, no bias) predicts codebook i's next code from the last hidden
  state; generation stops when any codebook predicts the audio EOS code
  (`num_audio_tokens - 1`), whose frame is dropped.
- `dvae`: GFSQ dequantization (vector-quantize-pytorch's GroupedResidualFSQ: G groups x R
  residual levels = num_vq codes per frame), the grouped features interleaved to twice the frame
  rate, a ConvNeXt conv decoder -> mel, times the learned `coef` (ChatTTS' `torch.mul(...,
  out=)`, kept as written: the `out_kwarg_as_functional` rewrite is what makes it export).
- `vocos`: Vocos backbone (conv embed, ConvNeXt blocks) and ISTFT head (log-magnitude and phase
  -> polar spectrum -> `torch.istft`, "center" padding; exported through `istft_as_conv`).

Checkpoint: `config.json` (model_type "chattts", the fields of `ChatTTSConfig`) and
`model.safetensors` (the state dict; loading reads safetensors only and is strict both ways).
`save_pretrained` writes one.

Export (`onnxport export CKPT -o OUT`): part `talker` gives `condition`, `embed_text`,
`embed_codes`, `talker` (flat KV cache, verified against LlamaModel with a real cache) and
`code_heads`; part `codec` gives `dvae_decoder` and `vocoder`. The manifest's `text-to-speech`
pipeline section says how they chain (runtime/tasks/text_to_speech.py runs it) and holds the
end-to-end check made at export: audio codes of a sample text equal to `generate_codes` (the
PyTorch reference loop below), and the waveform SNR / log-mel distance against PyTorch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from onnxport.errors import VerificationError
from onnxport.recipes import register_recipe
from onnxport.recipes.chattts_model import MODEL_TYPE, ChatTTSModel, load_chattts
from onnxport.recipes.encoder import EncoderRecipe
from onnxport.spec import BATCH, PAST, SEQ, TOTAL, kv_names

if TYPE_CHECKING:
    from onnxport.bundle import Graph, Manifest, Pipeline
    from onnxport.checkpoint import Checkpoint
    from onnxport.recipes.parts import ModulePart

#: graph names, also the pipeline's roles
CONDITION, EMBED_TEXT, EMBED_CODES, TALKER, CODE_HEADS, DVAE_DECODER, VOCODER = (
    "condition", "embed_text", "embed_codes", "talker", "code_heads", "dvae_decoder", "vocoder")
#: the export-time end-to-end check: its text, and the most frames it generates
SAMPLE_TEXT = "Hello, this is a test of text to speech."
SAMPLE_MAX_FRAMES = 200
#: the waveform SNR (ONNX Runtime vs PyTorch from the same codes) the export requires; fp32
#: graphs with the DFT-as-matmul ISTFT measure ~118 dB on the tiny test model
MIN_SNR_DB = 40.0



# --- graph wrappers (each holds only what its graph reads) --------------------------------------

class _Method(nn.Module):
    """`fn(*inputs)` of a few submodules of the model, as one graph."""

    def __init__(self, model: ChatTTSModel, method: str, keep: list[str]):
        super().__init__()
        for name in keep:
            setattr(self, name, getattr(model, name))
        self._fn = getattr(ChatTTSModel, method)

    def forward(self, *inputs):
        return self._fn(self, *inputs)


class TalkerWithCache(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, past k/v per layer) -> (last_hidden_state,
    present k/v per layer), through transformers' LlamaModel on a DynamicCache."""

    def __init__(self, llama):
        super().__init__()
        from onnxport.hf.compat import cache_kwarg

        self.model = llama
        self.num_layers = len(llama.layers)
        self.cache_kwarg = cache_kwarg(llama.forward)

    def forward(self, *tensors):
        # one *args signature: the export driver gives torch.export one flat argument list
        from onnxport.hf.compat import build_dynamic_cache, cache_pairs, output_cache

        embeds, mask, positions, past = tensors[0], tensors[1], tensors[2], tensors[3:]
        cache = build_dynamic_cache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                         return_dict=True, **{self.cache_kwarg: cache})
        return (out.last_hidden_state, *[t for kv in cache_pairs(output_cache(out)) for t in kv])


# --- recipes ------------------------------------------------------------------------------------

class _ChatTTSRecipe(EncoderRecipe):
    family = MODEL_TYPE
    task = "text-to-speech"
    #: both parts share one loaded model (api.export keys loaded models by this name)
    model_class = "ChatTTSModel"

    def load_model(self, ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
        return load_chattts(ckpt, dtype)


@register_recipe(MODEL_TYPE, part="talker")
class ChatTTSTalker(_ChatTTSRecipe):
    """The talker and what feeds it: conditioning, text and code embeddings, the code heads."""

    #: verification sizes of the talker: a prompt on an empty cache (batch 1), one frame on a
    #: cache (batch 2), several positions on a cache (the export size: no dim of size 0 or 1)
    talker_sizes = ({BATCH: 1, SEQ: 6, PAST: 0}, {BATCH: 2, SEQ: 1, PAST: 5}, {BATCH: 2, SEQ: 3, PAST: 4})

    def parts(self, model: ChatTTSModel) -> list[ModulePart]:
        from onnxport.recipes.parts import ModulePart, TensorSpec

        cfg = model.config
        h, vq = cfg.hidden_size, cfg.num_vq
        llama = model.model
        n = len(llama.layers)
        heads = llama.config.num_key_value_heads or llama.config.num_attention_heads
        head_dim = getattr(llama.config, "head_dim", None) or h // llama.config.num_attention_heads
        past, present = kv_names(n)
        embeds = TensorSpec("inputs_embeds", "float32", (BATCH, SEQ, h))
        reference = TalkerReference(model)
        return [
            ModulePart(CONDITION, _Method(model, "condition", ["projector"]),
                       [TensorSpec("spk_emb", "float32", (BATCH, "condition_length", cfg.spk_emb_dim))],
                       ["inputs_embeds"], [{BATCH: 1, "condition_length": 1}, {BATCH: 2, "condition_length": 3}],
                       output_dims={"inputs_embeds": [BATCH, "condition_length", h]}),
            ModulePart(EMBED_TEXT, _Method(model, "embed_text", ["emb_text"]),
                       [TensorSpec("input_ids", "int64", (BATCH, SEQ), low=0, high=cfg.num_text_tokens)],
                       ["inputs_embeds"], [{BATCH: 1, SEQ: 5}, {BATCH: 2, SEQ: 3}],
                       output_dims={"inputs_embeds": [BATCH, SEQ, h]}, role="embedding"),
            ModulePart(EMBED_CODES, _Method(model, "embed_codes", ["emb_code"]),
                       [TensorSpec("audio_codes", "int64", (BATCH, SEQ, vq), low=0, high=cfg.num_audio_tokens)],
                       ["inputs_embeds"], [{BATCH: 1, SEQ: 1}, {BATCH: 2, SEQ: 4}],
                       output_dims={"inputs_embeds": [BATCH, SEQ, h]}, role="embedding"),
            ModulePart(TALKER, TalkerWithCache(llama),
                       [embeds, TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
                        TensorSpec("position_ids", "int64", (BATCH, SEQ)),
                        *[TensorSpec(p, "float32", (BATCH, heads, PAST, head_dim)) for p in past]],
                       ["last_hidden_state", *present], [dict(s) for s in self.talker_sizes],
                       output_dims={"last_hidden_state": [BATCH, SEQ, h],
                                    **{p: [BATCH, heads, TOTAL, head_dim] for p in present}},
                       make_case=reference.case, role="decoder"),
            ModulePart(CODE_HEADS, _Method(model, "code_logits", ["head_code"]),
                       [TensorSpec("hidden_states", "float32", (BATCH, SEQ, h))],
                       ["logits"], [{BATCH: 1, SEQ: 1}, {BATCH: 2, SEQ: 3}],
                       output_dims={"logits": [BATCH, SEQ, vq, cfg.num_audio_tokens]}, role="lm_head"),
        ]


@register_recipe(MODEL_TYPE, part="codec")
class ChatTTSCodec(_ChatTTSRecipe):
    """DVAE decoder (codes -> mel) and Vocos vocoder (mel -> waveform); proposes the pipeline."""

    def parts(self, model: ChatTTSModel) -> list[ModulePart]:
        from onnxport.recipes.parts import ModulePart, TensorSpec

        cfg = model.config
        mels, hop = cfg.dvae["num_mels"], cfg.vocos["hop_length"]
        codebook = cfg.num_audio_tokens - 1
        return [
            ModulePart(DVAE_DECODER, model.dvae,
                       [TensorSpec("audio_codes", "int64", (BATCH, cfg.num_vq, "num_codes"), low=0, high=codebook)],
                       ["mel"], [{BATCH: 1, "num_codes": 9}, {BATCH: 2, "num_codes": 20}],
                       output_dims={"mel": [BATCH, mels, "mel_frames"]}, role="vocoder"),
            ModulePart(VOCODER, model.vocos, [TensorSpec("mel", "float32", (BATCH, mels, "mel_frames"))],
                       ["waveform"], [{BATCH: 1, "mel_frames": 18}, {BATCH: 2, "mel_frames": 40}],
                       output_dims={"waveform": [BATCH, "audio_length"]}, role="vocoder",
                       meta={"hop_length": hop, "sampling_rate": cfg.sample_rate}),
        ]

    def pipeline(self, model: ChatTTSModel, graphs: list[Graph]) -> Pipeline:
        from onnxport.bundle import Pipeline

        return Pipeline("text-to-speech", {r: r for r in (CONDITION, EMBED_TEXT, EMBED_CODES, TALKER, CODE_HEADS,
                                                          DVAE_DECODER, VOCODER)}, text_to_speech_config(model))

    def verify_pipeline(self, model: ChatTTSModel, pipeline: Pipeline, folder: Path, manifest: Manifest) -> dict:
        """End to end on a sample text: the runtime's codes against `generate_codes`, and the
        runtime's waveform against PyTorch's from the same codes (SNR, log-mel distance)."""
        return check_text_to_speech(model, pipeline, folder, manifest)


def text_to_speech_config(model: ChatTTSModel) -> dict:
    cfg = model.config
    llama = model.model.config
    return {
        "num_vq": cfg.num_vq, "num_audio_tokens": cfg.num_audio_tokens, "audio_eos_token_id": cfg.audio_eos,
        "audio_bos_token_id": cfg.audio_bos_token_id, "num_text_tokens": cfg.num_text_tokens,
        "text_template": cfg.text_template, "min_new_token": cfg.min_new_token, "max_new_token": cfg.max_new_token,
        "max_positions": llama.max_position_embeddings, "num_layers": llama.num_hidden_layers,
        "sample_rate": cfg.sample_rate, "hop_length": cfg.vocos["hop_length"], "n_fft": cfg.vocos["n_fft"],
        # two mel frames per code frame (the DVAE interleaves its two feature halves in time)
        "mel_frames_per_code": 2,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k},
        # the conditioning prefix: `spk_emb` [batch, condition_length, spk_emb_dim] through the
        # condition graph, first in the cache; without one, the checkpoint's mean speaker
        # (spk_stat[0]) repeated num_spk_embs times
        "speaker": {"dim": cfg.spk_emb_dim, "num_spk_embs": cfg.num_spk_embs,
                    "default": [round(float(x), 8) for x in model.spk_stat[0].tolist()]},
    }


class TalkerReference:
    """Inputs and expected outputs of the talker graph from LlamaModel's own forward: the cache
    after a prefix of random embeddings, then the hidden states of the next positions."""

    def __init__(self, model: ChatTTSModel):
        from onnxport.hf.compat import cache_kwarg

        self.llama = model.model
        self.hidden = model.config.hidden_size
        self.kw = cache_kwarg(self.llama.forward)

    def case(self, sizes: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from onnxport.hf.compat import cache_pairs, output_cache

        b, s, p = sizes[BATCH], sizes[SEQ], sizes[PAST]
        g = torch.Generator().manual_seed(100 * b + 10 * s + p)
        embeds = torch.randn(b, p + s, self.hidden, generator=g)
        mask = torch.ones(b, p + s, dtype=torch.long)
        positions = torch.arange(p + s).expand(b, -1)
        with torch.no_grad():
            if p:
                cache = output_cache(self.llama(inputs_embeds=embeds[:, :p], use_cache=True, return_dict=True))
                past = [t.clone() for kv in cache_pairs(cache) for t in kv]
                out = self.llama(inputs_embeds=embeds[:, p:], attention_mask=mask, position_ids=positions[:, p:],
                                 use_cache=True, return_dict=True, **{self.kw: cache})
            else:
                cfg = self.llama.config
                heads = cfg.num_key_value_heads or cfg.num_attention_heads
                head_dim = getattr(cfg, "head_dim", None) or self.hidden // cfg.num_attention_heads
                past = [torch.zeros(b, heads, 0, head_dim) for _ in range(2 * len(self.llama.layers))]
                out = self.llama(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                                 return_dict=True)
        present = [t for kv in cache_pairs(output_cache(out)) for t in kv]
        return [embeds[:, p:], mask, positions[:, p:].contiguous(), *past], [out.last_hidden_state, *present]


# --- the end-to-end check -------------------------------------------------------------------------

def snr_db(actual, expected) -> float:
    """10 log10(|expected|^2 / |actual - expected|^2); inf when equal."""
    import numpy as np

    a, e = np.asarray(actual, dtype=np.float64).ravel(), np.asarray(expected, dtype=np.float64).ravel()
    noise = float(np.sum((a - e) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(max(float(e @ e), 1e-300) / noise))


def log_mel_distance(actual, expected, sample_rate: int, n_fft: int, hop_length: int) -> float:
    """Mean |log-mel(actual) - log-mel(expected)| (natural log of power, floor 1e-10; the
    vocoder's own n_fft and hop, n_fft / 4 mel bands up to 80) with transformers' numpy mel
    filter bank: how far apart the two waveforms sound, in one number."""
    import numpy as np
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    n_fft = max(n_fft, 16)
    n_mels = min(80, n_fft // 4)
    mel = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
    window = window_function(n_fft, "hann")

    def logmel(x):
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size < n_fft:
            x = np.pad(x, (0, n_fft - x.size))
        return spectrogram(x, window, frame_length=n_fft, hop_length=hop_length, power=2.0, mel_filters=mel,
                           log_mel="log", mel_floor=1e-10)

    return float(np.mean(np.abs(logmel(actual) - logmel(expected))))


def check_text_to_speech(model: ChatTTSModel, pipeline: Pipeline, folder: Path, manifest: Manifest,
                         text: str = SAMPLE_TEXT) -> dict:
    """The runtime (`TextToSpeech` on the bundle being written) against the PyTorch reference on
    `text`: audio codes equal to `generate_codes`, and the waveform from those codes within
    MIN_SNR_DB of PyTorch's. Returns the record; raises VerificationError otherwise."""
    import time
    from dataclasses import replace

    import numpy as np

    from onnxport.runtime.tasks.text_to_speech import TextToSpeech

    tts = TextToSpeech(folder, manifest=replace(manifest, pipeline=pipeline))
    cfg = model.config
    # a bundle without a tokenizer is checked on token ids (the runtime takes those too)
    prompt = text if (folder / "tokenizer.json").is_file() else list(range(1, min(9, cfg.num_text_tokens)))
    positions_left = model.model.config.max_position_embeddings - tts.prefix_length(tts.prompt_ids(prompt))
    frames = max(1, min(cfg.max_new_token, SAMPLE_MAX_FRAMES, positions_left))
    t0 = time.perf_counter()
    speech = tts.generate(prompt, max_frames=frames)
    seconds = time.perf_counter() - t0
    ref_codes = model.generate_codes(torch.tensor([speech.prompt_ids]), max_frames=frames).numpy()
    record = {"text": prompt, "prompt_tokens": len(speech.prompt_ids), "frames": int(speech.codes.shape[0]),
              "max_frames": frames, "stopped_at_eos": speech.stopped_at_eos,
              "codes_equal": bool(np.array_equal(ref_codes, speech.codes)), "runtime_seconds": round(seconds, 3),
              "min_snr_db": MIN_SNR_DB}
    if not record["codes_equal"]:
        diff = next((i for i, (a, b) in enumerate(zip(ref_codes.tolist(), speech.codes.tolist())) if a != b),
                    min(len(ref_codes), len(speech.codes)))
        raise VerificationError(f"text-to-speech: ONNX Runtime's audio codes differ from PyTorch's at frame {diff} "
                                f"({speech.codes.shape[0]} vs {ref_codes.shape[0]} frames)",
                                "every graph verified alone; run with --debug and report it; nothing was written")
    record["ok"] = True
    if speech.codes.shape[0]:  # else nothing to decode: the model ended at once, as PyTorch did
        mel, wave = model.decode_waveform(torch.from_numpy(np.ascontiguousarray(speech.codes.T[None])))
        wave = wave[0].numpy()
        snr = snr_db(speech.samples, wave)
        distance = log_mel_distance(speech.samples, wave, cfg.sample_rate, cfg.vocos["n_fft"], cfg.vocos["hop_length"])
        record.update(samples=int(wave.size), snr_db=round(snr, 2) if math.isfinite(snr) else None,
                      max_abs_diff=float(np.max(np.abs(speech.samples - wave))),
                      mel_max_abs_diff=float(np.max(np.abs(tts.mel(speech.codes) - mel[0].numpy()))),
                      log_mel_distance=float(f"{distance:.3g}"), ok=snr >= MIN_SNR_DB)
        if not record["ok"]:
            raise VerificationError(f"text-to-speech: waveform SNR {snr:.1f} dB against PyTorch (< {MIN_SNR_DB} dB)",
                                    "every graph verified alone; run with --debug and report it; nothing was written")
    return record
