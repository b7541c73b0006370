"""Qwen2-VL / Qwen2.5-VL image and video preprocessing with numpy and Pillow (no torch).

A re-implementation of transformers' PIL image processor (`Qwen2VLImageProcessorPil` in 5.x,
the slow `Qwen2VLImageProcessor` in 4.x) that gives the same `pixel_values` and
`image_grid_thw`: convert to RGB, `smart_resize` to a multiple of patch_size * merge_size,
Pillow resize of the uint8 image, rescale by 1/255, normalize with the OpenAI CLIP mean/std,
then the patch reshaping the vision encoder expects. The resize runs in Pillow on uint8 pixels
exactly as transformers does, so the output is bit-identical, not merely close.

Choices, where transformers leaves room:
- RGB conversion follows transformers 5.x: images with transparency (RGBA, LA, PA, P or L with a
  `transparency` entry) are composited onto white; transformers 4.x dropped the alpha instead.
  CMYK and YCbCr go through Pillow's `convert("RGB")`, as transformers does (ICC profiles are
  ignored there too). 16-bit and float modes (I, I;16, F) are rejected rather than clipped to
  0..255, which is what Pillow's conversion would silently do.
- Arrays must be uint8, channels-last: HxW, HxWx1 (grayscale), HxWx3, HxWx4 (alpha composited
  onto white with numpy, rounding like transformers' array path). transformers guesses the
  channel axis; here it is always the last one.
- Videos are processed like the 4.x processor's `videos=` argument: every frame is resized with
  the same settings as images, frames are grouped temporal_patch_size at a time and the last
  frame repeated to fill the last group. Pass the model's video settings (min/max pixels) as the
  config when they differ from the image ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from onnxport.errors import RuntimeInputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow modes with at most 8 bits per channel, which Pillow converts to RGB without clipping.
_SUPPORTED_MODES = frozenset("1 L LA P PA RGB RGBA RGBa RGBX CMYK YCbCr LAB HSV".split())

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class QwenVLImageConfig:
    """The preprocessing settings, with transformers' defaults for Qwen2-VL / Qwen2.5-VL."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None = None) -> QwenVLImageConfig:
        """Settings from the contents of `preprocessor_config.json`; absent keys keep the defaults.

        The pixel budget is read like transformers reads it: `size` ({shortest_edge,
        longest_edge} or the older {min_pixels, max_pixels}), overridden by top-level
        `min_pixels` / `max_pixels`."""
        config = dict(config or {})
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag, True) is False:
                raise RuntimeInputError(
                    f"preprocessor config sets {flag}=false, which onnxport's Qwen-VL "
                    "image processor does not support",
                    "the vision encoder was trained with the step on; remove the key",
                )
        size = config.get("size") or {}
        if not isinstance(size, Mapping):
            raise RuntimeInputError(
                f"preprocessor config 'size' is {size!r}, not a dict",
                "give {'shortest_edge': min_pixels, 'longest_edge': max_pixels}",
            )
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        for key, names in (
            ("min_pixels", ("shortest_edge", "min_pixels")),
            ("max_pixels", ("longest_edge", "max_pixels")),
        ):
            from_size = [size[n] for n in names if size.get(n) is not None]
            if key not in values and from_size:
                values[key] = from_size[0]
        try:
            for key, value in values.items():
                if key in ("image_mean", "image_std"):
                    # transformers broadcasts a single number over the channels.
                    value = [value] * 3 if isinstance(value, (int, float)) else value
                    values[key] = tuple(float(x) for x in value)
                elif key == "rescale_factor":
                    values[key] = float(value)
                else:
                    values[key] = int(value)
            out = cls(**values)
        except (TypeError, ValueError) as e:
            raise RuntimeInputError(
                f"preprocessor config has a malformed value: {e}",
                "sizes are integers, image_mean / image_std lists of 3 numbers",
            ) from None
        out._check()
        return out

    def _check(self) -> None:
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            raise RuntimeInputError(
                f"patch_size, temporal_patch_size and merge_size must be >= 1, got "
                f"{self.patch_size}, {self.temporal_patch_size}, {self.merge_size}",
                "check preprocessor_config.json",
            )
        if not 0 < self.min_pixels <= self.max_pixels:
            # min_pixels 0 would let smart_resize round a thin side down to 0 pixels.
            raise RuntimeInputError(
                f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}",
                "check preprocessor_config.json",
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise RuntimeInputError(
                f"image_mean / image_std must be 3 numbers (std non-zero), got "
                f"{self.image_mean} / {self.image_std}",
                "check preprocessor_config.json",
            )
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise RuntimeInputError(
                f"resample {self.resample} is not a Pillow resampling filter",
                "3 (bicubic) is what Qwen-VL uses",
            )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The size transformers resizes to: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as well as that allows.

    Copied from transformers (Python's round-half-to-even included) so sizes agree exactly;
    the two refusals raise RuntimeInputError instead of ValueError / ZeroDivisionError."""
    if height < 1 or width < 1:
        raise RuntimeInputError(
            f"the image is {height}x{width} pixels (HxW); it needs at least 1x1",
            "pass a non-empty image",
        )
    if max(height, width) / min(height, width) > 200:
        raise RuntimeInputError(
            f"the image is {height}x{width} pixels (HxW): aspect ratio "
            f"{max(height, width) / min(height, width):.1f} is above the 200 Qwen-VL accepts",
            "crop or pad it to a ratio of at most 200:1",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _composite_on_white_pil(image: Image.Image) -> Image.Image:
    # The rule and the Pillow calls of transformers 5.x `convert_to_rgb` for PIL images.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _rgb_array(image: Any, what: str) -> np.ndarray:
    """HxWx3 uint8 RGB of one image, converted the way transformers converts it."""
    if isinstance(image, Image.Image):
        if image.mode not in _SUPPORTED_MODES:
            raise RuntimeInputError(
                f"{what} has Pillow mode {image.mode!r}; converting it to RGB clips it to 0..255",
                "scale it to 0..255 yourself and convert it to mode 'L' or 'RGB'",
            )
        return np.asarray(_composite_on_white_pil(image))
    if not isinstance(image, np.ndarray):
        raise RuntimeInputError(
            f"{what} is a {type(image).__name__}, not a PIL image or numpy array",
            "pass PIL.Image.Image or an HxWxC uint8 array",
        )
    if image.dtype != np.uint8:
        raise RuntimeInputError(
            f"{what} is a {image.dtype} array; uint8 pixels (0..255) are needed",
            "for floats in [0, 1] use (a * 255).round().astype(np.uint8)",
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise RuntimeInputError(
            f"{what} has shape {image.shape}; expected HxW or HxWxC with C in 1, 3, 4",
            "channels go last (np.moveaxis(a, 0, -1) for CxHxW)",
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise RuntimeInputError(
            f"{what} has shape {image.shape}, which has no pixels", "pass a non-empty image"
        )
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        # transformers' array path: float64 blend onto white, then np.round (half to even).
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


class QwenVLImageProcessor:
    """`pixel_values` / `image_grid_thw` (and the video pair) for the Qwen2-VL / Qwen2.5-VL
    vision encoder, equal to transformers' PIL image processor.

        processor = QwenVLImageProcessor(json.load(open("preprocessor_config.json")))
        feeds = processor.preprocess([image_a, image_b])
    """

    def __init__(self, config: Mapping[str, Any] | QwenVLImageConfig | None = None):
        self.config = (
            config if isinstance(config, QwenVLImageConfig) else QwenVLImageConfig.from_dict(config)
        )
        c = self.config
        # float32 like transformers' normalize, which casts mean/std to the image's float32.
        self._mean = np.asarray(c.image_mean, dtype=np.float32)
        self._std = np.asarray(c.image_std, dtype=np.float32)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def _frame(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """HxWx3 uint8 -> CxHxW float32 at `size`, rescaled and normalized."""
        # transformers hands the uint8 image to Pillow (to_pil_image does not rescale uint8) and
        # reads the uint8 result back: Pillow's rounding and clipping are part of the result.
        resized = Image.fromarray(rgb).resize((size[1], size[0]), resample=self.config.resample)
        pixels = np.asarray(resized)
        # rescale in float64 then cast, normalize in float32: transformers' exact dtype sequence.
        pixels = (pixels.astype(np.float64) * self.config.rescale_factor).astype(np.float32)
        pixels = (pixels - self._mean) / self._std
        return pixels.transpose(2, 0, 1)

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """[T, C, H, W] -> [grid_t * grid_h * grid_w, C * tps * p * p], patches of one merge
        window consecutive, as the vision encoder's merger expects."""
        c = self.config
        tps, p, m = c.temporal_patch_size, c.patch_size, c.merge_size
        if pad := -frames.shape[0] % tps:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        t, channels, height, width = frames.shape
        grid_t, grid_h, grid_w = t // tps, height // p, width // p
        patches = frames.reshape(grid_t, tps, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_t * grid_h * grid_w, channels * tps * p * p)
        return flat, [grid_t, grid_h, grid_w]

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """One image or a list -> {'pixel_values' [patches, C*tps*p*p] float32,
        'image_grid_thw' [num_images, 3] int64}."""
        many = isinstance(images, Sequence) and not isinstance(images, str)
        items = list(images) if many else [images]
        if not items:
            raise RuntimeInputError(
                "no images given", "pass a PIL image, an HxWxC uint8 array or a list of them"
            )
        patches, grids = [], []
        for i, image in enumerate(items):
            rgb = _rgb_array(image, f"image {i}")
            flat, grid = self._patchify(self._frame(rgb, self.target_size(*rgb.shape[:2]))[None])
            patches.append(flat)
            grids.append(grid)
        return {
            "pixel_values": np.concatenate(patches),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }

    __call__ = preprocess

    def preprocess_videos(self, videos: Any) -> dict[str, np.ndarray]:
        """One video (a list of frames or a TxHxWxC uint8 array) or a list of videos ->
        {'pixel_values_videos', 'video_grid_thw' [num_videos, 3] int64}."""
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        elif (
            isinstance(videos, Sequence)
            and videos
            and isinstance(videos[0], (Image.Image, np.ndarray))
            and not (isinstance(videos[0], np.ndarray) and videos[0].ndim == 4)
        ):
            videos = [videos]  # a flat list of frames is one video
        if not isinstance(videos, Sequence) or not videos:
            raise RuntimeInputError(
                "no video given", "pass a list of frames, a TxHxWxC uint8 array, or a list of those"
            )
        patches, grids = [], []
        for v, video in enumerate(videos):
            if not isinstance(video, (Sequence, np.ndarray)):
                raise RuntimeInputError(
                    f"video {v} is a {type(video).__name__}",
                    "a video is a list of frames or a TxHxWxC uint8 array",
                )
            frames = [_rgb_array(frame, f"frame {f} of video {v}") for f, frame in enumerate(video)]
            if not frames:
                raise RuntimeInputError(f"video {v} has no frames", "pass at least one frame")
            shapes = {frame.shape[:2] for frame in frames}
            if len(shapes) > 1:
                raise RuntimeInputError(
                    f"the frames of video {v} have several sizes (HxW): {sorted(shapes)}",
                    "all frames of a video must have one size",
                )
            # One target size for the whole video, from its first frame, as transformers does.
            size = self.target_size(*frames[0].shape[:2])
            flat, grid = self._patchify(np.stack([self._frame(frame, size) for frame in frames]))
            patches.append(flat)
            grids.append(grid)
        return {
            "pixel_values_videos": np.concatenate(patches),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }


def load_image(path) -> Image.Image:
    """An image file opened with Pillow (converted by the processor like transformers does);
    a missing or unreadable file is one RuntimeInputError."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise RuntimeInputError(f"image file {str(p)!r} does not exist", "pass the path of a PNG / JPEG / ... file")
    try:
        image = Image.open(p)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RuntimeInputError(f"{p.name} is not an image Pillow can read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120]})", "pass a PNG / JPEG / WebP / ... image") from None
    return image


# --- MiniCPM-V 4.6: a source image plus a grid of slices, NaViT-packed -----------------------------

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class MiniCPMVImageConfig:
    """The preprocessing settings, with transformers' defaults for MiniCPM-V 4.6."""

    scale_resolution: int = 448
    max_slice_nums: int = 9
    patch_size: int = 14
    slice_mode: bool = True
    downsample_mode: str = "16x"
    use_image_id: bool = True
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def merge_factor(self) -> int:
        """Patches per side merged into one LLM token: the ViT's 2x2 window merger and the 2x2
        MLP merger ("16x"), or only the latter ("4x")."""
        return 2 if self.downsample_mode == "4x" else 4

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None = None) -> MiniCPMVImageConfig:
        """Settings from the contents of `preprocessor_config.json`; absent keys keep the defaults."""
        config = dict(config or {})
        for flag in ("do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag, True) is False:
                raise RuntimeInputError(f"preprocessor config sets {flag}=false, which onnxport's MiniCPM-V image "
                                        "processor does not support",
                                        "the vision encoder was trained with the step on; remove the key")
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        try:
            for key, value in values.items():
                if key in ("image_mean", "image_std"):
                    value = [value] * 3 if isinstance(value, (int, float)) else value
                    values[key] = tuple(float(x) for x in value)
                elif key == "rescale_factor":
                    values[key] = float(value)
                elif key in ("slice_mode", "use_image_id"):
                    values[key] = bool(value)
                elif key == "downsample_mode":
                    values[key] = str(value)
                else:
                    values[key] = int(value)
            out = cls(**values)
        except (TypeError, ValueError) as e:
            raise RuntimeInputError(f"preprocessor config has a malformed value: {e}",
                                    "sizes are integers, image_mean / image_std lists of 3 numbers") from None
        if min(out.scale_resolution, out.max_slice_nums, out.patch_size) < 1 or out.downsample_mode not in ("4x", "16x"):
            raise RuntimeInputError(
                f"need scale_resolution, max_slice_nums, patch_size >= 1 and downsample_mode 4x or 16x, got "
                f"{out.scale_resolution}, {out.max_slice_nums}, {out.patch_size}, {out.downsample_mode!r}",
                "check preprocessor_config.json")
        if len(out.image_mean) != 3 or len(out.image_std) != 3 or 0.0 in out.image_std:
            raise RuntimeInputError(f"image_mean / image_std must be 3 numbers (std non-zero), got "
                                    f"{out.image_mean} / {out.image_std}", "check preprocessor_config.json")
        return out


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


class MiniCPMVImageProcessor:
    """`pixel_values` [1, C, P, num_patches * P] (every slice of every image, NaViT-packed),
    `target_sizes` [num_slices, 2] (each slice's patch grid), `grids` (each image's slice grid,
    [0, 0] when it is not sliced) and `num_patches_per_image`, equal to transformers'
    `MiniCPMV4_6ImageProcessorPil`: an image larger than scale_resolution**2 pixels becomes a
    source image resized to about that area plus a rows x cols grid of slices of the image
    resized to the grid; smaller ones are one image resized up to about that area. Sizes are
    multiples of patch_size * merge factor; Pillow resizes the uint8 image, then rescale and
    normalize as transformers does, so the output is bit-identical."""

    def __init__(self, config: Mapping[str, Any] | MiniCPMVImageConfig | None = None):
        self.config = config if isinstance(config, MiniCPMVImageConfig) else MiniCPMVImageConfig.from_dict(config)
        self._mean = np.asarray(self.config.image_mean, dtype=np.float32)
        self._std = np.asarray(self.config.image_std, dtype=np.float32)

    # the size rules, copied from transformers (int() truncation and round-half-to-even included)

    def best_resize(self, height: float, width: float, allow_upscale: bool = False) -> tuple[int, int]:
        c = self.config
        if height * width > c.scale_resolution * c.scale_resolution or allow_upscale:
            aspect_ratio = width / height
            height = int(c.scale_resolution / math.sqrt(aspect_ratio))
            width = int(height * aspect_ratio)
        unit = c.patch_size * c.merge_factor
        return _ensure_divide(height, unit), _ensure_divide(width, unit)

    def refine_size(self, height: int, width: int, grid: list[int]) -> tuple[int, int]:
        rows, cols = grid
        h, w = self.best_resize(_ensure_divide(height, rows) / rows, _ensure_divide(width, cols) / cols,
                                allow_upscale=True)
        return h * rows, w * cols

    def slice_grid(self, height: int, width: int) -> list[int] | None:
        """[rows, cols] of slices (the count within max_slice_nums whose shape is closest to the
        image's aspect ratio, ties to more rows), or None for an image that is not sliced."""
        c = self.config
        log_ratio = math.log(width / height)
        multiple = min(math.ceil(width * height / (c.scale_resolution * c.scale_resolution)), c.max_slice_nums)
        if multiple <= 1:
            return None
        best, min_error = [1, 1], float("inf")
        for num_slices in (multiple - 1, multiple, multiple + 1):
            if num_slices == 1 or num_slices > c.max_slice_nums:
                continue
            for rows in range(1, num_slices + 1):
                if num_slices % rows == 0:
                    error = abs(log_ratio - math.log((num_slices // rows) / rows))
                    if error < min_error or (error == min_error and rows > best[0]):
                        best, min_error = [rows, num_slices // rows], error
        return best

    def _normalized(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> CxHxW float32, rescaled (float64 then cast) and normalized (float32)."""
        pixels = (rgb.astype(np.float64) * self.config.rescale_factor).astype(np.float32)
        return ((pixels - self._mean) / self._std).transpose(2, 0, 1)

    def _patchified(self, chw: np.ndarray) -> np.ndarray:
        """[C, H, W] -> [C, P, H*W/P]: patches row-major, each patch's rows stacked along P."""
        p = self.config.patch_size
        channels, height, width = chw.shape
        x = chw.reshape(channels, height // p, p, width // p, p).transpose(0, 2, 1, 3, 4)
        return x.reshape(channels, p, -1)

    def _resized(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample=self.config.resample))

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, Any]:
        """One image or a list -> {'pixel_values', 'target_sizes' (int64), 'grids',
        'num_patches_per_image'} as transformers' processor returns them."""
        many = isinstance(images, Sequence) and not isinstance(images, str)
        items = list(images) if many else [images]
        if not items:
            raise RuntimeInputError("no images given", "pass a PIL image, an HxWxC uint8 array or a list of them")
        c = self.config
        pixels, sizes, grids, counts = [], [], [], []
        for i, image in enumerate(items):
            rgb = _rgb_array(image, f"image {i}")
            height, width = rgb.shape[:2]
            grid = self.slice_grid(height, width) if c.slice_mode else None
            source = self.best_resize(height, width, allow_upscale=grid is None)
            pixels.append(self._patchified(self._normalized(self._resized(rgb, source))))
            sizes.append([source[0] // c.patch_size, source[1] // c.patch_size])
            if grid is not None:
                refine = self._resized(rgb, self.refine_size(height, width, grid))
                sh, sw = refine.shape[0] // grid[0], refine.shape[1] // grid[1]
                for top in range(0, refine.shape[0], sh):
                    for left in range(0, refine.shape[1], sw):
                        piece = refine[top:top + sh, left:left + sw]
                        pixels.append(self._patchified(self._normalized(piece)))
                        sizes.append([sh // c.patch_size, sw // c.patch_size])
            grids.append(grid if grid is not None else [0, 0])
            counts.append(1 + (grid[0] * grid[1] if grid is not None else 0))
        return {"pixel_values": np.concatenate(pixels, axis=-1)[None],
                "target_sizes": np.asarray(sizes, dtype=np.int64), "grids": grids, "num_patches_per_image": counts}

    __call__ = preprocess
