"""Speech to text with ONNX Runtime: transformers' Whisper `generate` (greedy), without torch.

audio (16 kHz mono) -> log-mel features (runtime/audio_features.py) -> `audio` graph ->
`cross_kv` graph (once per window) -> `decoder` graph token by token with the self-attention
cache, with what transformers' `WhisperGenerationMixin.generate` does for greedy decoding:

- the prompt `<|startoftranscript|><|lang|><|task|>[<|notimestamps|>]`, built as
  `_retrieve_init_tokens` builds it: the generation config's forced_decoder_ids unless a
  language or task is given; on a multilingual model without a language, the language detected
  from the first step's logits over the language tokens (`detect_language`);
- the logits processors in generate's order: SuppressTokensAtBegin (the first generated
  token), SuppressTokens and, with timestamps, WhisperTimeStampLogitsProcessor (timestamps in
  pairs and never decreasing, the first one capped by max_initial_timestamp_index, a timestamp
  forced when their total probability beats every text token);
- the window loop generate runs even on one 30 s window: when the tokens end in an unfinished
  segment (a pair of timestamp tokens, then more), the window is decoded again from the last
  timestamp; `max_length` and the segment times follow generate's arithmetic.

Not implemented (generate options of other strategies): sampling and temperature fallback,
beam search, prompt_ids / condition_on_prev_tokens, no-speech detection, token-level
timestamps, long-form audio (more than one window: the feature extractor keeps the first
chunk_length seconds, as transformers' does by default).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onnxport.bundle import bundle_file, read_manifest
from onnxport.errors import BundleError, InputError, RuntimeInputError
from onnxport.runtime.audio_features import WhisperFeatureExtractor, check_audio, read_wav
from onnxport.runtime.sampling import log_softmax
from onnxport.runtime.session import GraphSession
from onnxport.runtime.tasks import register_task
from onnxport.runtime.tasks.request import OnText, Reply, Request, refuse

log = logging.getLogger(__name__)

#: seconds per timestamp token and per mel frame (generate's `time_precision` /
#: `time_precision_features` defaults)
TIME_PRECISION = 0.02
TIME_PRECISION_FEATURES = 0.01
TASKS = ("transcribe", "translate")
#: transformers' GenerationConfig default when the generation config sets no max_length
DEFAULT_MAX_LENGTH = 20
NEG_INF = -np.inf


@dataclass
class Transcription:
    """What `SpeechToText.generate` returns, one entry per audio.

    `tokens`: the generated ids as transformers' generate returns them (no prompt, no
    end-of-text; timestamp tokens included when asked for); `texts`: decoded without special
    or timestamp tokens (None when the bundle has no tokenizer.json); `prompts`: the decoder
    prompt of each audio; `segments` (return_timestamps): {start, end, tokens, text} with
    times in seconds, as generate's `return_segments` gives them."""

    tokens: list[list[int]]
    texts: list[str] | None
    prompts: list[list[int]]
    segments: list[list[dict]] | None = None
    #: wall time of the feature extraction + graphs, and generated tokens over all windows
    seconds: float = 0.0
    generated_tokens: int = 0
    languages: list[str | None] = field(default_factory=list)

    @property
    def text(self) -> str | None:
        """The first audio's text."""
        return self.texts[0] if self.texts else None


@register_task("speech-to-text")
class SpeechToText:
    """Whisper-style speech recognition from a bundle with a speech-to-text pipeline section.

        stt = SpeechToText("whisper-bundle")
        print(stt.generate("speech.wav").text)
    """

    kind = "speech-to-text"

    def __init__(self, bundle: str | Path, threads: int | None = None):
        self.folder = Path(bundle)
        self.manifest = read_manifest(self.folder)
        pipe = self.manifest.pipeline
        if pipe is None or pipe.kind != self.kind:
            raise BundleError(f"{bundle} has no {self.kind} pipeline"
                              + (f" (its pipeline is {pipe.kind})" if pipe is not None else ""),
                              "export a Whisper checkpoint (every part) with onnxport export")
        by_name = {g.name: g for g in self.manifest.named_graphs()}
        missing = [role for role in ("audio", "cross_kv", "decoder") if pipe.graphs.get(role) not in by_name]
        if missing:
            raise BundleError(f"the {self.kind} pipeline names no graph for {', '.join(missing)}",
                              "re-export the bundle with onnxport export")
        self.config: dict[str, Any] = dict(pipe.config)
        self.audio = GraphSession(self.folder, by_name[pipe.graphs["audio"]], threads)
        self.cross = GraphSession(self.folder, by_name[pipe.graphs["cross_kv"]], threads)
        self.decoder = GraphSession(self.folder, by_name[pipe.graphs["decoder"]], threads)
        self.past_names = [n for n in self.decoder.inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        dims = self.decoder.inputs[self.past_names[0]].dims
        self.heads, self.head_dim = int(dims[1]), int(dims[3])
        self.features = WhisperFeatureExtractor(self._feature_settings())
        self.tokenizer = None
        if bundle_file(self.folder, "tokenizer.json") is not None:
            from onnxport.runtime.tokenizer import BundleTokenizer

            self.tokenizer = BundleTokenizer(self.folder)
        c = self.config
        eos = c.get("eos_token_id")
        #: end-of-text ids that stop a row; the first also ends the text range for the timestamp rules
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos} - {None}
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.pad = c.get("pad_token_id", self.eos)
        # the first timestamp token; past the vocabulary when the model has none (generate's rule)
        self.timestamp_begin = (c["no_timestamps_token_id"] + 1 if "no_timestamps_token_id" in c
                                else c["vocab_size"] + 1)
        # transformers matches suppressed ids against the vocabulary: ids past it (a config's
        # defaults on a smaller vocabulary) suppress nothing
        self.suppress = [t for t in c.get("suppress_tokens") or [] if 0 <= t < c["vocab_size"]]
        self.begin_suppress = [t for t in c.get("begin_suppress_tokens") or [] if 0 <= t < c["vocab_size"]]

    def _feature_settings(self) -> dict:
        """preprocessor_config.json of the bundle, else Whisper's defaults at the graph's mel
        bins and window; either must give the frames the audio graph takes."""
        c = self.config
        path = bundle_file(self.folder, "preprocessor_config.json")
        if path is not None and path.is_file():
            try:
                settings = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BundleError(f"{path.name} is not valid JSON ({e})", "copy the checkpoint's file again") from None
        else:
            seconds = c["num_frames"] * 160 / 16000  # Whisper's hop length and sampling rate
            if seconds != int(seconds):
                raise BundleError(f"the bundle has no preprocessor_config.json and {c['num_frames']} frames are "
                                  "not whole seconds at Whisper's defaults",
                                  "copy the checkpoint's preprocessor_config.json into the bundle")
            settings = {"feature_size": c["num_mel_bins"], "chunk_length": int(seconds)}
        fe = WhisperFeatureExtractor(settings).config
        if fe.feature_size != c["num_mel_bins"] or fe.nb_max_frames != c["num_frames"]:
            raise BundleError(f"the feature settings give {fe.nb_max_frames} frames of {fe.feature_size} mels; the "
                              f"audio graph takes {c['num_frames']} frames of {c['num_mel_bins']}",
                              "copy the checkpoint's own preprocessor_config.json into the bundle")
        return settings

    @property
    def sampling_rate(self) -> int:
        return self.features.config.sampling_rate

    # --- the task contract ----------------------------------------------------------------------

    def run(self, request: Request, on_text: OnText | None = None) -> Reply:
        """Transcribe (or translate) `request.audio`, one line per clip."""
        if request.prompts or request.messages is not None or request.images:
            raise InputError("give either --audio or a prompt (-p / --messages / --image), not both",
                             "a speech-to-text bundle transcribes audio alone")
        refuse(request, self.kind, speak=True, text=True)
        if not request.audio:
            raise InputError("a speech-to-text bundle transcribes audio; none was given", "pass --audio clip.wav")
        res = self.generate(list(request.audio), max_new_tokens=request.sampling.max_new_tokens,
                            language=request.language, task=request.task)
        lines = [res.texts[i] if res.texts is not None else " ".join(map(str, t)) for i, t in enumerate(res.tokens)]
        return Reply(lines, f"{len(request.audio)} audio, {res.generated_tokens} tokens generated in "
                            f"{1000 * res.seconds:.0f} ms")

    # --- the public call ----------------------------------------------------------------------

    def generate(self, audio: Any, max_new_tokens: int | None = None, language: str | Sequence[str] | None = None,
                 task: str | None = None, return_timestamps: bool = False,
                 sampling_rate: int | None = None) -> Transcription:
        """Transcribe (or translate) one audio or a list of them: float32 mono samples at the
        model's rate (16 kHz; `sampling_rate` says otherwise and is refused when it differs),
        or WAV file paths.

        `language` ('en', 'english' or '<|en|>'; one per audio in a list) and `task`
        (transcribe | translate) as in transformers; None: the generation config's own
        `language` / `task` when it saved them, else the checkpoint's forced prompt, and the
        language detected when the model is multilingual. `max_new_tokens` None: the
        generation config's max_length rule. Greedy, short-form (one window)."""
        t0 = time.perf_counter()
        language = language if language is not None else self.config.get("language")
        task = task if task is not None else self.config.get("task")
        features = self._features(audio, sampling_rate)
        batch = features.shape[0]
        languages = self._language_tokens(language, batch)
        if task is not None:
            self._check_task(task)
        if return_timestamps and "no_timestamps_token_id" not in self.config:
            raise RuntimeInputError("the model's generation config has no no_timestamps_token_id, which timestamps "
                                    "need", "drop return_timestamps")
        tokens, prompts, segments, generated = self._transcribe(features, languages, task, return_timestamps,
                                                                max_new_tokens)
        texts = [self.decode(t) for t in tokens] if self.tokenizer is not None else None
        if return_timestamps and self.tokenizer is not None:
            for row in segments:
                for s in row:
                    s["text"] = self.decode(s["tokens"])
        lang_ids = {v: k for k, v in (self.config.get("lang_to_id") or {}).items()}
        return Transcription(tokens, texts, prompts, segments if return_timestamps else None,
                             round(time.perf_counter() - t0, 4), generated,
                             [next((lang_ids[t] for t in p if t in lang_ids), None) for p in prompts])

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` without special and timestamp tokens (what transformers'
        `batch_decode(..., skip_special_tokens=True)` shows)."""
        if self.tokenizer is None:
            raise BundleError("the bundle has no tokenizer.json", "copy the checkpoint's tokenizer.json into it")
        return self.tokenizer.decode([t for t in tokens if t < self.timestamp_begin], skip_special_tokens=True)

    # --- inputs -------------------------------------------------------------------------------

    def _features(self, audio: Any, sampling_rate: int | None) -> np.ndarray:
        # a list of numbers is one waveform; a list of arrays or paths is a batch
        batch = isinstance(audio, (list, tuple)) and not (audio and isinstance(audio[0], (int, float, np.number)))
        items = list(audio) if batch else [audio]
        if not items:
            raise RuntimeInputError("no audio given", "pass a float32 array of 16 kHz samples, a WAV path, or a list")
        rows = []
        window = self.features.config.chunk_length
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                samples, rate = read_wav(item)
            else:
                samples, rate = item, sampling_rate or self.sampling_rate
            what = str(item) if isinstance(item, (str, Path)) else f"audio {i}"
            samples = check_audio(samples, rate, self.sampling_rate, what=what)
            if len(samples) > window * rate:
                log.warning("%s is %.1f s; one %d s window is transcribed (long-form is not implemented)",
                            what, len(samples) / rate, window)
            rows.append(self.features(samples, sampling_rate=rate)["input_features"][0])
        return np.stack(rows)

    def _language_tokens(self, language, batch: int) -> list[int] | None:
        """The language token id per audio, checked like transformers' generate; None: not given."""
        c = self.config
        if language is None:
            return None
        if c.get("is_multilingual") is False:
            raise RuntimeInputError("this is an English-only model; it takes no language or task",
                                    "drop language= / task=")
        lang_to_id = c.get("lang_to_id")
        if not lang_to_id:
            raise RuntimeInputError("the model's generation config has no languages (lang_to_id)",
                                    "drop language=")
        names = [language] * batch if isinstance(language, str) else list(language)
        if len(names) != batch:
            raise RuntimeInputError(f"{len(names)} languages for {batch} audios", "give one language, or one per audio")
        codes = c.get("language_codes") or {}
        out = []
        for name in names:
            key = str(name).lower()
            token = key if key in lang_to_id else f"<|{codes.get(key, key)}|>"
            if token not in lang_to_id:
                known = ", ".join(t.strip("<|>") for t in sorted(lang_to_id))
                raise RuntimeInputError(f"language {name!r} is not one of this model's", f"use one of: {known}")
            out.append(int(lang_to_id[token]))
        return out

    def _check_task(self, task: str) -> None:
        c = self.config
        if c.get("is_multilingual") is False:
            raise RuntimeInputError("this is an English-only model; it takes no language or task", "drop task=")
        if task not in TASKS:
            raise RuntimeInputError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
        if not c.get("task_to_id") or task not in c["task_to_id"]:
            raise RuntimeInputError("the model's generation config has no task tokens (task_to_id)", "drop task=")

    # --- generate's window loop ---------------------------------------------------------------

    def _transcribe(self, features: np.ndarray, languages: list[int] | None, task: str | None,
                    timestamps: bool, max_new_tokens: int | None):
        c = self.config
        batch, _, total = features.shape
        window, stride = int(c["num_frames"]), int(c["input_stride"])
        seek = np.zeros(batch, dtype=np.int64)
        max_frames = np.full(batch, total, dtype=np.int64)
        segments: list[list[dict]] = [[] for _ in range(batch)]
        prompts: np.ndarray | None = None
        max_length = c.get("max_length", DEFAULT_MAX_LENGTH)
        max_new_tokens = max_new_tokens if max_new_tokens is not None else c.get("max_new_tokens")
        generated = 0
        while (seek < max_frames).any():
            rows = [i for i in range(batch) if seek[i] < max_frames[i]]
            time_offset = seek.astype(np.float64) * TIME_PRECISION / stride
            seek_frames = np.minimum(max_frames - seek, window)
            segment = np.zeros((len(rows), features.shape[1], window), dtype=np.float32)
            for j, i in enumerate(rows):
                segment[j, :, : seek_frames[i]] = features[i, :, seek[i]: seek[i] + seek_frames[i]]
            cross = self._cross_kv(segment)
            if prompts is None:  # every row is active in the first window
                prompts = self._prompts(cross, languages, task, timestamps)
            prompt = prompts[rows]
            limit, max_length = self._new_token_limit(prompt.shape[1], max_new_tokens, max_length)
            out = self._greedy(cross, prompt, limit, timestamps)
            generated += sum(len(r) for r in out)
            for j, i in enumerate(rows):
                segs, offset = self._segments(self._strip(out[j]), float(time_offset[i]), int(seek_frames[i]), stride)
                if offset <= 0:
                    # a window ending on <|0.00|> would be decoded again forever (transformers
                    # loops there); nothing more comes from this audio
                    offset = int(max_frames[i] - seek[i])
                seek[i] += offset
                segments[i] += segs
        tokens = [[t for s in row for t in s["tokens"]] for row in segments]
        return tokens, prompts.tolist(), segments, generated

    def _new_token_limit(self, prompt_len: int, max_new_tokens: int | None, max_length: int) -> tuple[int, int]:
        """(new tokens this window, max_length for the next window), as generate's
        `_set_max_new_tokens_and_length`: max_new_tokens must fit the positions; without it
        max_length grows by the prompt, capped at max_target_positions, on every window."""
        max_target = int(self.config["max_target_positions"])
        if max_new_tokens is not None:
            if max_new_tokens + prompt_len > max_target:
                raise RuntimeInputError(
                    f"max_new_tokens {max_new_tokens} + the {prompt_len} prompt tokens exceed the model's "
                    f"{max_target} decoder positions", f"use max_new_tokens <= {max_target - prompt_len}")
            if max_new_tokens < 1:
                raise RuntimeInputError(f"max_new_tokens is {max_new_tokens}", "use max_new_tokens >= 1")
            return max_new_tokens, max_length
        max_length = min(max_length + min(max_target // 2 - 1, prompt_len), max_target)
        return max(max_length - prompt_len, 1), max_length

    def _cross_kv(self, features: np.ndarray) -> dict[str, np.ndarray]:
        states = self.audio.run({"input_features": features})
        return self.cross.run({"encoder_hidden_states": next(iter(states.values()))})

    def _step(self, cross: dict, ids: np.ndarray, past: dict) -> dict[str, np.ndarray]:
        return self.decoder.run({"input_ids": ids, **past, **cross})

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32) for n in self.past_names}

    # --- the prompt -----------------------------------------------------------------------------

    def _prompts(self, cross: dict, languages: list[int] | None, task: str | None, timestamps: bool) -> np.ndarray:
        """generate's `_retrieve_init_tokens`, one row per audio."""
        c = self.config
        batch = next(iter(cross.values())).shape[0]
        init = [c["decoder_start_token_id"]]
        forced = c.get("forced_decoder_ids")
        if task is None and languages is None and forced and forced[0][0] == 1:
            position = 1
            while forced and forced[0][0] == position:
                init.append(forced[0][1])
                forced, position = forced[1:], position + 1
            if forced:
                raise BundleError(f"forced_decoder_ids {c['forced_decoder_ids']} do not follow Whisper's prompt "
                                  "pattern (positions 1, 2, ...)", "fix generation_config.json and re-export")
        lang_undefined = len(init) <= 1 or init[1] is None
        given = languages is not None
        if not given and c.get("lang_to_id") and lang_undefined:
            languages = self._detect_language(cross)
        rows = []
        for r in range(batch):
            row = list(init)
            if languages is not None:
                if len(row) > 1:
                    row[1] = languages[r]
                else:
                    row.append(languages[r])
            task_ids = list((c.get("task_to_id") or {}).values())
            if task is not None:
                row.append(c["task_to_id"][task])
            elif given and task_ids and not any(t in row for t in task_ids):
                row.append(c["task_to_id"]["transcribe"])
            nots = c.get("no_timestamps_token_id")
            if not timestamps and nots is not None and row[-1] != nots:
                row.append(nots)
            elif timestamps and row[-1] == nots:
                row = row[:-1]
            rows.append([t for t in row if t is not None])
        return np.asarray(rows, dtype=np.int64)

    def _detect_language(self, cross: dict) -> list[int]:
        """generate's `detect_language`: the start token alone, argmax over the language tokens."""
        c = self.config
        batch = next(iter(cross.values())).shape[0]
        start = np.full((batch, 1), c["decoder_start_token_id"], dtype=np.int64)
        logits = self._step(cross, start, self._empty_past(batch))["logits"][:, -1]
        ids = np.asarray(sorted(c["lang_to_id"].values()))
        return [int(ids[k]) for k in logits[:, ids].argmax(-1)]

    # --- greedy decoding ------------------------------------------------------------------------

    def _greedy(self, cross: dict, prompt: np.ndarray, limit: int, timestamps: bool) -> list[list[int]]:
        """Greedy decoding of `limit` new tokens at most; rows that emitted end-of-text get
        pad tokens afterwards (as transformers' generate)."""
        batch, begin = prompt.shape
        seqs = prompt.copy()
        past = self._empty_past(batch)
        ids = prompt
        finished = np.zeros(batch, dtype=bool)
        for _ in range(limit):
            out = self._step(cross, ids, past)
            scores = self._process(seqs, out["logits"][:, -1].astype(np.float32), begin, timestamps)
            nxt = scores.argmax(-1).astype(np.int64)
            if self.pad is not None:
                nxt = np.where(finished, self.pad, nxt)
            seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
            finished |= np.isin(nxt, list(self.eos_ids))
            if finished.all():
                break
            past = {p: out[q] for p, q in zip(self.past_names, self.present_names)}
            ids = nxt[:, None]
        return seqs[:, begin:].tolist()

    def _process(self, seqs: np.ndarray, scores: np.ndarray, begin: int, timestamps: bool) -> np.ndarray:
        """The logits processors of Whisper's generate, in its order."""
        if self.begin_suppress and seqs.shape[1] == begin:
            scores[:, self.begin_suppress] = NEG_INF
        if self.suppress:
            scores[:, self.suppress] = NEG_INF
        if timestamps:
            scores = self._timestamp_rules(seqs, scores, begin)
        return scores

    def _timestamp_rules(self, seqs: np.ndarray, scores: np.ndarray, begin: int) -> np.ndarray:
        """transformers' WhisperTimeStampLogitsProcessor."""
        c = self.config
        ts0 = self.timestamp_begin
        text_end = self.eos if self.eos is not None else c.get("bos_token_id")
        scores[:, c["no_timestamps_token_id"]] = NEG_INF
        for k, seq in enumerate(seqs[:, begin:].tolist()):
            last_ts = len(seq) >= 1 and seq[-1] >= ts0
            penultimate_ts = len(seq) < 2 or seq[-2] >= ts0
            if last_ts:
                if penultimate_ts:  # a pair just closed: text next
                    scores[k, ts0:] = NEG_INF
                else:  # an opening timestamp: no text until its pair
                    scores[k, :text_end] = NEG_INF
            stamps = [t for t in seq if t >= ts0]
            lowest = ts0
            if stamps:
                lowest = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            scores[k, ts0:lowest] = NEG_INF
        if seqs.shape[1] == begin:
            scores[:, :ts0] = NEG_INF
            if c.get("max_initial_timestamp_index") is not None:
                scores[:, ts0 + c["max_initial_timestamp_index"] + 1:] = NEG_INF
        if c.get("detect_timestamp_from_logprob", True):
            logprobs = log_softmax(scores)
            force = _logsumexp(logprobs[:, ts0:]) > logprobs[:, :ts0].max(-1)
            scores[force, :ts0] = NEG_INF
        return scores

    # --- generate's post-processing -------------------------------------------------------------

    def _strip(self, seq: list[int]) -> list[int]:
        """generate's per-row clean-up: padding removed (all pad ids, as it counts them), then a
        final end-of-text."""
        if seq and self.pad is not None and seq[-1] == self.pad:
            pads = sum(1 for t in seq if t == self.pad) - (1 if self.pad == self.eos else 0)
            if pads:
                seq = seq[:-pads]
        if seq and seq[-1] == self.eos:
            seq = seq[:-1]
        return seq

    def _segments(self, seq: list[int], time_offset: float, seek_frames: int, stride: int
                  ) -> tuple[list[dict], int]:
        """generate's `_retrieve_segment`: the segments between pairs of timestamp tokens and
        how many frames the window consumed (up to the last complete segment)."""
        ts0 = self.timestamp_begin
        is_ts = [t >= ts0 for t in seq]
        single_ending = is_ts[-2:] == [False, True]
        cuts = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
        if not cuts:
            last = int(seek_frames * TIME_PRECISION_FEATURES / TIME_PRECISION)
            stamps = [t for t in seq if t >= ts0]
            if stamps and stamps[-1] != ts0:
                last = stamps[-1] - ts0
            return [{"start": time_offset, "end": time_offset + last * TIME_PRECISION, "tokens": seq}], seek_frames
        if single_ending:
            cuts.append(len(seq))
        else:  # the last pair's second timestamp stays with its segment
            cuts[-1] += 1
        segments, start = [], 0
        for k, cut in enumerate(cuts):
            piece = seq[start:cut]
            end_at = -1 if k < len(cuts) - 1 or single_ending else -2
            segments.append({"start": time_offset + (piece[0] - ts0) * TIME_PRECISION,
                             "end": time_offset + (piece[end_at] - ts0) * TIME_PRECISION, "tokens": piece})
            start = cut
        if single_ending:
            return segments, seek_frames
        # the rest of the window (an unfinished segment) is decoded again from the last timestamp
        return segments, (seq[start - 2] - ts0) * stride


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
