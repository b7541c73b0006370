"""The numpy processors of the runtime side equal the transformers processors they replace:
Qwen2-VL image/video preprocessing and Whisper log-mel features, plus their input checks."""

from __future__ import annotations

import subprocess
import sys
import warnings
import wave

import numpy as np
import pytest
import transformers
from PIL import Image

from onnxport.errors import RuntimeInputError
from onnxport.runtime.audio_features import WhisperFeatureExtractor, check_audio, read_wav
from onnxport.runtime.image_processor import QwenVLImageProcessor, smart_resize

TF_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 4.x `convert_to_rgb` drops the alpha channel and leaves arrays alone; 5.x (and
# onnxport) composite alpha onto white and turn 1- and 4-channel arrays into RGB.
rgb_like_5 = pytest.mark.skipif(
    TF_MAJOR < 5, reason="transformers 4.x drops alpha and does not convert arrays"
)


def hf_image_processor(**kwargs):
    # The PIL/numpy processor: `...Pil` in transformers 5, the default (slow) class in 4.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**kwargs)


def rgb(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 0 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_same_images(ours: dict, hf) -> None:
    np.testing.assert_array_equal(ours["image_grid_thw"], hf["image_grid_thw"])
    assert ours["image_grid_thw"].dtype == np.int64
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(ours["pixel_values"], hf["pixel_values"], rtol=0, atol=1e-5)


def test_runtime_processors_do_not_import_torch():
    code = (
        "import sys\n"
        "import onnxport.runtime.image_processor, onnxport.runtime.audio_features\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Qwen2-VL images ---------------------------------------------------------------------------

# (height, width): exact multiple of 28, up-scaled to min_pixels (tiny, thin), rounded both ways,
# tall, wide, and down-scaled to the default max_pixels (1200x1000 > 1003520 pixels).
SIZES = [(224, 224), (20, 30), (7, 9), (101, 333), (600, 90), (50, 700), (1200, 1000)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("kind", ["pil", "array"])
def test_image_equals_transformers(height, width, kind):
    image = rgb(height, width, seed=height * width)
    if kind == "pil":
        image = Image.fromarray(image)
    assert_same_images(
        QwenVLImageProcessor()(image), hf_image_processor()(image, return_tensors="np")
    )


def test_resize_is_bit_identical():
    # Pillow resizes the uint8 image in both, and rescale/normalize follow transformers' dtypes
    # (float64 rescale, float32 normalize), so there is no rounding left to tolerate.
    image = Image.fromarray(rgb(333, 517, seed=3))
    ours = QwenVLImageProcessor()(image)["pixel_values"]
    np.testing.assert_array_equal(
        ours, hf_image_processor()(image, return_tensors="np")["pixel_values"]
    )


def _transparent_palette() -> Image.Image:
    image = Image.fromarray(rgb(90, 120, seed=5)).convert("P")
    image.info["transparency"] = 7
    return image


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Image.fromarray(rgb(90, 120, 0), "L"), id="L"),
        pytest.param(lambda: Image.fromarray(rgb(90, 120, 0)).convert("1"), id="1"),
        pytest.param(lambda: Image.fromarray(rgb(90, 120, 4), "CMYK"), id="CMYK"),
        pytest.param(lambda: Image.fromarray(rgb(90, 120)).convert("YCbCr"), id="YCbCr"),
        pytest.param(lambda: Image.fromarray(rgb(90, 120, 4), "RGBA"), id="RGBA", marks=rgb_like_5),
        pytest.param(lambda: Image.fromarray(rgb(90, 120, 2), "LA"), id="LA", marks=rgb_like_5),
        pytest.param(_transparent_palette, id="P-transparency", marks=rgb_like_5),
        pytest.param(lambda: rgb(90, 120, 1), id="array-HxWx1", marks=rgb_like_5),
        pytest.param(lambda: rgb(90, 120, 4), id="array-HxWx4", marks=rgb_like_5),
    ],
)
def test_image_modes_convert_like_transformers(make):
    image = make()
    assert_same_images(
        QwenVLImageProcessor()(image), hf_image_processor()(image, return_tensors="np")
    )


@rgb_like_5
def test_grayscale_2d_array_is_hxwx1():
    # transformers refuses a 2-D array; onnxport reads it as the HxWx1 image it is.
    image = rgb(90, 120, 0)
    ours = QwenVLImageProcessor()(image)
    assert_same_images(ours, hf_image_processor()(image[:, :, None], return_tensors="np"))


def test_image_batch_and_config_dict():
    # A Qwen2.5-VL preprocessor_config.json with a smaller pixel budget, so 400x300 shrinks.
    config = {
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 64,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    images = [
        Image.fromarray(rgb(400, 300, seed=1)),
        rgb(30, 40, seed=2),
        Image.fromarray(rgb(56, 56, seed=3)),
    ]
    ours = QwenVLImageProcessor(config)(images)
    hf = hf_image_processor(min_pixels=config["min_pixels"], max_pixels=config["max_pixels"])
    assert_same_images(ours, hf(images, return_tensors="np"))
    assert ours["image_grid_thw"].shape == (3, 3)
    # The newer `size` spelling of the same budget gives the same processor.
    sized = QwenVLImageProcessor(
        {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}}
    )
    assert sized.config == QwenVLImageProcessor(config).config


def test_other_patch_settings():
    config = {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": 0.5,
        "image_std": 0.5,
    }
    image = Image.fromarray(rgb(150, 210, seed=4))
    ours = QwenVLImageProcessor(config)(image)
    hf = hf_image_processor(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=0.5, image_std=0.5
    )
    assert_same_images(ours, hf(image, return_tensors="np"))
    assert ours["pixel_values"].shape[1] == 3 * 2 * 16 * 16


def _hf_video(frames: list, temporal_patch_size: int = 2) -> tuple[np.ndarray, list[int]]:
    """The 4.x `videos=` result, rebuilt from transformers' per-frame image output: each image
    patch row holds its frame temporal_patch_size times ([C, T, p, p]); a video row holds
    consecutive frames in T, the last frame repeated to fill the last group."""
    hf = hf_image_processor()
    per_frame = [hf(frame, return_tensors="np") for frame in frames]
    _, grid_h, grid_w = per_frame[0]["image_grid_thw"][0]
    rows = [
        out["pixel_values"].reshape(grid_h * grid_w, 3, temporal_patch_size, 14 * 14)[:, :, 0]
        for out in per_frame
    ]
    rows += [rows[-1]] * (-len(rows) % temporal_patch_size)
    groups = [
        np.stack(rows[i : i + temporal_patch_size], axis=2)
        for i in range(0, len(rows), temporal_patch_size)
    ]
    return np.concatenate([g.reshape(grid_h * grid_w, -1) for g in groups]), [
        len(groups),
        grid_h,
        grid_w,
    ]


@pytest.mark.parametrize("num_frames", [2, 3])
def test_video_equals_transformers_frames(num_frames):
    frames = [Image.fromarray(rgb(120, 170, seed=10 + f)) for f in range(num_frames)]
    ours = QwenVLImageProcessor().preprocess_videos(frames)
    expected, grid = _hf_video(frames)
    np.testing.assert_array_equal(ours["video_grid_thw"], [grid])
    np.testing.assert_allclose(ours["pixel_values_videos"], expected, rtol=0, atol=1e-5)
    # A TxHxWxC array and a list of videos are the same video.
    stacked = np.stack([np.asarray(f) for f in frames])
    np.testing.assert_array_equal(
        QwenVLImageProcessor().preprocess_videos(stacked)["pixel_values_videos"],
        ours["pixel_values_videos"],
    )
    both = QwenVLImageProcessor().preprocess_videos([frames, stacked])
    np.testing.assert_array_equal(both["video_grid_thw"], [grid, grid])


def test_smart_resize_matches_transformers():
    try:  # the torch-free module in transformers 5 (the other one imports torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize as hf_smart_resize,
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            smart_resize as hf_smart_resize,
        )

    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, (300, 2)).tolist():
        if max(height, width) / min(height, width) <= 200:
            assert smart_resize(height, width) == hf_smart_resize(
                height, width, max_pixels=28 * 28 * 1280
            )


@pytest.mark.parametrize(
    "bad,match",
    [
        (rgb(40, 50).astype(np.float32) / 255, "float32 array; uint8"),
        (rgb(40, 50, 2), r"shape \(40, 50, 2\)"),
        (np.moveaxis(rgb(40, 50), -1, 0), r"shape \(3, 40, 50\)"),
        (np.zeros((0, 50, 3), np.uint8), "no pixels"),
        (rgb(1, 300), "aspect ratio 300.0"),
        (Image.new("I;16", (40, 50)), "mode 'I;16'"),
        (Image.new("F", (40, 50)), "mode 'F'"),
        ("photo.jpg", "is a str"),
        ([], "no images given"),
    ],
)
def test_bad_images_give_one_clear_error(bad, match):
    with pytest.raises(RuntimeInputError, match=match) as err:
        QwenVLImageProcessor()(bad)
    assert "\n" not in str(err.value) and err.value.hint


def test_bad_videos_and_configs():
    with pytest.raises(RuntimeInputError, match="several sizes"):
        QwenVLImageProcessor().preprocess_videos([rgb(40, 50), rgb(40, 60)])
    with pytest.raises(RuntimeInputError, match="has no frames"):
        QwenVLImageProcessor().preprocess_videos([[]])
    with pytest.raises(RuntimeInputError, match="do_resize=false"):
        QwenVLImageProcessor({"do_resize": False})
    with pytest.raises(RuntimeInputError, match="min_pixels"):
        QwenVLImageProcessor({"min_pixels": 0})
    with pytest.raises(RuntimeInputError, match="malformed"):
        QwenVLImageProcessor({"patch_size": "fourteen"})


# --- Whisper log-mel features --------------------------------------------------------------------


def hf_features(audio, feature_size: int, **kwargs) -> dict:
    from transformers import WhisperFeatureExtractor as HFWhisper

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # 128 mel filters over 201 bins: a known all-zero filter warning
        extractor = HFWhisper(feature_size=feature_size)
    return extractor(audio, sampling_rate=16000, return_tensors="np", **kwargs), extractor


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    # Tones plus noise under a slow envelope, so the 80 dB floor and quiet stretches both matter.
    tone = np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 1875 * t)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 0.7 * t))
    return (0.3 * envelope * tone + 0.02 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("feature_size", [80, 128])
@pytest.mark.parametrize("seconds", [0.5, 12.3, 30.0, 31.7])
def test_whisper_features_equal_transformers(feature_size, seconds):
    audio = speech_like(seconds, seed=int(seconds * 10) + feature_size)
    ours = WhisperFeatureExtractor({"feature_size": feature_size})(audio, sampling_rate=16000)[
        "input_features"
    ]
    hf, extractor = hf_features(audio, feature_size)
    assert ours.shape == (1, feature_size, 3000) and ours.dtype == np.float32
    # With torch installed transformers runs torch.stft in float32; onnxport's STFT and mel
    # projection run in float64. The float32 rounding shows in mel bins far below their frame's
    # peak: up to 5.7e-5 on these inputs, hence atol 1e-4 (a real mistake moves values by 1e-2
    # or more). It is transformers' own spread: its float64 numpy path is as far from its torch
    # path, and onnxport equals that numpy path up to the final float32 cast.
    np.testing.assert_allclose(ours, hf.input_features, rtol=0, atol=1e-4)
    padded = np.zeros(480000, np.float32)
    padded[: min(len(audio), 480000)] = audio[:480000]
    hf_numpy = extractor._np_extract_fbank_features(padded[None], "cpu")
    np.testing.assert_allclose(ours, hf_numpy, rtol=0, atol=1e-6)
    spread = np.abs(hf_numpy - hf.input_features).max()
    assert np.abs(ours - hf.input_features).max() <= spread + 1e-6


def test_whisper_batch_attention_mask_and_config_dict():
    # whisper-large-v3's preprocessor_config.json (minus the 400x... filter matrix it also stores).
    config = {
        "chunk_length": 30,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 128,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
    batch = [speech_like(3.21, 1), speech_like(31.0, 2), speech_like(0.01, 3)]
    ours = WhisperFeatureExtractor(config)(batch, sampling_rate=16000, return_attention_mask=True)
    hf, _ = hf_features(batch, 128, return_attention_mask=True)
    np.testing.assert_allclose(ours["input_features"], hf.input_features, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ours["attention_mask"], hf.attention_mask)
    assert ours["attention_mask"].dtype == hf.attention_mask.dtype
    assert ours["attention_mask"].sum(axis=1).tolist() == [321, 3000, 1]


def write_wav(path, ints: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1 if ints.ndim == 1 else ints.shape[1])
        f.setsampwidth(ints.dtype.itemsize)
        f.setframerate(rate)
        f.writeframes(ints.astype(ints.dtype.newbyteorder("<")).tobytes())


def test_wav_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mono = rng.integers(-32768, 32768, 16000 * 2, dtype=np.int16)
    write_wav(tmp_path / "mono16.wav", mono, 16000)
    samples, rate = read_wav(tmp_path / "mono16.wav")
    assert rate == 16000 and samples.dtype == np.float32 and samples.shape == (32000,)
    np.testing.assert_array_equal(samples, mono / 32768)
    # The samples read are what the extractor and transformers both see.
    ours = WhisperFeatureExtractor()(samples, sampling_rate=rate)["input_features"]
    np.testing.assert_allclose(ours, hf_features(samples, 80)[0].input_features, rtol=0, atol=1e-4)

    stereo = rng.integers(-(2**31), 2**31, (1000, 2), dtype=np.int32)
    write_wav(tmp_path / "stereo32.wav", stereo, 44100)
    samples, rate = read_wav(tmp_path / "stereo32.wav")
    assert rate == 44100 and samples.shape == (1000, 2)
    np.testing.assert_array_equal(samples, (stereo / 2**31).astype(np.float32))


def test_audio_errors(tmp_path):
    mono = speech_like(1.0, 0)
    with pytest.raises(
        RuntimeInputError, match="sampled at 44100 Hz; the model needs 16000 Hz"
    ) as err:
        check_audio(mono, 44100, 16000)
    assert "\n" not in str(err.value) and "resample" in err.value.hint
    # Multi-channel is refused, not averaged; [n, 1] is mono.
    with pytest.raises(RuntimeInputError, match="has 2 channels") as err:
        check_audio(np.stack([mono, mono], axis=1), 16000, 16000)
    assert "mean(axis=1)" in err.value.hint
    np.testing.assert_array_equal(check_audio(mono[:, None], 16000, 16000), mono)
    extractor = WhisperFeatureExtractor()
    with pytest.raises(RuntimeInputError, match="has 2 channels"):
        extractor(np.stack([mono, mono], axis=1), sampling_rate=16000)
    with pytest.raises(RuntimeInputError, match="8000 Hz"):
        extractor([mono], sampling_rate=8000)
    with pytest.raises(RuntimeInputError, match="dtype int16"):
        extractor((mono * 32767).astype(np.int16), sampling_rate=16000)
    with pytest.raises(RuntimeInputError, match="NaN"):
        extractor(np.full(100, np.nan, np.float32), sampling_rate=16000)
    with pytest.raises(RuntimeInputError, match="dither"):
        WhisperFeatureExtractor({"dither": 1e-5})
    # WAV files the reader cannot take.
    write_wav(tmp_path / "u8.wav", np.full(100, 128, np.uint8), 16000)
    with pytest.raises(RuntimeInputError, match="8-bit samples"):
        read_wav(tmp_path / "u8.wav")
    (tmp_path / "text.wav").write_text("not a wav")
    with pytest.raises(RuntimeInputError, match="not a PCM WAV"):
        read_wav(tmp_path / "text.wav")
    with pytest.raises(RuntimeInputError, match="no such file"):
        read_wav(tmp_path / "missing.wav")
