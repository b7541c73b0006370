"""Image + audio + text -> text in ONNX Runtime: Qwen2.5-Omni's thinker.

    numpy image processor (runtime/image_processor.py) -> vision graph (Qwen2.5-VL's: windows
      and packed masks computed on the host)
    16 kHz mono audio -> Whisper log-mel (runtime/audio_features.py, padded to the extractor's
      chunk_length as transformers' processor pads it) -> the valid frames of each clip ->
      audio graph (chunks, pooling indices and chunk mask computed on the host: preprocess.py)
    -> image features at the image pad tokens, audio features at the audio pad tokens of the
       embedded prompt (embed_tokens.onnx)
    -> model.onnx with TMRoPE position ids [3, batch, seq] computed on the host (`rope_index`:
       the thinker's get_rope_index in numpy), greedy or sampled decoding.

Prompts are token ids, text with the placeholders (`<|vision_bos|><|IMAGE|><|vision_eos|>` once
per image, `<|audio_bos|><|AUDIO|><|audio_eos|>` once per clip, as Qwen2.5-Omni's processor
expects) or chat messages rendered with the bundle's chat template. Each image's pad token
becomes one per merged patch, each clip's one per pooled audio frame, as transformers' processor
expands them. Everything the runner needs comes from the manifest's `pipeline` section.

Not covered: videos (and audio taken from a video, `use_audio_in_video`). Speech output (an
any-to-any bundle) is runtime/tasks/omni_speech.py. onnxruntime + numpy + Pillow +
tokenizers (+ jinja2 for chats); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxport.errors import RuntimeInputError
from onnxport.runtime.audio_features import WhisperFeatureExtractor, check_audio, read_wav
from onnxport.runtime.tasks import register_task
from onnxport.runtime.tasks.image_text_to_text import expand_placeholders, open_embeds_decoder
from onnxport.runtime.tasks.media import PromptsWithMedia

KIND = "any-to-text"
#: the kinds whose thinker section this runner reads (any-to-any adds speech output to it:
#: runtime/tasks/omni_speech.py)
THINKER_KINDS = (KIND, "any-to-any")


def audio_token_count(frames):
    """Audio tokens of a clip of `frames` mel frames: the encoder's stride-2 conv, then its
    stride-2 pooling (transformers' _get_feat_extract_output_lengths)."""
    return ((np.asarray(frames) - 1) // 2 + 1 - 2) // 2 + 1


def rope_index(input_ids: np.ndarray, mask: np.ndarray, image_grids: list, audio_lengths: list, *,
               image_token_id: int, audio_token_id: int, vision_start_token_id: int, audio_start_token_id: int,
               spatial_merge_size: int, position_id_per_seconds: float = 25) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-Omni thinker's `get_rope_index` in numpy (videos left out): position ids
    [3, batch, seq] and the per-row delta [batch] later positions are shifted by.

    Text, each placeholder's bos / eos and every audio token count up on all three axes; an
    image's merged patches take t / h / w grid coordinates offset by the position reached, and
    the next position is one past their maximum. Images are counted where `vision_start` is
    followed by the image token, clips by their `audio_start` tokens (as transformers does).
    As in transformers, without any image the ids are plain text positions (audio positions
    count up anyway, so they are the same ones)."""
    batch, seq = input_ids.shape
    valid = mask.astype(bool)
    if not len(image_grids):  # transformers' branch without grids
        positions = np.where(valid, np.cumsum(mask, axis=-1) - 1, 1).astype(np.int64)
        deltas = positions.max(axis=-1) + 1 - mask.sum(axis=-1)
        return np.broadcast_to(positions, (3, batch, seq)).copy(), deltas.astype(np.int64)
    positions = np.ones((3, batch, seq), dtype=np.int64)
    deltas = np.zeros(batch, dtype=np.int64)
    merge = spatial_merge_size
    image_idx = audio_idx = 0
    for b in range(batch):
        ids = input_ids[b][valid[b]]
        tokens = ids.tolist()
        starts = np.nonzero(ids[:-1] == vision_start_token_id)[0]
        remain_images = int((ids[starts + 1] == image_token_id).sum())
        remain_audios = int((ids == audio_start_token_id).sum())
        parts: list[np.ndarray] = []
        st = 0
        absent = len(tokens) + 1
        for _ in range(remain_images + remain_audios):
            ed_image = tokens.index(image_token_id, st) if remain_images > 0 and image_token_id in tokens else absent
            ed_audio = tokens.index(audio_token_id, st) if remain_audios > 0 and audio_token_id in tokens else absent
            ed = min(ed_image, ed_audio)
            text_len = ed - st - 1  # the text before the placeholder's bos
            if text_len > 0:
                parts.append(_count_up(parts, text_len))
            parts.append(_count_up(parts, 1))  # the placeholder's bos
            if ed == ed_audio:
                if audio_idx >= len(audio_lengths):
                    raise RuntimeInputError(f"the prompts have more audio placeholders than the {len(audio_lengths)} "
                                            "clip(s) given", "pass one clip per audio placeholder")
                n = int(audio_token_count(audio_lengths[audio_idx]))
                parts.append(_count_up(parts, n))
                audio_idx += 1
                remain_audios -= 1
            else:
                if image_idx >= len(image_grids):
                    raise RuntimeInputError(f"the prompts have more image placeholders than the {len(image_grids)} "
                                            "image(s) given", "pass one image per image placeholder")
                t, h, w = (int(x) for x in image_grids[image_idx])
                gh, gw = h // merge, w // merge
                tt = (np.arange(t) * position_id_per_seconds).astype(np.int64)
                T, H, W = np.meshgrid(tt, np.arange(gh), np.arange(gw), indexing="ij")
                parts.append(np.stack([T.reshape(-1), H.reshape(-1), W.reshape(-1)]) + _next_position(parts))
                n = t * h * w // merge ** 2
                image_idx += 1
                remain_images -= 1
            parts.append(_count_up(parts, 1))  # the placeholder's eos
            st += max(text_len, 0) + 1 + n + 1
        if st < len(tokens):
            parts.append(_count_up(parts, len(tokens) - st))
        llm = np.concatenate(parts, axis=1)
        if llm.shape[1] != len(tokens):
            raise RuntimeInputError(f"row {b} has {len(tokens)} tokens but its placeholders and features give "
                                    f"{llm.shape[1]} positions",
                                    "let the pipeline expand the placeholders (one pad token per image / clip, "
                                    "between its bos and eos tokens)")
        positions[:, b, valid[b]] = llm
        deltas[b] = llm.max() + 1 - len(tokens)
    return positions, deltas


def _next_position(parts: list[np.ndarray]) -> int:
    """One past the largest position so far (get_rope_index's `st_idx`)."""
    return int(parts[-1].max()) + 1 if parts else 0


def _count_up(parts: list[np.ndarray], n: int) -> np.ndarray:
    """n positions counting up from the next one, equal on the three axes."""
    return np.broadcast_to(np.arange(n, dtype=np.int64) + _next_position(parts), (3, n))


def _items(x) -> list:
    """None -> [], a list / tuple -> a list, anything else (one array, path, image) -> [it]."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def as_batch(prompts, images, audio) -> tuple[list, list[list], list[list]]:
    """(prompts, images per prompt, clips per prompt): one prompt (text, token ids or chat
    messages) with its images and clips, or a list of prompts with one list (or one item) of
    each per prompt."""
    single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0 and (
        all(isinstance(t, (int, np.integer)) for t in prompts) or isinstance(prompts[0], dict)))
    if single:
        return [prompts], [_items(images)], [_items(audio)]
    prompts = list(prompts)
    out = []
    for what, given in (("images", images), ("audio clips", audio)):
        per = [[] for _ in prompts] if given is None else [_items(x) for x in given]
        if len(per) != len(prompts):
            raise RuntimeInputError(f"{len(prompts)} prompts but {what} for {len(per)}",
                                    f"pass one list of {what} per prompt")
        out.append(per)
    return prompts, out[0], out[1]


@dataclass
class OmniInputs:
    """A batch after preprocessing: the expanded prompt ids and the encoders' inputs."""

    #: prompt ids per row, each placeholder expanded to its feature count
    rows: list[list[int]]
    #: [num_patches, patch_dim] of every image of the batch, in order, and their (t, h, w) grids
    pixel_values: np.ndarray | None = None
    image_grids: list = field(default_factory=list)
    #: [num_mel_bins, frames] valid log-mel frames of every clip, concatenated, and per-clip frames
    mel: np.ndarray | None = None
    mel_lengths: list = field(default_factory=list)


@register_task(KIND)
class AnyToText(PromptsWithMedia):
    """Generate text from images, audio and text with an onnxport any-to-text bundle
    (Qwen2.5-Omni's thinker).

    >>> pipe = AnyToText("omni/")                                           # doctest: +SKIP
    >>> pipe.generate("<|audio_bos|><|AUDIO|><|audio_eos|>What was said?", audio=["a.wav"]).texts
    """

    takes_audio = True

    def __init__(self, bundle: str | Path, threads: int | None = None):
        from onnxport.runtime.encoder import EncoderRunner
        from onnxport.runtime.image_processor import QwenVLImageProcessor

        self.folder = Path(bundle)
        self.generator, pipeline = open_embeds_decoder(bundle, threads, THINKER_KINDS, "an any-to-text")
        cfg = pipeline.config
        self.config = cfg
        self.vision = EncoderRunner(self.folder, pipeline.graphs.get("vision", "vision"), threads)
        self.audio = EncoderRunner(self.folder, pipeline.graphs.get("audio", "audio"), threads)
        self.processor = QwenVLImageProcessor(cfg.get("image_processor") or {})
        self.features = WhisperFeatureExtractor(cfg.get("feature_extractor") or {})
        self.sampling_rate = self.features.config.sampling_rate
        self.image_token_id = int(cfg["image_token_id"])
        self.audio_token_id = int(cfg["audio_token_id"])
        self.video_token_id = cfg.get("video_token_id")
        self.merge = int(cfg["spatial_merge_size"])

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    # --- prompts --------------------------------------------------------------------------------

    def prompt_ids(self, prompt, chat: bool = False, system: str | None = None, images: int = 0,
                   clips: int = 0) -> list[int]:
        """Token ids of one prompt: ids as given, text tokenized as the processor does, or chat
        messages (a user turn's text, given the placeholders of `images` images and `clips`
        clips before it, or transformers-style messages with {"type": "image"} / {"type":
        "audio"} entries) rendered with the bundle's chat template."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return [int(t) for t in prompt]
        if chat or not isinstance(prompt, str):
            if isinstance(prompt, str):
                content = [*({"type": "image"} for _ in range(images)), *({"type": "audio"} for _ in range(clips)),
                           {"type": "text", "text": prompt}]
                prompt = [{"role": "user", "content": content}]
            return self.generator.chat_ids([list(prompt)], system)[0]
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _expand(self, ids: list[int], grids: list, audio_tokens: list[int]) -> list[int]:
        """Each image pad token -> prod(grid) / merge**2 of them, each audio pad token -> the
        clip's audio token count (the processor's expansion)."""
        if self.video_token_id is not None and int(self.video_token_id) in ids:
            raise RuntimeInputError("the prompt has a video placeholder; this runner takes images and audio",
                                    "pass video frames as images, or use Qwen2.5-VL's image-text-to-text runner")
        return expand_placeholders(ids, [
            (what, token, counts, f"write the {what} placeholder ({self.config.get(what + '_placeholder')}) once per "
                                  f"{what} input (the chat template does it for {{'type': '{what}'}})")
            for what, token, counts in (("image", self.image_token_id,
                                         [int(np.prod(g)) // self.merge ** 2 for g in grids]),
                                        ("audio", self.audio_token_id, list(audio_tokens)))])

    def _clip(self, clip, sampling_rate: int | None, what: str) -> np.ndarray:
        """Mono float32 samples at the extractor's rate from a WAV path or an array (whose rate
        is `sampling_rate`, default the extractor's); never resampled."""
        if isinstance(clip, (str, Path)):
            samples, rate = read_wav(clip)
            what = f"{what} ({Path(clip).name})"
        else:
            samples, rate = clip, self.sampling_rate if sampling_rate is None else int(sampling_rate)
        samples = check_audio(samples, rate, self.sampling_rate, what=what)
        c = self.features.config
        if audio_token_count(min(-(-len(samples) // c.hop_length), c.nb_max_frames)) < 1:
            raise RuntimeInputError(f"{what} has {len(samples)} samples; the audio encoder needs more than "
                                    f"{2 * c.hop_length}", "pass a longer clip")
        return samples

    def prepare(self, prompts, images=None, audio=None, chat: bool = False, system: str | None = None,
                sampling_rate: int | None = None) -> OmniInputs:
        """Preprocess a batch (see `generate`): images -> pixels and grids, clips -> log-mel
        frames, prompts -> ids with the placeholders expanded."""
        prompts, images, audio = as_batch(prompts, images, audio)
        inputs = OmniInputs([])
        pixels, mels = [], []
        n = 0
        for prompt, imgs, clips in zip(prompts, images, audio):
            grids, tokens = [], []
            if imgs:
                out = self.processor(imgs)
                pixels.append(out["pixel_values"])
                grids = [list(map(int, g)) for g in out["image_grid_thw"]]
            if clips:
                samples = [self._clip(c, sampling_rate, f"audio {n + i}") for i, c in enumerate(clips)]
                n += len(clips)
                # padded to chunk_length like transformers' processor: the log-mel's 80 dB floor is
                # taken over the padded window, so the valid frames depend on it
                out = self.features(samples, sampling_rate=self.sampling_rate, return_attention_mask=True)
                lengths = out["attention_mask"].sum(axis=-1).tolist()
                mels += [f[:, :L] for f, L in zip(out["input_features"], lengths)]
                inputs.mel_lengths += lengths
                tokens = audio_token_count(lengths).tolist()
            ids = self.prompt_ids(prompt, chat, system, len(imgs), len(clips))
            inputs.rows.append(self._expand(ids, grids, tokens))
            inputs.image_grids += grids
        inputs.pixel_values = np.concatenate(pixels) if pixels else None
        inputs.mel = np.concatenate(mels, axis=1) if mels else None
        return inputs

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts, images=None, audio=None, max_new_tokens: int = 32, chat: bool = False,
                 system: str | None = None, on_token=None, sampling_rate: int | None = None, **sampling):
        """`prompts`: one prompt or a list (a batch); `images` / `audio`: those of one prompt (a
        list, in placeholder order), or per prompt a list. A clip is a WAV path or a float32
        mono array at `sampling_rate` (default the model's, 16 kHz); other rates are refused,
        not resampled. Clips longer than the extractor's chunk_length (30 s by default) are cut
        to it, as transformers' processor does. Returns the Generator's result."""
        inputs = self.prepare(prompts, images, audio, chat, system, sampling_rate)
        res = self.generator.generate_ids(inputs.rows, max_new_tokens=max_new_tokens, on_token=on_token,
                                          prefill=self.prefill(inputs), **sampling)
        res.texts = [self.tokenizer.decode(t) for t in res.tokens]
        return res

    def prefill(self, inputs: OmniInputs) -> dict:
        """The decoder's first-call inputs for the left-padded batch of `inputs.rows` (as
        Generator.generate_ids pads it): token embeddings with the image and audio features at
        their pad tokens (row-major, as transformers' masked_scatter), TMRoPE positions and
        deltas."""
        gen = self.generator
        rows = inputs.rows
        batch, longest = len(rows), max(len(r) for r in rows)
        ids = np.full((batch, longest), gen.pad_feed, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for r, p in enumerate(rows):
            ids[r, longest - len(p):] = p
            mask[r, longest - len(p):] = 1
        embeds = gen.embed(ids).copy()  # features are written into it
        for what, token, run in (("image", self.image_token_id, self._image_features),
                                 ("audio", self.audio_token_id, self._audio_features)):
            at = (ids == token) & (mask == 1)
            n = int(at.sum())
            if not n:
                continue
            features = run(inputs)
            if features is None or features.shape[0] != n:
                raise RuntimeInputError(f"{n} {what} tokens but {0 if features is None else features.shape[0]} "
                                        f"{what} features", f"pass one {what} input per placeholder")
            embeds[at] = features.astype(embeds.dtype)
        cfg = self.config
        positions, deltas = rope_index(
            ids, mask, inputs.image_grids, inputs.mel_lengths, image_token_id=self.image_token_id,
            audio_token_id=self.audio_token_id, vision_start_token_id=int(cfg["vision_start_token_id"]),
            audio_start_token_id=int(cfg["audio_start_token_id"]), spatial_merge_size=self.merge,
            position_id_per_seconds=cfg.get("position_id_per_seconds") or 25)
        return {"inputs_embeds": embeds, "position_ids": positions, "position_delta": deltas}

    def _image_features(self, inputs: OmniInputs) -> np.ndarray | None:
        if inputs.pixel_values is None:
            return None
        return self.vision(inputs.pixel_values, np.asarray(inputs.image_grids, dtype=np.int64))["image_embeds"]

    def _audio_features(self, inputs: OmniInputs) -> np.ndarray | None:
        if inputs.mel is None:
            return None
        return self.audio(inputs.mel, np.asarray(inputs.mel_lengths, dtype=np.int64))["audio_embeds"]
