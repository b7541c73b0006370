"""Text to speech with ONNX Runtime: a ChatTTS / MiniCPM-o TTS bundle, without torch.

text -> `text_template` -> token ids (the bundle's tokenizer) + audio_bos
  -> prefix embeddings: `condition` (speaker embedding or LLM hidden states, projected) first,
     then `embed_text` of the prompt
  -> `talker` with a flat KV cache, one code frame per step: `code_heads` on the last hidden state
     give num_vq logit rows; greedy (or seeded sampling) per codebook; EOS is masked for the
     first `min_new_token` frames; a frame in which any codebook picks the audio EOS ends the
     utterance and is dropped (ChatTTS' rule); `embed_codes` of the frame is the next input
  -> `dvae_decoder` (codes [1, num_vq, frames] -> mel) -> `vocoder` (mel -> float32 waveform).

Everything comes from the manifest's `text-to-speech` pipeline section. onnxruntime + numpy +
tokenizers; `write_wav` writes 16-bit PCM with the stdlib `wave` module.

Not implemented: ChatTTS' repetition penalty and its top-p-before-top-k order (sampling here is
transformers' order: temperature, top-k, top-p), MiniCPM-o's streaming text chunks (the whole
text is in the prefix before the first frame), batches of texts.
"""

from __future__ import annotations

import os
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from onnxport.bundle import Manifest, read_manifest
from onnxport.errors import BundleError, InputError, RuntimeInputError
from onnxport.runtime.sampling import Sampler
from onnxport.runtime.session import GraphSession
from onnxport.runtime.tasks import register_task
from onnxport.runtime.tasks.request import OnText, Reply, Request, check_speech_output, refuse

KIND = "text-to-speech"
ROLES = ("condition", "embed_text", "embed_codes", "talker", "code_heads", "dvae_decoder", "vocoder")

#: called with (frame index, codes of the frame [num_vq]) as each frame is generated
FrameCallback = Callable[[int, np.ndarray], None]


@dataclass
class Speech:
    """What `TextToSpeech.generate` returns."""

    #: float32 mono waveform
    samples: np.ndarray
    sample_rate: int
    #: the audio codes [frames, num_vq] (EOS frame not included)
    codes: np.ndarray
    #: the talker's text prompt (template + audio_bos)
    prompt_ids: list[int]
    #: False: max_frames ended the utterance before the model's EOS
    stopped_at_eos: bool
    talker_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def duration(self) -> float:
        return self.samples.size / self.sample_rate


@register_task(KIND)
class TextToSpeech:
    """Speak text with a bundle holding a text-to-speech pipeline section.

        tts = TextToSpeech("tts-bundle")
        speech = tts.generate("Hello there.")
        write_wav("hello.wav", speech.samples, speech.sample_rate)

    `manifest`: read from the bundle unless given (the export's end-to-end check runs the
    bundle before its manifest is written)."""

    kind = KIND

    def __init__(self, bundle: str | Path, threads: int | None = None, manifest: Manifest | None = None):
        self.folder = Path(bundle)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        pipe = self.manifest.pipeline
        if pipe is None or pipe.kind != KIND:
            raise BundleError(f"{bundle} has no {KIND} pipeline"
                              + (f" (its pipeline is {pipe.kind})" if pipe is not None else " (it has none)"),
                              "export a TTS checkpoint (model_type chattts) with onnxport export, every part")
        by_name = {g.name: g for g in self.manifest.named_graphs()}
        missing = [r for r in ROLES if pipe.graphs.get(r) not in by_name]
        if missing:
            raise BundleError(f"the {KIND} pipeline names no graph for {', '.join(missing)}",
                              "re-export the bundle with onnxport export")
        self.sessions = {r: GraphSession(self.folder, by_name[pipe.graphs[r]], threads) for r in ROLES}
        talker = self.sessions["talker"]
        self.past_names = [n for n in talker.inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        self.past_dims = {n: talker.inputs[n].dims for n in self.past_names}
        c = dict(pipe.config)
        self.config = c
        self.num_vq, self.eos = int(c["num_vq"]), int(c["audio_eos_token_id"])
        self.audio_bos = int(c["audio_bos_token_id"])
        self.sample_rate = int(c["sample_rate"])
        self.max_positions = int(c["max_positions"])
        speaker = c["speaker"]
        self.speaker_dim, self.num_spk_embs = int(speaker["dim"]), int(speaker["num_spk_embs"])
        self.default_speaker = np.asarray(speaker["default"], dtype=np.float32)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from onnxport.runtime.tokenizer import BundleTokenizer

            self._tokenizer = BundleTokenizer(self.folder)
        return self._tokenizer

    # --- inputs -------------------------------------------------------------------------------

    def prompt_ids(self, text: str | Sequence[int]) -> list[int]:
        """The talker's text prompt: `text_template` with the text, tokenized without the
        tokenizer's own special tokens, then audio_bos. Token ids are taken as given (+ audio_bos)."""
        if isinstance(text, str):
            if not text.strip():
                raise RuntimeInputError("the text to speak is empty", 'pass some words, e.g. --text "Hello there."')
            ids = self.tokenizer.encode(self.config["text_template"].replace("{text}", text.strip()),
                                        add_special_tokens=False)
        else:
            ids = [int(t) for t in text]
            if not ids:
                raise RuntimeInputError("the prompt has no token ids", "pass text or a non-empty list of ids")
        bad = [t for t in ids if not 0 <= t < int(self.config["num_text_tokens"])]
        if bad:
            raise RuntimeInputError(f"token id {bad[0]} is outside the talker's text vocabulary "
                                    f"[0, {self.config['num_text_tokens']})", "use the bundle's tokenizer")
        return [*ids, self.audio_bos]

    def speaker(self, spk_emb: np.ndarray | None = None) -> np.ndarray:
        """The conditioning vectors [condition_length, dim]: `spk_emb` ([dim] or [n, dim]: a
        speaker embedding, or the LLM hidden states MiniCPM-o passes), else the default speaker."""
        if spk_emb is None:
            return np.broadcast_to(self.default_speaker, (self.num_spk_embs, self.speaker_dim)).astype(np.float32)
        x = np.asarray(spk_emb, dtype=np.float32)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.speaker_dim or x.shape[0] == 0:
            raise RuntimeInputError(f"the speaker embedding has shape {list(np.shape(spk_emb))}; the talker takes "
                                    f"[n, {self.speaker_dim}]", f"pass one or more vectors of width {self.speaker_dim}")
        return x

    def prefix_length(self, prompt_ids: list[int], spk_emb: np.ndarray | None = None) -> int:
        return self.speaker(spk_emb).shape[0] + len(prompt_ids)

    # --- generation -----------------------------------------------------------------------------

    def _run(self, role: str, feeds: dict, check: bool = False) -> dict:
        return self.sessions[role].run(feeds, check=check)

    def generate_codes(self, text: str | Sequence[int], spk_emb: np.ndarray | None = None,
                       max_frames: int | None = None, min_frames: int | None = None, do_sample: bool = False,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, on_frame: FrameCallback | None = None
                       ) -> tuple[np.ndarray, list[int], bool]:
        """(codes [frames, num_vq], prompt ids, stopped at EOS) for one text. `max_frames` None:
        the model's max_new_token, cut to the positions the talker has left. Sampling defaults
        to the checkpoint's temperature / top_k / top_p."""
        ids = self.prompt_ids(text)
        speaker = self.speaker(spk_emb)
        prefix = speaker.shape[0] + len(ids)
        left = self.max_positions - prefix
        if left < 1:
            raise RuntimeInputError(f"the prompt takes {prefix} of the talker's {self.max_positions} positions",
                                    "speak a shorter text (split it into sentences)")
        if max_frames is None:
            max_frames = min(int(self.config["max_new_token"]), left)
        elif max_frames < 1:
            raise RuntimeInputError(f"max_frames must be >= 1, got {max_frames}",
                                    f"ask for 1 to {left} frames, or leave it unset (the model's limit)")
        elif max_frames > left:
            raise RuntimeInputError(f"prompt ({prefix} positions) + max_frames ({max_frames}) exceeds the talker's "
                                    f"{self.max_positions} positions", f"ask for at most {left} frames")
        min_frames = int(self.config.get("min_new_token", 0)) if min_frames is None else min_frames
        s = self.config.get("sampling") or {}
        sampler = Sampler(do_sample, s.get("temperature", 1.0) if temperature is None else temperature,
                          s.get("top_k", 0) if top_k is None else top_k, s.get("top_p", 1.0) if top_p is None else top_p,
                          seed)
        cond = self._run("condition", {"spk_emb": speaker[None]}, check=True)["inputs_embeds"]
        text_embeds = self._run("embed_text", {"input_ids": np.asarray([ids], dtype=np.int64)}, check=True)
        embeds = np.concatenate([cond, text_embeds["inputs_embeds"]], axis=1)
        past = {n: np.zeros([1 if d == "batch_size" else (0 if isinstance(d, str) else d) for d in self.past_dims[n]],
                            dtype=np.float32) for n in self.past_names}
        mask = np.ones((1, prefix), dtype=np.int64)
        positions = np.arange(prefix, dtype=np.int64)[None]
        frames: list[np.ndarray] = []
        stopped = False
        for step in range(max_frames):
            outs = self._run("talker", {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                        **past}, check=step == 0)
            logits = self._run("code_heads", {"hidden_states": outs["last_hidden_state"][:, -1:]})["logits"][0, -1]
            if step < min_frames:
                logits = logits.copy()
                logits[:, self.eos] = -np.inf
            frame = sampler(logits)
            if (frame == self.eos).any():
                stopped = True
                break
            frames.append(frame)
            if on_frame is not None:
                on_frame(step, frame)
            past = {p: outs[q] for p, q in zip(self.past_names, self.present_names)}
            embeds = self._run("embed_codes", {"audio_codes": frame[None, None].astype(np.int64)})["inputs_embeds"]
            mask = np.ones((1, prefix + step + 1), dtype=np.int64)
            positions = np.asarray([[prefix + step]], dtype=np.int64)
        codes = np.stack(frames).astype(np.int64) if frames else np.zeros((0, self.num_vq), dtype=np.int64)
        return codes, ids, stopped

    def mel(self, codes: np.ndarray) -> np.ndarray:
        """codes [frames, num_vq] -> mel [num_mels, 2 * frames] (the DVAE decoder)."""
        codes = self._codes(codes)
        return self._run("dvae_decoder", {"audio_codes": np.ascontiguousarray(codes.T[None])}, check=True)["mel"][0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [frames, num_vq] -> float32 waveform (DVAE decoder, then the vocoder)."""
        codes = self._codes(codes)
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        mel = self.mel(codes)
        return self._run("vocoder", {"mel": mel[None]}, check=True)["waveform"][0].astype(np.float32)

    def _codes(self, codes) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.num_vq:
            raise RuntimeInputError(f"audio codes have shape {list(codes.shape)}; expected [frames, {self.num_vq}]",
                                    "pass the codes generate_codes returns")
        if codes.size and (codes.min() < 0 or codes.max() >= self.eos):
            raise RuntimeInputError(f"audio code {int(codes.max() if codes.max() >= self.eos else codes.min())} is "
                                    f"outside the codebook [0, {self.eos})", "the EOS code is not an audio code")
        return codes

    def run(self, request: Request, on_text: OnText | None = None) -> Reply:
        """`onnxport speak`: `request.text` spoken into `request.speak` (greedy codes; sampled with
        the checkpoint's settings when `sampling.seed` is given)."""
        refuse(request, self.kind, images=True, audio=True, prompts=True, speech_options=True)
        if request.text is None or request.speak is None:
            raise InputError("a text-to-speech bundle speaks a text into a WAV file",
                             'use onnxport speak BUNDLE --text "Hello." -o hello.wav')
        check_speech_output(request)
        seed = request.sampling.seed
        speech = self.generate(request.text, max_frames=request.max_frames, do_sample=seed is not None, seed=seed)
        write_wav(request.speak, speech.samples, speech.sample_rate, overwrite=request.overwrite)
        end = "" if speech.stopped_at_eos else " (stopped at --max-frames, before the model's end)"
        return Reply([f"wrote {request.speak}: {speech.duration:.2f} s at {speech.sample_rate} Hz, {len(speech.codes)} "
                      f"code frames{end}; talker {1000 * speech.talker_seconds:.0f} ms, decoder + vocoder "
                      f"{1000 * speech.decode_seconds:.0f} ms"], files=[request.speak])

    def generate(self, text: str | Sequence[int], spk_emb: np.ndarray | None = None, max_frames: int | None = None,
                 do_sample: bool = False, seed: int | None = None, on_frame: FrameCallback | None = None,
                 **sampling) -> Speech:
        """Speak `text`: the audio codes (see `generate_codes`), then the waveform."""
        t0 = time.perf_counter()
        codes, ids, stopped = self.generate_codes(text, spk_emb, max_frames, do_sample=do_sample, seed=seed,
                                                  on_frame=on_frame, **sampling)
        t1 = time.perf_counter()
        samples = self.decode(codes)
        return Speech(samples, self.sample_rate, codes, ids, stopped, round(t1 - t0, 4),
                      round(time.perf_counter() - t1, 4))


def write_wav(path: str | Path, samples: np.ndarray, rate: int, overwrite: bool = True) -> Path:
    """Mono 16-bit PCM WAV (samples clipped to [-1, 1]); written to a new temp file beside
    `path` (a unique name: no file of the user's is touched) and renamed into place, so a
    failure leaves no partial file; an existing file is kept unless `overwrite`."""
    import tempfile

    path = Path(path)
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise RuntimeInputError(f"samples have shape {list(x.shape)}; a mono waveform is 1-D", "pass speech.samples")
    if not overwrite and path.exists():
        raise InputError(f"{path} already exists", "pass --force to replace it, or choose another -o")
    if path.is_dir():
        raise InputError(f"{path} is a folder", "give a file name, e.g. -o speech.wav")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist", "create it, or choose another -o")
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767).astype("<i2")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f, wave.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(rate))
            w.writeframes(pcm.tobytes())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["Speech", "TextToSpeech", "write_wav"]
