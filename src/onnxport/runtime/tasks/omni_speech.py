"""Qwen2.5-Omni's spoken reply in ONNX Runtime (kind `any-to-any`): text + images + audio ->
the thinker's text reply and its speech, as transformers' `Qwen2_5OmniForConditionalGeneration
.generate` makes it, without torch.

    the thinker (runtime/tasks/omni.py: AnyToText), its decoder graph also giving
      `last_hidden_state` at every call
    -> the talker's prompt: the prompt's embeddings (image / audio rows zeroed) + the thinker's
       hidden states, the speaker's text-start token's embedding, the first reply token's
       hidden state + embedding; the codec embeddings of `codec_pad` and `codec_bos` added to
       the last two rows; positions: the thinker's TMRoPE index over prompt + bos + first token
    -> `talker` with a flat KV cache, one codec code per call: repetition penalty over the
       talker's ids (one `codec_mask` per prompt token, pad, bos, the codes so far), `codec_bos`
       suppressed, greedy (or seeded sampling); `codec_pad` / `codec_eos` end it; each next
       input is the code's embedding (`talker_embed`) + the next reply token's hidden state +
       embedding, then the embeddings of text EOS and text pad (pad repeating)
    -> token2wav: the initial noise [1, codes * repeats, mel_dim] (given, or numpy's), Runge-
       Kutta 4 (transformers' RungeKutta4ODESolver) over the fixed time points, each function
       evaluation one call of `dit_step` (guided velocity); then `bigvgan`: mel -> waveform.

The speakers (conditioning vector, reference mel, text-start token) come from the bundle's
speakers.safetensors, read here without torch or pickle. onnxruntime + numpy (+ the thinker's
Pillow / tokenizers / jinja2).

Not covered: batches (one prompt per spoken reply; transformers decodes token2wav row by row
too), streaming, video inputs. Sampled codes use numpy's generator, not torch's, so only
greedy codes compare with transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np

from onnxport.bundle import resolve_inside
from onnxport.errors import BundleError, InputError, RuntimeInputError
from onnxport.runtime.sampling import Sampler
from onnxport.runtime.session import GraphSession
from onnxport.runtime.tasks import register_task
from onnxport.runtime.tasks.omni import AnyToText, rope_index
from onnxport.runtime.tasks.request import OnText, Reply, Request, check_speech_output, refuse
from onnxport.runtime.tasks.text_to_speech import write_wav

KIND = "any-to-any"
#: pipeline roles of the speech graphs
ROLES = ("talker", "talker_embedding", "dit", "vocoder")
#: the initial state of the ODE: an array [mel_frames, mel_dim] or [1, mel_frames, mel_dim], a
#: function of the shape returning one, or a seed for numpy's standard normal
NoiseSource = Union[np.ndarray, Callable[[tuple], np.ndarray], int, None]


@dataclass
class SpokenReply:
    """What `AnyToAny.generate(..., speak=True)` returns."""

    #: the thinker's reply, decoded, and its token ids (EOS included when it stopped there)
    text: str
    tokens: list[int]
    #: the talker's codec codes (its end code not included)
    codes: np.ndarray
    #: float32 mono waveform at `sample_rate`
    samples: np.ndarray
    sample_rate: int
    speaker: str
    #: False: talker_max_new_tokens ended the codes before the talker's end code
    stopped_at_eos: bool
    thinker_seconds: float = 0.0
    talker_seconds: float = 0.0
    token2wav_seconds: float = 0.0

    @property
    def duration(self) -> float:
        return self.samples.size / self.sample_rate


def read_speakers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """speakers.safetensors -> {name: {"cond", "ref_mel", "bos_token"}}, read with numpy."""
    from onnxport.checkpoint import read_safetensors_header

    if not path.is_file():
        raise BundleError(f"the bundle has no {path.name} (its speakers)", "re-export the checkpoint with onnxport export")
    speakers: dict[str, dict[str, np.ndarray]] = {}
    with open(path, "rb") as f:
        for key, info in read_safetensors_header(path).items():
            f.seek(info.offset)
            name, _, field = key.rpartition(".")
            speakers.setdefault(name, {})[field] = np.frombuffer(f.read(info.nbytes), dtype=info.dtype).reshape(info.shape)
    bad = [n for n, s in speakers.items() if not {"cond", "ref_mel", "bos_token"} <= set(s)]
    if bad or not speakers:
        raise BundleError(f"{path.name} has no complete speaker{' ' + repr(bad[0]) if bad else ''}",
                          "re-export the checkpoint with onnxport export")
    return speakers


def time_points(num_steps: int, sway: float | None) -> np.ndarray:
    """token2wav's ODE time points in float32: torch.linspace(0, 1, num_steps) (its two-sided
    formula) swayed by `sway * (cos(pi / 2 * t) - 1 + t)`. The bundle stores transformers' own
    values for the defaults; these are for other settings."""
    n = int(num_steps)
    step = np.float32(1) / np.float32(n - 1)
    t = np.array([np.float32(i) * step if i < n // 2 else np.float32(1) - step * np.float32(n - 1 - i)
                  for i in range(n)], dtype=np.float32)
    if sway is not None:
        t = t + np.float32(sway) * (np.cos(np.float32(np.pi / 2) * t) - np.float32(1) + t)
    return t.astype(np.float32)


@register_task(KIND)
class AnyToAny(AnyToText):
    """Text, or text and speech, from images, audio and text with an onnxport any-to-any bundle
    (Qwen2.5-Omni with its talker and token2wav).

    >>> omni = AnyToAny("omni/")                                            # doctest: +SKIP
    >>> reply = omni.generate("Say hello.", chat=True, speak=True)           # doctest: +SKIP
    >>> reply.text, reply.samples, reply.sample_rate                        # doctest: +SKIP
    """

    def __init__(self, bundle: str | Path, threads: int | None = None):
        super().__init__(bundle, threads)
        manifest = self.generator.manifest
        pipeline = manifest.pipeline
        if pipeline.kind != KIND or "speech" not in self.config:
            raise BundleError(f"{bundle} has no speech output (pipeline: {pipeline.kind})",
                              "export a Qwen2.5-Omni checkpoint with its talker and token2wav (every part)")
        by_name = {g.name: g for g in manifest.named_graphs()}
        missing = [r for r in ROLES if pipeline.graphs.get(r) not in by_name]
        if missing:
            raise BundleError(f"the {KIND} pipeline names no graph for {', '.join(missing)}",
                              "re-export the bundle with onnxport export")
        if "last_hidden_state" not in self.generator.session.output_names:
            raise BundleError("the thinker's decoder graph has no last_hidden_state output, which the talker reads",
                              "re-export the checkpoint with onnxport export")
        self.sessions = {r: GraphSession(self.folder, by_name[pipeline.graphs[r]], threads) for r in ROLES}
        talker = self.sessions["talker"]
        self.past_names = [n for n in talker.inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        speech = self.config["speech"]
        self.talker_config, self.token2wav_config = speech["talker"], speech["token2wav"]
        # a name from the manifest: kept inside the bundle before anything is opened
        self.speakers = read_speakers(resolve_inside(self.folder, str(speech["speakers"]["file"])))
        self.default_speaker = speech["speakers"].get("default") or next(iter(self.speakers))
        self.sample_rate = int(self.token2wav_config["sample_rate"])

    # --- the task contract ------------------------------------------------------------------------

    def run(self, request: Request, on_text: OnText | None = None) -> Reply:
        """Text like AnyToText; with `request.speak` the reply to one prompt is also spoken into
        that WAV file; with `request.text` (onnxport speak) the reply to that user turn is
        spoken (thinker greedy; `sampling.seed` samples the talker)."""
        if request.speak is None:
            return super().run(request, on_text)
        check_speech_output(request)
        refuse(request, self.kind, speech_options=True)
        from onnxport.runtime.image_processor import load_image

        if request.text is not None:
            refuse(request, self.kind, images=True, audio=True, prompts=True)
            seed = request.sampling.seed
            reply = self.generate(request.text, chat=True, max_new_tokens=request.sampling.text()["max_new_tokens"],
                                  speak=True, speaker=request.speaker, talker_max_new_tokens=request.max_frames,
                                  talker_do_sample=seed is not None, talker_seed=seed, noise=seed)
        else:
            request.needs_prompt()
            if request.messages is None and len(request.prompts) != 1:
                raise InputError(f"--speak speaks one reply, got {len(request.prompts)} prompts", "pass one -p")
            prompt = request.messages if request.messages is not None else request.prompts[0]
            reply = self.generate(prompt, images=[load_image(p) for p in request.images], audio=list(request.audio),
                                  chat=request.wants_chat, system=request.system, speak=True, speaker=request.speaker,
                                  **request.sampling.text())
        write_wav(request.speak, reply.samples, reply.sample_rate, overwrite=request.overwrite)
        end = "" if reply.stopped_at_eos or request.text is None else \
            " (stopped at --max-frames, before the talker's end)"
        wrote = (f"wrote {request.speak}: {reply.duration:.2f} s at {reply.sample_rate} Hz, {len(reply.codes)} codec "
                 f"codes{end}; thinker {1000 * reply.thinker_seconds:.0f} ms, talker {1000 * reply.talker_seconds:.0f} ms, "
                 f"token2wav {1000 * reply.token2wav_seconds:.0f} ms")
        if request.text is not None:  # onnxport speak: both lines are the command's output
            return Reply([reply.text, wrote], files=[request.speak])
        return Reply([reply.text], wrote, files=[request.speak])

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts, images=None, audio=None, max_new_tokens: int = 32, chat: bool = False,
                 system: str | None = None, on_token=None, sampling_rate: int | None = None, speak: bool = False,
                 speaker: str | None = None, talker_max_new_tokens: int | None = None,
                 talker_min_new_tokens: int = 0, talker_do_sample: bool = False, talker_seed: int | None = None, noise: NoiseSource = None,
                 **sampling):
        """Without `speak`: AnyToText.generate (text for a batch of prompts). With `speak`: one
        prompt's reply, spoken by `speaker` (default: the bundle's), as a SpokenReply. The
        talker is greedy unless `talker_do_sample` (then the checkpoint's temperature / top-k /
        top-p, seeded by `talker_seed`); `talker_max_new_tokens` caps the codes (default
        transformers' 4096, within the talker's positions), `talker_min_new_tokens` holds its
        end codes back until that many (transformers' min_new_tokens); `noise`: token2wav's initial state
        (see NoiseSource; default seed 0). `sampling` (do_sample, temperature, ...,
        eos_token_id) is the thinker's, as for AnyToText."""
        if not speak:
            return super().generate(prompts, images, audio, max_new_tokens, chat, system, on_token, sampling_rate,
                                    **sampling)
        name, voice = self.speaker(speaker)
        t0 = time.perf_counter()
        inputs = self.prepare(prompts, images, audio, chat, system, sampling_rate)
        if len(inputs.rows) != 1:
            raise RuntimeInputError(f"speech output takes one prompt at a time, got {len(inputs.rows)}",
                                    "call generate(..., speak=True) once per prompt")
        prefill = self.prefill(inputs)
        hidden: list[np.ndarray] = []
        res = self.generator.generate_ids(
            inputs.rows, max_new_tokens=max_new_tokens, on_token=on_token, prefill=prefill,
            on_outputs=lambda step, outs: hidden.append(outs["last_hidden_state"][0]), **sampling)
        tokens = res.tokens[0]
        t1 = time.perf_counter()
        embeds, stream, positions, delta = self.talker_prompt(inputs, prefill, hidden, tokens, voice)
        codes, stopped = self.talk(embeds, stream, positions, delta, talker_max_new_tokens,
                                   Sampler(talker_do_sample, **self._talker_sampling(), seed=talker_seed),
                                   min_new_tokens=talker_min_new_tokens)
        t2 = time.perf_counter()
        samples = self.token2wav(codes, name, noise)
        return SpokenReply(self.tokenizer.decode(tokens), tokens, codes, samples, self.sample_rate, name, stopped,
                           round(t1 - t0, 4), round(t2 - t1, 4), round(time.perf_counter() - t2, 4))

    def speaker(self, name: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
        name = self.default_speaker if name is None else name
        if name not in self.speakers:
            raise RuntimeInputError(f"no speaker {name!r} in the bundle", f"its speakers: {', '.join(self.speakers)}")
        return name, self.speakers[name]

    def _talker_sampling(self) -> dict:
        s = self.talker_config.get("sampling") or {}
        return {"temperature": s.get("temperature", 1.0), "top_k": s.get("top_k", 0), "top_p": s.get("top_p", 1.0)}

    def _run(self, role: str, feeds: dict, check: bool = False) -> dict:
        return self.sessions[role].run(feeds, check=check)

    def codec_embed(self, codes) -> np.ndarray:
        """Codec ids -> the talker's input embeddings [n, width] (`talker_embed`)."""
        ids = np.asarray([list(codes)], dtype=np.int64)
        return self._run("talker_embedding", {"codec_ids": ids})["inputs_embeds"][0]

    def talker_prompt(self, inputs, prefill: dict, hidden: list[np.ndarray], tokens: list[int],
                      voice: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(prefix embeddings [1, prompt + 2, width], the reply stream [rows, width] added to the
        codec embedding of each later step, position ids [3, 1, prompt + 2], rope delta), as
        transformers' generate builds them from the thinker's outputs. `hidden`: the thinker's
        last_hidden_state per decoder call ([prompt, width], then [1, width] per token)."""
        c = self.talker_config
        rows = inputs.rows[0]
        if len(tokens) < 2:
            raise RuntimeInputError(f"the thinker's reply has {len(tokens)} token; the talker reads the hidden states "
                                    "of two or more", "raise max_new_tokens, or let the reply run past its first token")
        n = len(tokens)
        bos = int(np.asarray(voice["bos_token"]).reshape(-1)[0])
        # the prompt's token embeddings with the image / audio features zeroed (the talker sees
        # those rows through the thinker's hidden states only)
        prompt = prefill["inputs_embeds"][0].astype(np.float32, copy=True)
        prompt[np.isin(np.asarray(rows), [self.image_token_id, self.audio_token_id])] = 0
        text = self.generator.embed(np.asarray([[*tokens[:n - 1], bos, int(c["text_eos_token_id"]),
                                                 int(c["text_pad_token_id"])]], dtype=np.int64))[0]
        reply = np.concatenate(hidden[1:n]) + text[:n - 1]  # token k's hidden state + its embedding
        embeds = np.concatenate([hidden[0] + prompt, text[n - 1:n], reply[:1]])
        codec = self.codec_embed([int(c["codec_pad_token_id"]), int(c["codec_bos_token_id"])])
        embeds[-2] += codec[0]
        embeds[-1] += codec[1]
        stream = np.concatenate([reply[1:], text[n:]])
        ids = np.asarray([[*rows, bos, tokens[0]]], dtype=np.int64)
        positions, deltas = rope_index(
            ids, np.ones_like(ids), inputs.image_grids, inputs.mel_lengths, image_token_id=int(c["image_token_id"]),
            audio_token_id=int(c["audio_token_id"]), vision_start_token_id=int(c["vision_start_token_id"]),
            audio_start_token_id=int(c["audio_start_token_id"]), spatial_merge_size=int(c["spatial_merge_size"]),
            position_id_per_seconds=c.get("position_id_per_seconds") or 25)
        return embeds[None], stream, positions, int(deltas[0])

    def talk(self, embeds: np.ndarray, stream: np.ndarray, positions: np.ndarray, delta: int,
             max_new_tokens: int | None = None, sampler: Sampler | None = None,
             min_new_tokens: int = 0) -> tuple[np.ndarray, bool]:
        """(codec codes [n], stopped at an end code): the talker's generate loop on the prefix
        `embeds` [1, prefix, width] (see `talker_prompt`); no end code before `min_new_tokens`
        codes."""
        c = self.talker_config
        sampler = sampler or Sampler()
        prefix = embeds.shape[1]
        left = int(c["max_positions"]) - prefix
        limit = int(c.get("max_new_tokens") or 4096) if max_new_tokens is None else int(max_new_tokens)
        if limit < 1:
            raise RuntimeInputError(f"talker_max_new_tokens must be >= 1, got {limit}", "ask for one code or more")
        limit = min(limit, left)
        if limit < 1:
            raise RuntimeInputError(f"the talker's prompt takes {prefix} of its {c['max_positions']} positions",
                                    "shorten the prompt")
        eos = {int(t) for t in c["eos_token_id"]}
        suppress = [int(t) for t in c.get("suppress_tokens") or []]
        penalty = float(c.get("repetition_penalty") or 1.0)
        # the talker's input ids, which the repetition penalty reads (each id once): a mask code
        # per prompt token, pad, bos, then the codes
        seen = {int(c["codec_mask_token_id"]), int(c["codec_pad_token_id"]), int(c["codec_bos_token_id"])}
        dims = {n: self.sessions["talker"].inputs[n].dims for n in self.past_names}
        past = {n: np.zeros([1 if d == "batch_size" else (0 if isinstance(d, str) else d) for d in dims[n]],
                            dtype=np.float32) for n in self.past_names}
        mask = np.ones((1, prefix), dtype=np.int64)
        codes: list[int] = []
        stopped = False
        for step in range(limit):
            outs = self._run("talker", {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask,
                                        "position_ids": positions, **past}, check=step == 0)
            logits = outs["logits"][0, -1].astype(np.float32, copy=True)
            if penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
                ids = np.fromiter(seen, dtype=np.int64)
                score = logits[ids]
                logits[ids] = np.where(score < 0, score * np.float32(penalty), score / np.float32(penalty))
            logits[suppress] = -np.inf
            if len(codes) < min_new_tokens:  # transformers' MinNewTokensLengthLogitsProcessor
                logits[sorted(eos)] = -np.inf
            code = int(sampler(logits[None])[0])
            seen.add(code)
            if code in eos:
                stopped = True
                break
            codes.append(code)
            past = {p: outs[q] for p, q in zip(self.past_names, self.present_names)}
            embeds = (self.codec_embed([code])[0] + stream[0])[None, None]
            if len(stream) > 1:
                stream = stream[1:]
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            positions = np.full((3, 1, 1), mask.shape[1] - 1 + delta, dtype=np.int64)
        return np.asarray(codes, dtype=np.int64), stopped

    # --- token2wav ----------------------------------------------------------------------------------

    def token2wav(self, codes, speaker: str | None = None, noise: NoiseSource = None, num_steps: int | None = None,
                  guidance_scale: float | None = None, sway_coefficient: float | None = None) -> np.ndarray:
        """Codec codes [n] -> float32 waveform at `sample_rate`: the DiT's ODE from `noise` (see
        NoiseSource) with Runge-Kutta 4 over the time points, then BigVGAN. Defaults:
        transformers' (10 steps, guidance 0.5, sway -1)."""
        w = self.token2wav_config
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size == 0:
            return np.zeros(0, dtype=np.float32)
        if codes.min() < 0 or codes.max() > int(w["num_embeds"]):
            bad = int(codes.max() if codes.max() > int(w["num_embeds"]) else codes.min())
            raise RuntimeInputError(f"codec code {bad} is outside token2wav's codebook [0, {w['num_embeds']}]",
                                    "pass the codes the talker generated (its end code excluded)")
        frames = codes.size * int(w["repeats"])
        if frames > int(w["max_mel_frames"]):
            raise RuntimeInputError(f"{codes.size} codes make {frames} mel frames; token2wav takes at most "
                                    f"{w['max_mel_frames']}", "speak a shorter reply")
        _, voice = self.speaker(speaker)
        x = self._noise(noise, (1, frames, int(w["mel_dim"])))
        steps = int(w["num_steps"] if num_steps is None else num_steps)
        sway = w["sway_coefficient"] if sway_coefficient is None else sway_coefficient
        if steps < 2:
            raise RuntimeInputError(f"num_steps must be >= 2, got {steps}", "token2wav's default is 10")
        stored = w.get("time_points")
        times = (np.asarray(stored, dtype=np.float32) if stored is not None and num_steps is None
                 and sway_coefficient is None else time_points(steps, sway))
        fixed = {"quantized_code": codes[None], "speaker_embedding": voice["cond"].reshape(1, -1).astype(np.float32),
                 "reference_mel": voice["ref_mel"][None].astype(np.float32),
                 "guidance_scale": np.asarray(w["guidance_scale"] if guidance_scale is None else guidance_scale,
                                              dtype=np.float32)}
        calls = [0]

        def velocity(t, state):
            calls[0] += 1
            return self._run("dit", {"hidden_states": state, "time_step": np.asarray([t], dtype=np.float32), **fixed},
                             check=calls[0] == 1)["velocity"]

        # transformers' RungeKutta4ODESolver (the 3/8 rule), every product in float32 as torch
        # computes it on float32 tensors
        third, two_thirds = np.float32(1 / 3), np.float32(2 / 3)
        for start, end in zip(times[:-1], times[1:]):
            dt = np.float32(end - start)
            k1 = velocity(start, x)
            k2 = velocity(start + dt * third, x + dt * k1 * third)
            k3 = velocity(start + dt * two_thirds, x + dt * (k2 - k1 * third))
            k4 = velocity(end, x + dt * (k1 - k2 + k3))
            x = x + (k1 + 3 * (k2 + k3) + k4) * dt / 8
        mel = np.ascontiguousarray(x.transpose(0, 2, 1))
        return self._run("vocoder", {"mel": mel}, check=True)["waveform"][0].astype(np.float32)

    @staticmethod
    def _noise(noise: NoiseSource, shape: tuple) -> np.ndarray:
        if noise is None or isinstance(noise, (int, np.integer)):
            return np.random.default_rng(0 if noise is None else int(noise)).standard_normal(shape, dtype=np.float32)
        x = noise(shape) if callable(noise) else noise
        x = np.asarray(x, dtype=np.float32)
        if x.shape == shape[1:]:
            x = x[None]
        if x.shape != shape:
            raise RuntimeInputError(f"the noise has shape {list(x.shape)}; token2wav starts from {list(shape)}",
                                    "pass [codes * repeats, mel_dim] values, a function of the shape, or a seed")
        return np.ascontiguousarray(x)


__all__ = ["AnyToAny", "SpokenReply", "read_speakers", "time_points"]
