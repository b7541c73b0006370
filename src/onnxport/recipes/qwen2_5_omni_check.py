"""Qwen2.5-Omni's speech output checked end to end at export and by `onnxport verify`: the
bundle's any-to-any task (runtime/tasks/omni_speech.py) against transformers' own generate
(thinker tokens, talker codes) and token2wav (the waveform, from the same initial noise)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from onnxport.errors import VerificationError
from onnxport.recipes.chattts import log_mel_distance, snr_db
from onnxport.recipes.qwen2_5_omni_speech import (
    CHECK_CODES,
    CHECK_MIN_CODES,
    CHECK_SEED,
    CHECK_TOKENS,
    MEL_N_FFT,
    MIN_SNR_DB,
    SAMPLE_RATE,
    read_speakers,
)

if TYPE_CHECKING:
    from onnxport.recipes.qwen2_5_omni_thinker import OmniThinkerLM


def check_any_to_any(model: OmniThinkerLM, folder: Path, new_tokens: int = CHECK_TOKENS,
                     max_codes: int = CHECK_CODES, seed: int = CHECK_SEED) -> dict:
    """The ONNX pipeline (`AnyToAny` on the bundle being written) against transformers'
    `Qwen2_5OmniForConditionalGeneration.generate` on one clip and a few text tokens: the
    thinker's greedy tokens and the talker's greedy codes equal, and the waveform from those
    codes, with the same initial noise, within MIN_SNR_DB of token2wav's. Returns the record;
    raises VerificationError otherwise."""
    import time

    import numpy as np

    from onnxport.runtime.tasks.omni_speech import AnyToAny

    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    if any(p.device.type == "meta" for p in model.parameters()):
        return {"ok": None, "skipped": "the model was not loaded"}
    pipe = AnyToAny(folder)
    speaker = pipe.default_speaker
    rng = np.random.default_rng(seed)
    clip = (0.1 * rng.standard_normal(pipe.sampling_rate // 2)).astype(np.float32)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id, cfg.audio_start_token_id,
               cfg.audio_end_token_id}
    text = [t for t in range(3, min(vocab, 40)) if t not in special][:5]
    ids = [text[0], cfg.audio_start_token_id, cfg.audio_token_id, cfg.audio_end_token_id, *text[1:]]

    def torch_noise(shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()

    t0 = time.perf_counter()
    got = pipe.generate(ids, audio=[clip], max_new_tokens=new_tokens, eos_token_id=None, speak=True,
                        speaker=speaker, talker_max_new_tokens=max_codes, talker_min_new_tokens=CHECK_MIN_CODES,
                        noise=torch_noise)
    seconds = time.perf_counter() - t0
    # the reference: a batch of this prompt and a shorter one (left-padded), so transformers
    # keeps the attention mask (see reference_generate); row 0 is compared
    mel = pipe.features([clip, clip], sampling_rate=pipe.sampling_rate, return_attention_mask=True)
    rows = pipe.prepare(ids, audio=[clip]).rows[0]
    input_ids = torch.tensor([rows, [0, *rows[1:]]])
    mask = torch.ones_like(input_ids)
    mask[1, 0] = 0
    ref = reference_generate(model, input_ids, mask, speaker, new_tokens, max_codes, seed,
                             talker_min_new_tokens=CHECK_MIN_CODES,
                             input_features=torch.from_numpy(mel["input_features"]),
                             feature_attention_mask=torch.from_numpy(mel["attention_mask"]).long())
    tokens_equal = got.tokens == ref["tokens"]
    codes_equal = got.codes.tolist() == ref["codes"]
    record = {"case": f"a 0.5 s clip ({len(rows)} prompt tokens), {new_tokens} greedy thinker tokens, "
                      f"{CHECK_MIN_CODES} to {max_codes} greedy codec codes, speaker {speaker!r}, noise torch.randn seed {seed}",
              "tokens_equal": tokens_equal, "codes": int(len(got.codes)), "codes_equal": codes_equal,
              "stopped_at_eos": got.stopped_at_eos, "runtime_seconds": round(seconds, 3), "min_snr_db": MIN_SNR_DB}
    if not (tokens_equal and codes_equal):
        what = "thinker tokens" if not tokens_equal else "codec codes"
        raise VerificationError(f"any-to-any: the ONNX pipeline's {what} differ from transformers' generate",
                                "every graph verified alone; run with --debug and report it; nothing was written")
    wave = ref["waveform"]
    snr = snr_db(got.samples, wave)
    hop = math.prod(model.token2wav.code2wav_bigvgan_model.config.upsample_rates)
    distance = log_mel_distance(got.samples, wave, SAMPLE_RATE, MEL_N_FFT, hop)
    record.update(samples=int(wave.size), snr_db=round(snr, 2) if math.isfinite(snr) else None,
                  max_abs_diff=float(np.max(np.abs(got.samples - wave))) if wave.size else 0.0,
                  log_mel_distance=float(f"{distance:.3g}"), ok=snr >= MIN_SNR_DB)
    if not record["ok"]:
        raise VerificationError(f"any-to-any: waveform SNR {snr:.1f} dB against PyTorch (< {MIN_SNR_DB} dB)",
                                "every graph verified alone; run with --debug and report it; nothing was written")
    return record


def reference_generate(model: OmniThinkerLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, speaker: str,
                       new_tokens: int, max_codes: int, seed: int, **inputs) -> dict:
    """transformers' `Qwen2_5OmniForConditionalGeneration.generate` (greedy thinker and talker,
    `new_tokens` thinker tokens, no EOS) on the loaded modules, for row 0 of a left-padded
    batch: its thinker tokens, the talker's codes (up to its first end code) and the waveform,
    token2wav's noise being the first draw after `seed`. The full class's generate runs on this
    model's modules (OmniThinkerLM keeps them under the same names) with the bundle's speakers.

    Row 0 must be unpadded and another row padded: transformers 5.x drops an all-ones attention
    mask in generate, and without a mask its talker skips the first step's codec pad / bos
    embeddings and its rope index (the path Qwen's code and a padded batch run, which onnxport
    follows); a padded batch keeps the mask."""
    import types

    import transformers

    speakers = read_speakers(model)
    eos = [model.talker.config.tts_codec_pad_token_id, model.talker.config.tts_codec_end_token_id]

    class FirstRowOnly:
        """token2wav for row 0 only (generate decodes row by row, row 0 first): the padded row
        is there for the mask and may end with no code, which token2wav cannot decode."""

        dtype = torch.float32
        calls = 0

        def float(self):
            return self

        def __call__(self, codes, **kwargs):
            FirstRowOnly.calls += 1
            return model.token2wav(codes, **kwargs) if FirstRowOnly.calls == 1 else torch.zeros(0)

    model.token2wav.float()
    full = types.SimpleNamespace(thinker=model.thinker, talker=model.talker, token2wav=FirstRowOnly(),
                                 config=model.full_config, has_talker=True,
                                 speaker_map={speaker: {k: (int(v) if k == "bos_token" else v)
                                                        for k, v in speakers[speaker].items()}})
    captured = {}
    talker_generate = model.talker.generate

    def capture(*args, **kwargs):
        captured["codes"] = talker_generate(*args, **kwargs)
        return captured["codes"]

    model.talker.generate = capture
    try:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)  # token2wav's initial noise (row 0 first) is the first draw after it
            sequences, waves = transformers.Qwen2_5OmniForConditionalGeneration.generate(
                full, input_ids=input_ids, attention_mask=attention_mask, speaker=speaker,
                thinker_max_new_tokens=new_tokens, thinker_eos_token_id=None, thinker_do_sample=False,
                talker_max_new_tokens=max_codes, talker_do_sample=False, talker_eos_token_id=eos, **inputs)
    finally:
        del model.talker.generate
    # the talker's prompt: one mask code per thinker prompt token, then pad and bos
    codes = captured["codes"][0, input_ids.shape[1] + 2:].tolist()
    cut = next((i for i, c in enumerate(codes) if c in eos), len(codes))
    return {"tokens": sequences[0, input_ids.shape[1]:].tolist(), "codes": codes[:cut],
            "waveform": waves[0].reshape(-1).float().numpy()}
