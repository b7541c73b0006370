"""Whisper log-mel features in numpy (no torch, no transformers), plus WAV reading.

A re-implementation of transformers' `WhisperFeatureExtractor`: pad or cut the audio to
chunk_length seconds, centred STFT (reflect padding, periodic Hann window, n_fft 400, hop 160),
power spectrum, Slaney-scale / Slaney-normalised mel filters from 0 to 8 kHz, log10 of the mel
energies clamped at 1e-10, the last frame dropped, a dynamic range of 8 (80 dB) below each
item's maximum, then (x + 4) / 4. The STFT and the mel projection run in float64, so the result
is at least as accurate as either transformers path (torch's float32 one, or the numpy one).

Choices:
- Audio is never resampled: `check_audio` refuses a sample rate other than the model's.
- Multi-channel audio is refused, not averaged: a silent downmix hides a wrong file (a stereo
  recording with one dead or phase-inverted channel), and the caller can average in one line.
- `dither` (random noise transformers can add) is refused when non-zero: its output is not
  reproducible, so nothing could be compared with it.
"""

from __future__ import annotations

import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from onnxport.errors import RuntimeInputError


@dataclass(frozen=True)
class WhisperFeatureConfig:
    """The feature settings, with transformers' defaults (Whisper v1-v2; v3 has 128 mels)."""

    feature_size: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    padding_value: float = 0.0

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        return self.n_samples // self.hop_length

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None = None) -> WhisperFeatureConfig:
        """Settings from `preprocessor_config.json`'s contents; absent keys keep the defaults."""
        config = dict(config or {})
        if config.get("dither") not in (None, 0, 0.0):
            raise RuntimeInputError(
                f"preprocessor config sets dither={config['dither']!r}; random dithering "
                "is not supported",
                "set dither to 0.0",
            )
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        try:
            out = cls(
                **{k: float(v) if k == "padding_value" else int(v) for k, v in values.items()}
            )
        except (TypeError, ValueError) as e:
            raise RuntimeInputError(
                f"preprocessor config has a malformed value: {e}",
                "feature_size, sampling_rate, hop_length, chunk_length, n_fft are integers",
            ) from None
        if (
            min(out.feature_size, out.sampling_rate, out.hop_length, out.chunk_length) < 1
            or out.n_fft < 2
        ):
            raise RuntimeInputError(
                f"feature settings must be positive (n_fft >= 2), got {out}",
                "check preprocessor_config.json",
            )
        return out


def _hertz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
    freq = np.asarray(freq, dtype=np.float64)
    logstep = 27.0 / np.log(6.4)
    return np.where(
        freq >= 1000.0,
        15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * logstep,
        3.0 * freq / 200.0,
    )


def _mel_to_hertz_slaney(mels: np.ndarray) -> np.ndarray:
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), 200.0 * mels / 3.0)


def mel_filter_bank(
    num_frequency_bins: int,
    num_mel_filters: int,
    min_frequency: float,
    max_frequency: float,
    sampling_rate: int,
) -> np.ndarray:
    """[num_frequency_bins, num_mel_filters] float64 triangular filters, Slaney mel scale and
    Slaney area normalisation: transformers' `mel_filter_bank(norm="slaney",
    mel_scale="slaney")` (and librosa's default), which is what Whisper uses."""
    mel_freqs = np.linspace(
        _hertz_to_mel_slaney(min_frequency),
        _hertz_to_mel_slaney(max_frequency),
        num_mel_filters + 2,
    )
    filter_freqs = _mel_to_hertz_slaney(mel_freqs)
    # sampling_rate // 2 (an integer) as transformers writes it; the same for even rates.
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    filter_diff = np.diff(filter_freqs)
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window's default, the one Whisper's STFT uses)."""
    return np.hanning(length + 1)[:-1]


class WhisperFeatureExtractor:
    """`input_features` [batch, n_mels, 3000] float32 for a Whisper encoder, equal to
    transformers' `WhisperFeatureExtractor(...)(audio, sampling_rate=..., return_tensors="np")`.

        extractor = WhisperFeatureExtractor(json.load(open("preprocessor_config.json")))
        samples, rate = read_wav("speech.wav")
        features = extractor(samples, sampling_rate=rate)["input_features"]
    """

    def __init__(self, config: Mapping[str, Any] | WhisperFeatureConfig | None = None):
        self.config = (
            config
            if isinstance(config, WhisperFeatureConfig)
            else WhisperFeatureConfig.from_dict(config)
        )
        c = self.config
        # Whisper's filters stop at 8 kHz whatever the sampling rate (transformers hard-codes it).
        self.mel_filters = mel_filter_bank(
            1 + c.n_fft // 2, c.feature_size, 0.0, 8000.0, c.sampling_rate
        )
        self.window = hann_window(c.n_fft)

    def log_mel_spectrogram(self, waveform: np.ndarray) -> np.ndarray:
        """One padded waveform [n_samples] -> [n_mels, n_samples // hop_length] float32."""
        c = self.config
        half = c.n_fft // 2
        padded = np.pad(waveform.astype(np.float64), (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, c.n_fft)[:: c.hop_length]
        # The last frame is dropped (Whisper's `stft[..., :-1]`): 3000 frames for 30 s, not 3001.
        spectrum = np.fft.rfft(frames[:-1] * self.window, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        log_spec = np.log10(np.maximum(power @ self.mel_filters, 1e-10)).T
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)

    def __call__(
        self,
        audio: np.ndarray | Sequence[np.ndarray],
        *,
        sampling_rate: int,
        return_attention_mask: bool = False,
    ) -> dict[str, np.ndarray]:
        """One mono waveform or a list of them (float samples in [-1, 1]) -> {'input_features'
        [batch, n_mels, nb_max_frames] float32}, plus 'attention_mask' [batch, nb_max_frames]
        int32 (1 where a frame starts on real audio) when asked for.

        Each waveform is padded with padding_value or cut to chunk_length seconds. A batch is a
        list; an array is always one waveform ([n] or [n, 1])."""
        c = self.config
        # An array is one waveform, even 2-D: read_wav returns [n, channels], which check_audio
        # must see whole to refuse it (transformers would take the rows as a batch).
        single = isinstance(audio, np.ndarray) or (
            isinstance(audio, Sequence) and len(audio) > 0 and np.ndim(audio[0]) == 0
        )
        items = [audio] if single else list(audio)
        if not items:
            raise RuntimeInputError(
                "no audio given", "pass a 1-D float array of samples or a list of them"
            )
        batch = np.full((len(items), c.n_samples), c.padding_value, dtype=np.float32)
        lengths = []
        for i, samples in enumerate(items):
            samples = check_audio(samples, sampling_rate, c.sampling_rate, what=f"audio {i}")
            samples = samples[: c.n_samples]  # transformers truncates to chunk_length seconds
            batch[i, : len(samples)] = samples
            lengths.append(len(samples))
        out = {"input_features": np.stack([self.log_mel_spectrogram(w) for w in batch])}
        if return_attention_mask:
            # A frame is real when its sample (frame * hop_length) is: transformers' mask[:, ::hop].
            starts = np.arange(c.nb_max_frames) * c.hop_length
            out["attention_mask"] = (starts[None, :] < np.asarray(lengths)[:, None]).astype(
                np.int32
            )
        return out


def check_audio(
    samples: Any, sample_rate: int, expected_rate: int, what: str = "the audio"
) -> np.ndarray:
    """Mono float32 samples [n] if `samples` is usable as they are, else RuntimeInputError.

    Accepts [n] or [n, 1]; multi-channel [n, channels] is refused (no silent downmix), and so
    is any rate but `expected_rate` (no silent resampling)."""
    if sample_rate != expected_rate:
        raise RuntimeInputError(
            f"{what} is sampled at {sample_rate} Hz; the model needs {expected_rate} Hz",
            f"resample it to {expected_rate} Hz first (e.g. ffmpeg -i in.wav -ar "
            f"{expected_rate} out.wav); onnxport does not resample",
        )
    try:
        array = np.asarray(samples)
    except (TypeError, ValueError) as e:
        raise RuntimeInputError(
            f"{what} is not an array of samples: {e}", "pass a 1-D float array"
        ) from None
    if array.dtype.kind != "f":
        # Integer PCM fed as is would be 32768 times too loud; transformers would take it anyway.
        raise RuntimeInputError(
            f"{what} has dtype {array.dtype}; float samples in [-1, 1] are needed",
            "scale int16 PCM by 1 / 32768 (read_wav does it)",
        )
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        raise RuntimeInputError(
            f"{what} has {array.shape[1]} channels (shape {array.shape}); the model needs mono",
            "downmix it first, e.g. samples.mean(axis=1); pass a batch as a list of 1-D arrays",
        )
    if array.ndim != 1:
        raise RuntimeInputError(
            f"{what} has shape {array.shape}; expected [samples] or [samples, 1]",
            "pass one mono waveform per item",
        )
    array = array.astype(np.float32)
    if array.size == 0:
        raise RuntimeInputError(f"{what} has no samples", "pass a recording of at least one sample")
    if not np.isfinite(array).all():
        raise RuntimeInputError(
            f"{what} contains NaN or infinite samples", "check the decoder that produced it"
        )
    return array


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples float32 in [-1, 1), sample_rate) of a 16- or 32-bit PCM WAV file: [n] for mono,
    [n, channels] for more channels. Integers are scaled by 2**(bits-1), as soundfile does."""
    try:
        with wave.open(str(path), "rb") as f:
            params = f.getparams()
            data = f.readframes(params.nframes)
    except FileNotFoundError:
        raise RuntimeInputError(f"{path}: no such file", "check the path") from None
    except (wave.Error, EOFError) as e:
        # The stdlib reader knows only integer PCM (format 1): float or compressed WAVs land here.
        raise RuntimeInputError(
            f"{path} is not a PCM WAV file the wave module can read: {e}",
            "convert it to 16-bit PCM (ffmpeg -i in -c:a pcm_s16le out.wav)",
        ) from None
    channels, width, rate = params.nchannels, params.sampwidth, params.framerate
    if width not in (2, 4):
        raise RuntimeInputError(
            f"{path} has {8 * width}-bit samples; 16- and 32-bit PCM are supported",
            "convert it to 16-bit PCM (ffmpeg -i in -c:a pcm_s16le out.wav)",
        )
    ints = np.frombuffer(data, dtype="<i2" if width == 2 else "<i4")
    samples = (ints.astype(np.float64) / float(2 ** (8 * width - 1))).astype(np.float32)
    samples = samples[: len(samples) // channels * channels].reshape(-1, channels)
    return (samples[:, 0] if channels == 1 else samples), rate
