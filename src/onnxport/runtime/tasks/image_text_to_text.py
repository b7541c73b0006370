"""Image (and video) + text -> text in ONNX Runtime: Qwen2.5-VL style.

    numpy image processor (runtime/image_processor.py: transformers' Qwen2-VL processor)
      -> vision.onnx (window order and packed masks computed on the host: runtime/preprocess)
      -> image features placed at the image-pad tokens of the embedded prompt (embed_tokens.onnx)
      -> model.onnx with multimodal rotary position ids [3, batch, seq] computed on the host
         (`rope_index`: transformers' get_rope_index in numpy), greedy or sampled decoding.

Prompts are token ids, text with the image placeholder (`<|vision_start|><|image_pad|><|vision_end|>`
once per image, as Qwen2-VL's processor expects) or chat messages rendered with the bundle's chat
template. Each image's single pad token becomes as many as the image has merged patches, as
transformers' processor does. Everything the runner needs comes from the manifest's `pipeline`
section. onnxruntime + numpy + Pillow + tokenizers (+ jinja2 for chats); no torch.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from onnxport.errors import BundleError, RuntimeInputError
from onnxport.runtime.tasks import register_task
from onnxport.runtime.tasks.media import PromptsWithMedia
from onnxport.spec import left_pad

KIND = "image-text-to-text"


def rope_index(input_ids: np.ndarray, mask: np.ndarray, token_types: np.ndarray, image_grids: list,
               video_grids: list, spatial_merge_size: int, tokens_per_second: float = 1.0,
               seconds_per_grid: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' Qwen2.5-VL `get_rope_index` in numpy: position ids [3, batch, seq] (zero
    at padded slots) and the per-row delta [batch] later positions are shifted by. Text tokens
    count up on all three axes; an image's (video's) merged patches take t / h / w grid
    coordinates offset by the position reached, which then advances by max(h, w)."""
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros(batch, dtype=np.int64)
    grids = {1: iter(image_grids), 2: iter(video_grids)}
    seconds = iter(seconds_per_grid if seconds_per_grid is not None else [1.0] * max(seq, 1))
    for b in range(batch):
        valid = mask[b].astype(bool)
        types = token_types[b][valid]
        parts, current = [], 0
        start = 0
        for kind, group in itertools.groupby(types.tolist()):
            n = len(list(group))
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(n, dtype=np.int64) + current, (3, n)))
                current += n
            else:
                t, h, w = (int(x) for x in next(grids[kind]))
                interval = tokens_per_second * next(seconds) if kind == 2 else 1
                gt, gh, gw = t, h // spatial_merge_size, w // spatial_merge_size
                tt = (np.arange(gt) * interval).astype(np.int64)
                T, H, W = np.meshgrid(tt, np.arange(gh) + current, np.arange(gw) + current, indexing="ij")
                pos = np.stack([T.reshape(-1) + current, H.reshape(-1), W.reshape(-1)])
                if pos.shape[1] != n:
                    raise RuntimeInputError(f"row {b} has {n} consecutive placeholder tokens for a "
                                            f"{t}x{h}x{w} grid, which needs {pos.shape[1]}",
                                            "let the pipeline expand the placeholders (one pad token per image)")
                parts.append(pos)
                current += max(h, w) // spatial_merge_size
            start += n
        llm = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
        positions[:, b, valid] = llm
        deltas[b] = (llm.max() + 1 - int(valid.sum())) if llm.size else 0
    return positions, deltas


def as_batch(prompts, images) -> tuple[list, list[list]]:
    """(prompts, images per prompt) as a batch: one prompt (text, token ids or chat messages)
    with its list of images, or a list of prompts with one list (or one image) per prompt."""
    single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                          all(isinstance(t, (int, np.integer)) for t in prompts))
    if single or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts, images = [prompts], [images or []]
    elif images is None:
        images = [[] for _ in prompts]
    if len(images) != len(prompts):
        raise RuntimeInputError(f"{len(prompts)} prompts but images for {len(images)}",
                                "pass one list of images per prompt")
    return list(prompts), [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]


def open_embeds_decoder(bundle: str | Path, threads: int | None, kinds: tuple[str, ...], what: str,
                        positions_3d: bool = True):
    """(Generator, pipeline section) of a bundle whose pipeline is one of `kinds` and whose
    decoder takes inputs_embeds (and, with `positions_3d`, 3-D positions); `what` names the
    bundle in the error ("an image-text")."""
    from onnxport.runtime.generator import Generator

    generator = Generator(Path(bundle), threads)
    pipeline = generator.manifest.pipeline
    if pipeline is None or pipeline.kind not in kinds:
        raise BundleError(f"{bundle} is not {what} bundle (pipeline: {pipeline.kind if pipeline else 'none'})",
                          "use onnxport.Generator for text")
    if generator.embed_session is None or (positions_3d and not generator.position_axes):
        raise BundleError("the bundle's decoder does not take inputs_embeds" + (" and 3-D positions" if positions_3d
                                                                                 else ""),
                          "re-export the checkpoint with onnxport export")
    return generator, pipeline


def expand_placeholders(ids: list[int], inputs: list[tuple[str, int | None, list[int], str]]) -> list[int]:
    """Each placeholder token -> as many copies as its input takes (a processor's expansion).
    `inputs`: (what, placeholder id or None, tokens per input in order, hint) per kind of input;
    placeholders that do not match the inputs one to one are a one-line error."""
    counts = {}
    for what, token, found, hint in inputs:
        count = ids.count(token) if token is not None else 0
        if count != len(found):
            raise RuntimeInputError(f"the prompt has {count} {what} placeholder(s) for {len(found)} {what}(s)", hint)
        if token is not None:
            counts[int(token)] = iter(found)
    out: list[int] = []
    for t in ids:
        it = counts.get(t)
        out += [t] if it is None else [t] * int(next(it))
    return out


@register_task(KIND)
class ImageTextToText(PromptsWithMedia):
    """Generate text from images and text with an onnxport image-text bundle.

    >>> pipe = ImageTextToText("vl/")                                      # doctest: +SKIP
    >>> pipe.generate("Describe <|vision_start|><|image_pad|><|vision_end|>", images=[img]).texts
    """

    def __init__(self, bundle: str | Path, threads: int | None = None):
        from onnxport.runtime.encoder import EncoderRunner
        from onnxport.runtime.image_processor import QwenVLImageProcessor

        self.folder = Path(bundle)
        self.generator, pipeline = open_embeds_decoder(bundle, threads, (KIND,), "an image-text")
        cfg = pipeline.config
        self.config = cfg
        self.vision = EncoderRunner(self.folder, pipeline.graphs.get("vision", "vision"))
        self.processor = QwenVLImageProcessor(cfg.get("image_processor") or {})
        self.image_token_id = int(cfg["image_token_id"])
        self.video_token_id = cfg.get("video_token_id")
        self.merge = int(cfg["spatial_merge_size"])
        self.tokens_per_second = float(cfg.get("tokens_per_second") or 1.0)

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    # --- prompts --------------------------------------------------------------------------------

    def prompt_ids(self, prompt, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of one prompt: ids as given, text tokenized as the processor does, or chat
        messages (a user turn's text, or transformers-style messages with {"type": "image"}
        entries) rendered with the bundle's chat template."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return [int(t) for t in prompt]
        if chat or not isinstance(prompt, str):
            return self.generator.chat_ids([self._messages(prompt)], system)[0]
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _messages(self, prompt) -> list[dict]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return list(prompt)

    def _expand(self, ids: list[int], grids: list, video_grids: list | None = None) -> list[int]:
        """Each image (video) pad token -> prod(grid) / merge**2 of them (the processor's
        expansion)."""
        video = int(self.video_token_id) if self.video_token_id is not None else None
        return expand_placeholders(ids, [
            (what, token, [int(np.prod(g)) // self.merge ** 2 for g in found],
             f"write the {what} placeholder once per {what} (the chat template does it for {{'type': '{what}'}})")
            for what, token, found in (("image", self.image_token_id, grids), ("video", video, video_grids or []))])

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts, images=None, max_new_tokens: int = 32, chat: bool = False, system: str | None = None,
                 on_token=None, videos=None, fps: float = 2.0, **sampling):
        """`prompts`: one prompt or a list (a batch); `images`: the images of one prompt (a list),
        or per prompt a list of images, in placeholder order; `videos` likewise (a video is a
        list of frames or a [T, H, W, C] uint8 array, sampled at `fps` frames per second: its
        temporal positions are spaced by tokens_per_second * temporal_patch_size / fps, as
        transformers' processor sets second_per_grid_ts). Returns the Generator's result."""
        prompts, images = as_batch(prompts, images)
        videos = [[] for _ in prompts] if videos is None else (
            [videos] if len(prompts) == 1 and not (isinstance(videos, list) and videos and isinstance(videos[0], list)
                                                   and videos[0] and isinstance(videos[0][0], list)) else videos)
        if len(videos) != len(prompts):
            raise RuntimeInputError(f"{len(prompts)} prompts but videos for {len(videos)}",
                                    "pass one list of videos per prompt")
        rows, all_grids, pixels, video_grids, video_pixels = [], [], [], [], []
        for prompt, imgs, vids in zip(prompts, images, videos):
            grids, vgrids = [], []
            if imgs:
                out = self.processor(imgs)
                pixels.append(out["pixel_values"])
                grids = [list(map(int, g)) for g in out["image_grid_thw"]]
            if vids:
                out = self.processor.preprocess_videos(list(vids))
                video_pixels.append(out["pixel_values_videos"])
                vgrids = [list(map(int, g)) for g in out["video_grid_thw"]]
            rows.append(self._expand(self.prompt_ids(prompt, chat, system), grids, vgrids))
            all_grids += grids
            video_grids += vgrids
        features = video_features = None
        if pixels:
            features = self.vision(np.concatenate(pixels), np.asarray(all_grids, dtype=np.int64))["image_embeds"]
        if video_pixels:
            video_features = self.vision(np.concatenate(video_pixels),
                                         np.asarray(video_grids, dtype=np.int64))["image_embeds"]
        temporal = int((self.config.get("image_processor") or {}).get("temporal_patch_size", 2))
        prefill = self.prefill(rows, features, all_grids, video_features, video_grids,
                               [temporal / fps] * len(video_grids))
        res = self.generator.generate_ids(rows, max_new_tokens=max_new_tokens, on_token=on_token, prefill=prefill,
                                          **sampling)
        res.texts = [self.tokenizer.decode(t) for t in res.tokens]
        return res

    def prefill(self, rows: list[list[int]], features: np.ndarray | None, grids: list,
                video_features: np.ndarray | None = None, video_grids: list | None = None,
                seconds_per_grid: list | None = None) -> dict:
        """The decoder's first-call inputs for the left-padded batch of `rows` (as
        Generator.generate_ids pads it): token embeddings with the image features at the pad
        tokens (row-major, as transformers' masked_scatter), mrope positions and deltas."""
        gen = self.generator
        ids, mask = left_pad(rows, gen.pad_feed)
        embeds = gen.embed(ids)
        is_image = (ids == self.image_token_id) & (mask == 1)
        n = int(is_image.sum())
        if n:
            if features is None or features.shape[0] != n:
                raise RuntimeInputError(f"{n} image tokens but {0 if features is None else features.shape[0]} "
                                        "image features", "pass one image per placeholder")
            embeds = embeds.copy()
            embeds[is_image] = features.astype(embeds.dtype)
        types = np.where(is_image, 1, 0)
        if self.video_token_id is not None:
            is_video = (ids == int(self.video_token_id)) & (mask == 1)
            nv = int(is_video.sum())
            if nv:
                if video_features is None or video_features.shape[0] != nv:
                    raise RuntimeInputError(f"{nv} video tokens but {0 if video_features is None else video_features.shape[0]} "
                                            "video features", "pass one video per placeholder")
                embeds = embeds if n else embeds.copy()
                embeds[is_video] = video_features.astype(embeds.dtype)
            types = np.where(is_video, 2, types)
        positions, deltas = rope_index(ids, mask, types, grids, video_grids or [], self.merge, self.tokens_per_second,
                                       seconds_per_grid)
        return {"inputs_embeds": embeds, "position_ids": positions, "position_delta": deltas}
