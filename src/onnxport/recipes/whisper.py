"""Whisper: the audio encoder, and the text decoder as two graphs a speech-to-text pipeline chains.

- `audio.onnx` (part audio): input_features [batch, mels, 2 * max_source_positions] ->
  last_hidden_state. transformers' WhisperEncoder requires exactly that many mel frames (30 s),
  so only the batch is dynamic; the frames dim is fixed as in the model.
- `cross_kv.onnx` (part decoder): encoder_hidden_states -> `cross.{i}.key` / `cross.{i}.value`,
  each decoder layer's cross-attention projections, computed once per utterance.
- `decoder.onnx` (part decoder): input_ids, the self-attention cache
  (`past_key_values.{i}.key/value`) and the cross k/v -> logits and `present.{i}.key/value`.
  It runs transformers' own WhisperDecoder on an EncoderDecoderCache built from the inputs, so
  the learned positions come from the cache length (past_sequence_length) as in transformers.

Both decoder graphs are verified against WhisperForConditionalGeneration's own forward (a real
cache from a prefix of random tokens), not against the wrappers that were exported. The
manifest's pipeline section (`pipeline`) carries what transformers' Whisper `generate` reads
from the generation config; runtime/tasks/speech_to_text.py runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe
from onnxport.spec import BATCH, PAST, SEQ, TOTAL, kv_names

if TYPE_CHECKING:
    from onnxport.bundle import Graph, Pipeline
    from onnxport.checkpoint import Checkpoint

#: the pipeline's graph names (roles -> graph names of this bundle)
AUDIO, CROSS_KV, DECODER = "audio", "cross_kv", "decoder"
#: the generation-config fields the speech-to-text runner reads (transformers' Whisper
#: `generate`: the prompt, the logits processors, stopping)
GENERATION_FIELDS = ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "no_timestamps_token_id",
                     "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "lang_to_id", "task_to_id",
                     "is_multilingual", "max_initial_timestamp_index", "max_length", "max_new_tokens",
                     # a fine-tuned checkpoint's saved defaults: generate reads them when none is given
                     "language", "task")


def cross_names(num_layers: int) -> list[str]:
    return [f"cross.{i}.{what}" for i in range(num_layers) for what in ("key", "value")]


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


class CrossKV(torch.nn.Module):
    """encoder_hidden_states -> per decoder layer the cross-attention key and value
    [batch, heads, frames, head_dim], as WhisperAttention projects them (k_proj has no bias)."""

    def __init__(self, decoder):
        super().__init__()
        attn = [layer.encoder_attn for layer in decoder.layers]
        self.keys = torch.nn.ModuleList(a.k_proj for a in attn)
        self.values = torch.nn.ModuleList(a.v_proj for a in attn)
        self.num_heads, self.head_dim = attn[0].num_heads, attn[0].head_dim

    def forward(self, encoder_hidden_states):
        shape = (encoder_hidden_states.shape[0], -1, self.num_heads, self.head_dim)
        out = []
        for k, v in zip(self.keys, self.values):
            out.append(k(encoder_hidden_states).view(shape).transpose(1, 2).contiguous())
            out.append(v(encoder_hidden_states).view(shape).transpose(1, 2).contiguous())
        return tuple(out)


class DecoderWithCache(torch.nn.Module):
    """(input_ids, self-attention past k/v per layer, cross k/v per layer) -> (logits, present
    k/v per layer), through transformers' WhisperDecoder and an EncoderDecoderCache."""

    def __init__(self, model):
        super().__init__()
        from onnxport.hf.compat import cache_kwarg

        self.decoder = model.get_decoder()
        self.proj_out = model.proj_out
        self.num_layers = len(self.decoder.layers)
        self.cache_kwarg = cache_kwarg(self.decoder.forward)

    def forward(self, *tensors):
        # one *args signature: the export driver gives torch.export a forward(*inputs) as one
        # flat argument list
        from transformers.cache_utils import EncoderDecoderCache

        from onnxport.hf.compat import build_dynamic_cache, cache_pairs, output_cache

        input_ids, cache_tensors = tensors[0], tensors[1:]
        n = self.num_layers
        pairs = [(cache_tensors[2 * i], cache_tensors[2 * i + 1]) for i in range(2 * n)]
        cache = EncoderDecoderCache(build_dynamic_cache(pairs[:n]), build_dynamic_cache(pairs[n:]))
        # the cross k/v come from cross_kv.onnx: mark every layer's as computed, so no layer
        # projects encoder states again (transformers does the same after the first step)
        cache.is_updated = {i: True for i in range(n)}
        # a layer runs its cross-attention only when encoder states are given; with the cache
        # marked updated it reads nothing from them, so any tensor stands in for them
        out = self.decoder(input_ids=input_ids, encoder_hidden_states=pairs[n][0], use_cache=True, return_dict=True,
                           **{self.cache_kwarg: cache})
        present = [t for kv in cache_pairs(output_cache(out)) for t in kv]
        return (self.proj_out(out.last_hidden_state), *present)


@register_recipe("whisper", part="decoder")
class WhisperDecoder(EncoderRecipe):
    """The text decoder of a WhisperForConditionalGeneration checkpoint as `cross_kv` and
    `decoder` graphs (the module-part path: the generic causal-LM decoder would need encoder
    states it does not have), plus the speech-to-text pipeline section of the manifest."""

    family = "whisper"
    task = "automatic-speech-recognition"
    model_class = "WhisperForConditionalGeneration"
    #: verification sizes: a prompt without cache (batch 1), one step on a cache (batch 2),
    #: several tokens on a cache (batch 2: the export size, no dim of size 0 or 1)
    decoder_sizes = ({BATCH: 1, SEQ: 4, PAST: 0}, {BATCH: 2, SEQ: 1, PAST: 5}, {BATCH: 2, SEQ: 3, PAST: 4})

    def load_model(self, ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
        from onnxport.errors import UnsupportedModelError

        archs = [str(a) for a in ckpt.config.get("architectures") or []]
        if archs and all(a.endswith("ForCausalLM") for a in archs):
            # a *ForCausalLM checkpoint has no encoder: nothing to chain its decoder with
            raise UnsupportedModelError(f"{archs[0]} checkpoints hold Whisper's decoder without its encoder",
                                        "export a WhisperForConditionalGeneration checkpoint")
        return super().load_model(ckpt, dtype)

    def parts(self, model):
        from onnxport.recipes.parts import ModulePart, TensorSpec

        cfg = model.config
        decoder = model.get_decoder()
        n = len(decoder.layers)
        attn = decoder.layers[0].self_attn
        heads, head_dim = attn.num_heads, attn.head_dim
        frames = cfg.max_source_positions
        past, present = kv_names(n)
        cross = cross_names(n)
        enc = TensorSpec("encoder_hidden_states", "float32", (BATCH, frames, cfg.d_model))
        cross_specs = [TensorSpec(c, "float32", (BATCH, heads, frames, head_dim)) for c in cross]
        ids = TensorSpec("input_ids", "int64", (BATCH, SEQ), low=0, high=cfg.vocab_size)
        past_specs = [TensorSpec(p, "float32", (BATCH, heads, PAST, head_dim)) for p in past]
        reference = WhisperReference(model)

        def cross_case(sizes):
            enc_states = reference.encoder_states(sizes[BATCH], seed=sizes[BATCH])
            return [enc_states], reference.cross_kv(enc_states)

        return [
            ModulePart(CROSS_KV, CrossKV(decoder), [enc], cross, [{BATCH: 1}, {BATCH: 2}],
                       output_dims={c: [BATCH, heads, frames, head_dim] for c in cross}, make_case=cross_case),
            ModulePart(DECODER, DecoderWithCache(model), [ids, *past_specs, *cross_specs], ["logits", *present],
                       [dict(s) for s in self.decoder_sizes],
                       output_dims={"logits": [BATCH, SEQ, cfg.vocab_size],
                                    **{p: [BATCH, heads, TOTAL, head_dim] for p in present}},
                       make_case=reference.decoder_case, role="decoder"),
        ]

    def pipeline(self, model, graphs: list[Graph]) -> Pipeline:
        """The speech-to-text section: the three graphs and what transformers' Whisper
        `generate` reads besides them (the generation config, the model's positions and frames)."""
        from onnxport.bundle import Pipeline

        return Pipeline("speech-to-text", {AUDIO: AUDIO, CROSS_KV: CROSS_KV, DECODER: DECODER},
                        speech_to_text_config(model))


def speech_to_text_config(model) -> dict:
    cfg, gen = model.config, model.generation_config
    config = {k: _plain(getattr(gen, k, None)) for k in GENERATION_FIELDS}
    if config["forced_decoder_ids"] is None:
        # transformers' generate falls back to the model config's forced ids (old checkpoints)
        config["forced_decoder_ids"] = _plain(getattr(cfg, "forced_decoder_ids", None))
    # transformers' timestamp processor reads this private flag with a default of True
    config["detect_timestamp_from_logprob"] = bool(getattr(gen, "_detect_timestamp_from_logprob", True))
    config["language_codes"] = _language_codes(config["lang_to_id"])
    encoder = model.get_encoder()
    config.update(
        max_target_positions=cfg.max_target_positions, vocab_size=cfg.vocab_size,
        num_layers=len(model.get_decoder().layers), num_mel_bins=cfg.num_mel_bins,
        # mel frames per 30 s window, and mel frames per encoder frame (generate's seek unit)
        num_frames=2 * cfg.max_source_positions,
        input_stride=int(encoder.conv1.stride[0] * encoder.conv2.stride[0]))
    return {k: v for k, v in config.items() if v is not None}


def _language_codes(lang_to_id: dict | None) -> dict | None:
    """Language name -> code ("english" -> "en") for the languages the model has, so the runtime
    accepts names as transformers' generate does without importing it."""
    if not lang_to_id:
        return None
    try:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE
    except ImportError:  # the table moved: codes and <|xx|> tokens still work
        return None
    return {name: code for name, code in sorted(TO_LANGUAGE_CODE.items()) if f"<|{code}|>" in lang_to_id}


def _plain(value):
    """A JSON value from a generation-config field (tensors and tuples to lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class WhisperReference:
    """Inputs and expected outputs of the decoder graphs from WhisperForConditionalGeneration's
    own forward: the cross k/v it caches, and the logits and cache after a prefix."""

    def __init__(self, model):
        from onnxport.hf.compat import cache_kwarg

        self.model = model
        self.cfg = model.config
        self.cache_kwarg = cache_kwarg(model.forward)

    def encoder_states(self, batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.cfg.max_source_positions, self.cfg.d_model, generator=g)

    def _forward(self, enc_states, ids, cache=None):
        kw = {self.cache_kwarg: cache} if cache is not None else {}
        with torch.no_grad():
            return self.model(encoder_outputs=(enc_states,), decoder_input_ids=ids, use_cache=True, return_dict=True,
                              **kw)

    def cross_kv(self, enc_states) -> list[torch.Tensor]:
        from onnxport.hf.compat import cache_pairs, output_cache

        start = torch.full((enc_states.shape[0], 1), self.cfg.decoder_start_token_id, dtype=torch.long)
        cache = output_cache(self._forward(enc_states, start))
        return [t.clone() for kv in cache_pairs(cache.cross_attention_cache) for t in kv]

    def decoder_case(self, sizes: dict):
        from onnxport.hf.compat import cache_pairs, output_cache

        b, s, p = sizes[BATCH], sizes[SEQ], sizes[PAST]
        g = torch.Generator().manual_seed(100 * b + 10 * s + p)
        enc_states = self.encoder_states(b, seed=1000 + 100 * b + 10 * s + p)
        ids = torch.randint(0, self.cfg.vocab_size, (b, p + s), generator=g)
        cross = self.cross_kv(enc_states)
        if p:
            cache = output_cache(self._forward(enc_states, ids[:, :p]))
            past = [t.clone() for kv in cache_pairs(cache) for t in kv]
            out = self._forward(enc_states, ids[:, p:], cache)
        else:
            heads, head_dim = cross[0].shape[1], cross[0].shape[3]
            past = [torch.zeros(b, heads, 0, head_dim) for _ in cross]
            out = self._forward(enc_states, ids)
        present = [t for kv in cache_pairs(output_cache(out)) for t in kv]
        return [ids[:, p:], *past, *cross], [out.logits, *present]
