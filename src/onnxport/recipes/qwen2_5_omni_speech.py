"""Qwen2.5-Omni speech output (model_type `qwen2_5_omni`): parts `talker` and `token2wav`.

transformers' `Qwen2_5OmniForConditionalGeneration.generate` speaks the thinker's reply in
three stages; each becomes graphs the torch-free host drives (runtime/tasks/omni_speech.py):

- `talker` (part `talker`): Qwen2.5-Omni's talker on `inputs_embeds` in the thinker's width
  (its `thinker_to_talker_proj` is inside the graph), TMRoPE position ids [3, batch, seq] (the
  talker's positions follow the thinker's prompt: transformers calls the same get_rope_index)
  and a flat KV cache -> codec logits; verified against the talker's own forward on a real
  cache. `talker_embed` maps codec ids to the talker's input embeddings. What the host adds to
  them (the thinker's hidden states + token embeddings of the reply, one per codec step) comes
  from the thinker's decoder graph, which outputs `last_hidden_state` for this.
- `dit_step` (part `token2wav`): one evaluation of the ODE function of token2wav's flow-matching
  DiT: the noisy mel state, the time step, the codec codes, the speaker's conditioning vector
  and reference mel, and the classifier-free guidance scale -> the velocity, guided as
  `DiT.sample`'s `ode_function` guides it. The Runge-Kutta loop over the fixed time points and
  the initial noise are on the host (the noise is an input, so a test can give torch's values).
- `bigvgan` (part `token2wav`): BigVGAN, mel [batch, mel_dim, mel_frames] -> waveform.

Speakers: transformers reads `spk_dict.pt` beside the weights (per speaker: the conditioning
vector `cond`, the reference mel `ref_mel` and the talker's text-start token `bos_token`). It is
a torch pickle: onnxport opens it only with `torch.load(weights_only=True)` (tensors and plain
containers; any other global is refused in one line, nothing runs) and writes the speakers into
the bundle as `speakers.safetensors`, which the runtime reads without pickle or torch.

The token2wav part proposes the `any-to-any` pipeline (the thinker's any-to-text section plus a
`speech` section) and checks it end to end at export: the ONNX pipeline's codec codes against
transformers' generate (greedy thinker and talker), and its waveform against token2wav's from
the same codes and the same noise (SNR)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from onnxport.errors import CheckpointError
from onnxport.recipes import register_recipe
from onnxport.recipes.encoder import EncoderRecipe
from onnxport.recipes.qwen2_5_omni_thinker import (
    OmniCheckpoint,
    OmniThinkerLM,
    any_to_text_pipeline,
)
from onnxport.spec import BATCH, PAST, SEQ, TOTAL, kv_names

if TYPE_CHECKING:
    from onnxport.bundle import Graph, Manifest, Pipeline
    from onnxport.checkpoint import Checkpoint
    from onnxport.recipes.parts import ModulePart

KIND = "any-to-any"
#: graph names, also the pipeline's roles beside the thinker's
TALKER, TALKER_EMBED, DIT_STEP, BIGVGAN = "talker", "talker_embed", "dit_step", "bigvgan"
SPEAKER_PICKLE = "spk_dict.pt"
SPEAKERS_FILE = "speakers.safetensors"
#: token2wav's output rate: Qwen2.5-Omni's model card and processor say 24 kHz; no config holds it
SAMPLE_RATE = 24000
#: the fidelity record's log-mel distance: 1024-point frames, hopped by BigVGAN's samples per mel
#: frame (240 at Qwen2.5-Omni's size)
MEL_N_FFT = 1024
#: transformers' generate defaults (its signature): the talker's repetition penalty and end
#: codes, token2wav's ODE steps, guidance and time-point sway
REPETITION_PENALTY = 1.05
TALKER_MAX_NEW_TOKENS = 4096
NUM_STEPS, GUIDANCE_SCALE, SWAY_COEFFICIENT = 10, 0.5, -1.0
#: the speaker transformers' generate uses by default
DEFAULT_SPEAKER = "Chelsie"
#: the export-time end-to-end check: thinker tokens, most codec codes, the noise seed, the SNR
#: the waveform must reach against PyTorch (fp32 graphs measure far above it)
CHECK_TOKENS, CHECK_CODES, CHECK_SEED, MIN_SNR_DB = 8, 24, 0, 40.0
#: codes the check's talker gives at least (end codes held back, as transformers' min_new_tokens):
#: a waveform to compare on any weights
CHECK_MIN_CODES = 8


# --- speakers -------------------------------------------------------------------------------------

def read_speakers(model: OmniThinkerLM, path: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The speakers of the checkpoint's spk_dict.pt ({name: {"cond": [enc_emb_dim], "ref_mel":
    [frames, mel_dim], "bos_token": int64 []}}), read as a tensors-only pickle and checked
    against the model's sizes; kept on the model (the parts and the pipeline read it)."""
    cached = model.__dict__.get("_onnxport_speakers")
    if cached is not None:
        return cached
    import pickle

    path = Path(path) if path is not None else Path(model.name_or_path or ".") / SPEAKER_PICKLE
    if not path.is_file():
        raise CheckpointError(f"the checkpoint has speech output (talker, token2wav) but no {SPEAKER_PICKLE} "
                              "(its speakers)", f"put Qwen2.5-Omni's {SPEAKER_PICKLE} beside the weights, or export "
                              "the text parts only: --part decoder --part vision --part audio")
    try:
        # weights_only: tensors, numbers, strings and plain containers; any other global is
        # refused by the unpickler before it runs
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if "Unsupported global" in x or "GLOBAL" in x), lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{SPEAKER_PICKLE} is not a tensors-only pickle ({why[:160]})",
                              "onnxport opens it only with torch.load(weights_only=True); re-save it as a dict of "
                              "speaker -> {cond, ref_mel, bos_token} tensors") from None
    dit = model.token2wav.config.dit_config
    vocab = model.thinker.config.get_text_config().vocab_size
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{SPEAKER_PICKLE} holds {type(raw).__name__}, not a dict of speakers",
                              "save {name: {'cond': ..., 'ref_mel': ..., 'bos_token': ...}}")
    speakers = {}
    for name, entry in raw.items():
        where = f"{SPEAKER_PICKLE}: speaker {name!r}"
        if not isinstance(name, str) or not isinstance(entry, dict) or not {"cond", "ref_mel", "bos_token"} <= set(entry):
            raise CheckpointError(f"{where} is not a dict with cond, ref_mel and bos_token",
                                  "re-save the speakers as transformers' Qwen2.5-Omni expects them")
        cond, ref, bos = entry["cond"], entry["ref_mel"], entry["bos_token"]
        bos = int(bos.reshape(-1)[0]) if torch.is_tensor(bos) and bos.numel() == 1 else bos
        ok = (torch.is_tensor(cond) and torch.is_tensor(ref) and isinstance(bos, int)
              and cond.reshape(-1).numel() == dit.enc_emb_dim and ref.dim() in (2, 3) and ref.shape[-1] == dit.mel_dim
              and (ref.dim() == 2 or ref.shape[0] == 1) and 0 <= bos < vocab)
        if not ok:
            raise CheckpointError(f"{where}: expected cond [{dit.enc_emb_dim}], ref_mel [frames, {dit.mel_dim}] and a "
                                  f"bos_token in [0, {vocab})", "the speakers belong to another model size")
        speakers[name] = {"cond": cond.detach().float().reshape(-1).contiguous(),
                          "ref_mel": ref.detach().float().reshape(-1, dit.mel_dim).contiguous(),
                          "bos_token": torch.tensor(bos, dtype=torch.int64)}
    model.__dict__["_onnxport_speakers"] = speakers
    return speakers


def default_speaker(speakers: dict) -> str:
    return DEFAULT_SPEAKER if DEFAULT_SPEAKER in speakers else next(iter(speakers))


# --- graph modules --------------------------------------------------------------------------------

class OmniTalkerWithCache(nn.Module):
    """(inputs_embeds in the thinker's width, attention_mask, position_ids [3, batch, seq], past
    k/v per layer) -> (codec logits, present k/v per layer): the talker's own forward (its
    projection to the talker's width, its model, its codec head) on a DynamicCache. With the
    positions given it computes no rope index and adds no codec embedding itself: the host does
    both, as transformers' generate does before the forward."""

    def __init__(self, talker):
        super().__init__()
        from onnxport.hf.compat import cache_kwarg

        self.talker = talker
        self.num_layers = talker.config.num_hidden_layers
        self.cache_kwarg = cache_kwarg(talker.forward)

    def forward(self, *tensors):
        # one *args signature: the export driver gives torch.export one flat argument list
        from onnxport.hf.compat import build_dynamic_cache, cache_pairs, output_cache

        embeds, mask, positions, past = tensors[0], tensors[1], tensors[2], tensors[3:]
        # the talker's first op is a Linear on this graph input: torch 2.13's linear decomposition
        # then asserts the input's strides at run time (aten.sym_stride, which has no ONNX form);
        # a copy has a layout known at trace time
        embeds = embeds.clone()
        cache = build_dynamic_cache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.talker(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                          return_dict=True, **{self.cache_kwarg: cache})
        return (out.logits, *[t for kv in cache_pairs(output_cache(out)) for t in kv])


class TalkerEmbedding(nn.Module):
    """Codec ids -> the talker's input embeddings (in the thinker's width)."""

    def __init__(self, talker):
        super().__init__()
        self.talker = talker

    def forward(self, codec_ids):
        return self.talker.get_input_embeddings()(codec_ids)


class DiTStep(nn.Module):
    """One evaluation of `Qwen2_5OmniToken2WavDiTModel.sample`'s ODE function: the DiT on the
    conditioned and the unconditioned batch (its `apply_cfg`), guided. `speaker_embedding` is
    the speaker's `cond` vector, repeated over the frames here as `sample` repeats it."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, hidden_states, time_step, quantized_code, speaker_embedding, reference_mel, guidance_scale):
        condition = speaker_embedding.unsqueeze(1).repeat(1, hidden_states.shape[1], 1)
        out = self.dit(hidden_states=hidden_states, speaker_embedding=condition, condition_vector=reference_mel,
                       quantized_code=quantized_code, time_step=time_step, apply_cfg=True)
        # torch.chunk on the dynamic batch becomes SplitToSequence, which onnxscript's constant
        # folding fails on: slices instead
        batch = hidden_states.shape[0]
        guided, null = out[:batch], out[batch:]
        # transformers skips the unconditioned half below a scale of 1e-5; at 0 this is `guided`
        return guided + (guided - null) * guidance_scale


class BigVGANGraph(nn.Module):
    """BigVGAN's forward, its output [batch, samples] (transformers squeezes every size-1 dim)."""

    def __init__(self, bigvgan):
        super().__init__()
        self.bigvgan = bigvgan

    def forward(self, mel):
        return self.bigvgan(mel).reshape(mel.shape[0], -1)


class TalkerReference:
    """Inputs and expected outputs of the talker graph from the talker's own forward: the cache
    after a prefix of random embeddings, then the logits of the next positions. Positions
    differ per TMRoPE axis (as an image's do), so every mrope section is exercised."""

    def __init__(self, talker):
        self.talker = talker
        self.width = talker.config.embedding_size

    def case(self, sizes: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from onnxport.hf.compat import cache_kwarg, cache_pairs, output_cache

        b, s, p = sizes[BATCH], sizes[SEQ], sizes[PAST]
        g = torch.Generator().manual_seed(100 * b + 10 * s + p)
        embeds = torch.randn(b, p + s, self.width, generator=g)
        mask = torch.ones(b, p + s, dtype=torch.long)
        steps = torch.arange(p + s)
        positions = torch.stack([steps, steps // 2, (steps * 3) % 7]).unsqueeze(1).expand(3, b, -1).contiguous()
        kw = cache_kwarg(self.talker.forward)
        with torch.no_grad():
            if p:
                first = self.talker(inputs_embeds=embeds[:, :p], attention_mask=mask[:, :p],
                                    position_ids=positions[:, :, :p], use_cache=True, return_dict=True)
                cache = output_cache(first)
                past = [t.clone() for kv in cache_pairs(cache) for t in kv]
                out = self.talker(inputs_embeds=embeds[:, p:], attention_mask=mask, position_ids=positions[:, :, p:],
                                  use_cache=True, return_dict=True, **{kw: cache})
            else:
                cfg = self.talker.config
                past = [torch.zeros(b, cfg.num_key_value_heads, 0, cfg.head_dim)
                        for _ in range(2 * cfg.num_hidden_layers)]
                out = self.talker(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                                  return_dict=True)
        present = [t for kv in cache_pairs(output_cache(out)) for t in kv]
        return [embeds[:, p:], mask, positions[:, :, p:].contiguous(), *past], [out.logits, *present]


# --- recipes --------------------------------------------------------------------------------------

class _OmniSpeechRecipe(OmniCheckpoint, EncoderRecipe):
    task = "any-to-any"

    @classmethod
    def present_in(cls, config: dict) -> bool:
        # transformers' Qwen2_5OmniConfig: enable_audio_output (default true) decides whether
        # the talker and token2wav are built and their weights read
        return bool(config.get("enable_audio_output", True))

    @staticmethod
    def _speech(model: OmniThinkerLM):
        if not hasattr(model, "talker") or not hasattr(model, "token2wav"):
            raise CheckpointError("this qwen2_5_omni checkpoint has no speech output (enable_audio_output is false: "
                                  "no talker / token2wav weights)",
                                  "export the text parts only: --part decoder --part vision --part audio")
        # fails here, before any speech graph, when the speaker file is missing or unsafe
        read_speakers(model)
        return model.talker, model.token2wav


@register_recipe("qwen2_5_omni", part="talker")
class Qwen25OmniTalker(_OmniSpeechRecipe):
    """The talker decoder (flat KV cache) and its codec embedding."""

    #: verification sizes: a prompt on an empty cache, one code on a cache (batch 2), several
    #: positions on a cache (the export size: no dim of size 0 or 1)
    talker_sizes = ({BATCH: 1, SEQ: 6, PAST: 0}, {BATCH: 2, SEQ: 1, PAST: 5}, {BATCH: 2, SEQ: 3, PAST: 4})

    def parts(self, model: OmniThinkerLM) -> list[ModulePart]:
        from onnxport.hf.compat import require_transformers
        from onnxport.recipes.parts import ModulePart, TensorSpec

        require_transformers(5, "the talker takes precomputed TMRoPE position ids")
        talker, _ = self._speech(model)
        cfg = talker.config
        width, heads, head_dim = cfg.embedding_size, cfg.num_key_value_heads, cfg.head_dim
        past, present = kv_names(cfg.num_hidden_layers)
        reference = TalkerReference(talker)
        return [
            ModulePart(TALKER, OmniTalkerWithCache(talker),
                       [TensorSpec("inputs_embeds", "float32", (BATCH, SEQ, width)),
                        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
                        TensorSpec("position_ids", "int64", (3, BATCH, SEQ)),
                        *[TensorSpec(p, "float32", (BATCH, heads, PAST, head_dim)) for p in past]],
                       ["logits", *present], [dict(s) for s in self.talker_sizes],
                       output_dims={"logits": [BATCH, SEQ, cfg.vocab_size],
                                    **{p: [BATCH, heads, TOTAL, head_dim] for p in present}},
                       make_case=reference.case, role="decoder"),
            ModulePart(TALKER_EMBED, TalkerEmbedding(talker),
                       [TensorSpec("codec_ids", "int64", (BATCH, SEQ), low=0, high=cfg.vocab_size)],
                       ["inputs_embeds"], [{BATCH: 1, SEQ: 1}, {BATCH: 2, SEQ: 4}],
                       output_dims={"inputs_embeds": [BATCH, SEQ, width]}, role="embedding"),
        ]


@register_recipe("qwen2_5_omni", part="token2wav")
class Qwen25OmniToken2Wav(_OmniSpeechRecipe):
    """token2wav: the DiT's ODE function and BigVGAN; writes the speakers, proposes and checks
    the any-to-any pipeline."""

    def parts(self, model: OmniThinkerLM) -> list[ModulePart]:
        from onnxport.recipes.parts import ModulePart, TensorSpec

        _, token2wav = self._speech(model)
        dit, bigvgan = token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model
        d = dit.config
        mels, rep = d.mel_dim, d.repeats
        sizes = [{BATCH: 1, "num_codes": 6, "mel_frames": 6 * rep, "reference_frames": 16},
                 {BATCH: 2, "num_codes": 11, "mel_frames": 11 * rep, "reference_frames": 9}]
        return [
            ModulePart(DIT_STEP, DiTStep(dit),
                       [TensorSpec("hidden_states", "float32", (BATCH, "mel_frames", mels)),
                        TensorSpec("time_step", "float32", (BATCH,)),
                        TensorSpec("quantized_code", "int64", (BATCH, "num_codes"), low=0, high=d.num_embeds),
                        TensorSpec("speaker_embedding", "float32", (BATCH, d.enc_emb_dim)),
                        TensorSpec("reference_mel", "float32", (BATCH, "reference_frames", mels)),
                        TensorSpec("guidance_scale", "float32", ())],
                       ["velocity"], sizes, output_dims={"velocity": [BATCH, "mel_frames", mels]}, role="vocoder",
                       meta={"repeats": rep}),
            ModulePart(BIGVGAN, BigVGANGraph(bigvgan), [TensorSpec("mel", "float32", (BATCH, mels, "mel_frames"))],
                       ["waveform"], [{BATCH: 1, "mel_frames": 12}, {BATCH: 2, "mel_frames": 25}],
                       output_dims={"waveform": [BATCH, "audio_length"]}, role="vocoder",
                       meta={"samples_per_frame": math.prod(bigvgan.config.upsample_rates),
                             "sampling_rate": SAMPLE_RATE}),
        ]

    def write_files(self, model: OmniThinkerLM, ckpt: Checkpoint, folder: Path) -> list[str]:
        """speakers.safetensors: the speakers of spk_dict.pt, tensors only."""
        from safetensors.torch import save_file

        speakers = read_speakers(model, ckpt.path / SPEAKER_PICKLE)
        save_file({f"{name}.{key}": t for name, s in speakers.items() for key, t in s.items()}, folder / SPEAKERS_FILE,
                  metadata={"format": "onnxport qwen2_5_omni speakers", "source": SPEAKER_PICKLE})
        return [SPEAKERS_FILE]

    def pipeline(self, model: OmniThinkerLM, graphs: list[Graph]) -> Pipeline:
        return any_to_any_pipeline(model)

    def verify_pipeline(self, model: OmniThinkerLM, pipeline: Pipeline, folder: Path, manifest: Manifest) -> dict:
        """End to end: a prompt through the ONNX pipeline's thinker, talker and token2wav against
        transformers' generate (greedy), codes equal and the waveform's SNR (same noise)."""
        from onnxport.recipes.qwen2_5_omni_check import check_any_to_any

        return check_any_to_any(model, folder)


def any_to_any_pipeline(model: OmniThinkerLM) -> Pipeline:
    """The thinker's any-to-text section plus what speaking its reply needs: the talker's
    special codes and text tokens, transformers' generate defaults, the ODE settings, the
    speakers file."""
    import hashlib

    from onnxport.bundle import Pipeline

    text = any_to_text_pipeline(model, model.name_or_path)
    t = model.talker.config
    dit = model.token2wav.config.dit_config
    vocoder = model.token2wav.config.bigvgan_config
    speakers = read_speakers(model)
    digest = hashlib.sha256()
    for name, s in speakers.items():
        digest.update(name.encode())
        for key in sorted(s):
            digest.update(s[key].numpy().tobytes())
    speech = {
        "talker": {
            # transformers' generate: the talker's prompt codes are `codec_mask` per prompt token,
            # then `codec_pad` and `codec_bos` (whose embeddings are added to the last two rows)
            "codec_bos_token_id": t.tts_codec_start_token_id, "codec_eos_token_id": t.tts_codec_end_token_id,
            "codec_pad_token_id": t.tts_codec_pad_token_id, "codec_mask_token_id": t.tts_codec_mask_token_id,
            # the thinker's tokens whose embeddings end the reply stream (then pad repeats)
            "text_eos_token_id": t.tts_text_end_token_id, "text_pad_token_id": t.tts_text_pad_token_id,
            "eos_token_id": [t.tts_codec_pad_token_id, t.tts_codec_end_token_id],
            "suppress_tokens": [t.tts_codec_start_token_id],
            "repetition_penalty": REPETITION_PENALTY, "max_new_tokens": TALKER_MAX_NEW_TOKENS,
            "vocab_size": t.vocab_size, "max_positions": t.max_position_embeddings,
            # the talker's positions: get_rope_index over the thinker's prompt + bos + first token,
            # with the talker config's token ids
            "image_token_id": t.image_token_id, "video_token_id": t.video_token_id,
            "audio_token_id": t.audio_token_id, "vision_start_token_id": t.vision_start_token_id,
            "audio_start_token_id": t.audio_start_token_id, "spatial_merge_size": t.spatial_merge_size,
            "position_id_per_seconds": t.position_id_per_seconds,
            "sampling": {"temperature": 0.9, "top_k": 40, "top_p": 0.8},
        },
        "token2wav": {
            "num_steps": NUM_STEPS, "guidance_scale": GUIDANCE_SCALE, "sway_coefficient": SWAY_COEFFICIENT,
            "repeats": dit.repeats, "mel_dim": dit.mel_dim, "num_embeds": dit.num_embeds,
            "max_mel_frames": dit.max_position_embeddings, "samples_per_frame": math.prod(vocoder.upsample_rates),
            "sample_rate": SAMPLE_RATE,
            # DiT.sample's own float32 time points for these settings (torch's linspace and cos),
            # so the host integrates at exactly transformers' times
            "time_points": [float(x) for x in ode_time_points(NUM_STEPS, SWAY_COEFFICIENT)],
        },
        "speakers": {"file": SPEAKERS_FILE, "names": list(speakers), "default": default_speaker(speakers),
                     "sha256": digest.hexdigest()},
    }
    graphs = {**text.graphs, "talker": TALKER, "talker_embedding": TALKER_EMBED, "dit": DIT_STEP, "vocoder": BIGVGAN}
    return Pipeline(KIND, graphs, {**text.config, "speech": speech})


def ode_time_points(num_steps: int, sway: float | None) -> torch.Tensor:
    """`Qwen2_5OmniToken2WavDiTModel.sample`'s time points (its expression, in float32)."""
    t = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    if sway is not None:
        t += sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t
