"""Qwen2.5-Omni speech output end to end in ONNX Runtime: one `onnxport export` of a full
`qwen2_5_omni` checkpoint with its talker and token2wav gives the thinker's graphs (its decoder
also outputting the last hidden state), the talker (flat KV cache) and its codec embedding,
token2wav's DiT step and BigVGAN, chained by the manifest's any-to-any pipeline; the torch-free
runner speaks the thinker's reply: the talker's greedy codes equal transformers' generate, and
the waveform from them (same noise) is within 40 dB SNR of PyTorch's token2wav."""

from __future__ import annotations

import json
import math
import os
import wave

import numpy as np
import pytest
import torch
from test_omni_pipeline import (
    AUD,
    IMG,
    _clip,
    _image,
    _processor,
    _turn,
    media_token_ids,
    thinker_config,
    write_processor_files,
)
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.recipes.chattts import snr_db

#: the talker's codec vocabulary and its special codes (Qwen2.5-Omni's sit at 8292-8296 of 8448)
CODEC = {"vocab_size": 64, "tts_codec_pad_token_id": 60, "tts_codec_start_token_id": 61,
         "tts_codec_end_token_id": 62, "tts_codec_mask_token_id": 63}
#: the thinker's tokens whose embeddings start / end / pad the talker's text stream, and the
#: speakers' text-start tokens (Qwen2.5-Omni's are special tokens of its vocabulary)
TEXT = {"tts_text_start_token_id": 1001, "tts_text_end_token_id": 1002, "tts_text_pad_token_id": 1003}
SPEAKERS = {"Chelsie": (1004, 30), "Ethan": (1005, 24)}
END_CODES = [CODEC["tts_codec_pad_token_id"], CODEC["tts_codec_end_token_id"]]
MEL_DIM, COND_DIM = 8, 8
#: the waveform SNR against PyTorch the brief asks of fp32 graphs
MIN_SNR_DB = 40.0


def _speakers() -> dict:
    """spk_dict.pt as transformers reads it: speaker -> {cond, ref_mel, bos_token}."""
    g = torch.Generator().manual_seed(1)
    return {name: {"cond": torch.randn(COND_DIM, generator=g), "ref_mel": torch.randn(frames, MEL_DIM, generator=g),
                   "bos_token": bos} for name, (bos, frames) in SPEAKERS.items()}


def _rescale(module: torch.nn.Module, gain: float) -> None:
    """Weights of std gain / sqrt(fan-in): the default 0.02 init leaves BigVGAN's waveform at
    ~1e-5, below any tolerance; these give ~0.15 RMS (no clipping) and a mel of std ~1.5."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
                fan = (m.weight.shape[0] * m.weight.shape[2] / m.stride[0] if isinstance(m, torch.nn.ConvTranspose1d)
                       else m.weight[0].numel())
                m.weight.normal_(0, gain / math.sqrt(fan))


def build_checkpoint(folder, speakers=None):
    """A tiny Qwen2.5-Omni with speech output (the thinker of test_omni_pipeline, a 2-layer
    talker, a 2-layer DiT and a 3-stage BigVGAN) and its spk_dict.pt; returns the special ids."""
    import transformers as T

    ids = write_processor_files(folder)
    media = media_token_ids(ids)
    thinker = thinker_config(ids)
    # embedding_size: the thinker's width (the talker reads its hidden states); head_dim 16 with
    # mrope_section [2, 3, 3]: every TMRoPE axis has its own rotary frequencies
    talker = {"embedding_size": 48, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "initializer_range": 0.2,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
              **CODEC, **TEXT, **media}
    # num_embeds = the talker's vocabulary: any code the random talker emits has a DiT embedding
    dit = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16, "ff_mult": 2,
           "emb_dim": 16, "block_size": 4, "look_ahead_layers": [1], "look_backward_layers": [0], "repeats": 2,
           "num_embeds": CODEC["vocab_size"], "mel_dim": MEL_DIM, "enc_emb_dim": COND_DIM, "enc_dim": 8,
           "enc_channels": [16, 16, 16, 32], "enc_kernel_sizes": [5, 3, 3, 1], "enc_dilations": [1, 2, 3, 1],
           "enc_attention_channels": 8, "enc_res2net_scale": 2, "enc_se_channels": 8}
    bigvgan = {"mel_dim": MEL_DIM, "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 5],
               "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]], "upsample_rates": [5, 3, 2],
               "upsample_kernel_sizes": [11, 7, 4]}
    config = T.Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker,
                                 token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan})
    torch.manual_seed(0)
    model = T.Qwen2_5OmniForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits: no greedy near-ties
        model.thinker.lm_head.weight.normal_(0, 0.5)
        model.talker.codec_head.weight.normal_(0, 0.5)
        # end codes a little likelier: the greedy talker's codes end within the tests' limits
        # (31 and 4 codes; unscaled it loops past 120 without one)
        model.talker.codec_head.weight[END_CODES] *= 1.2
    _rescale(model.token2wav.code2wav_dit_model, 1.0)
    _rescale(model.token2wav.code2wav_bigvgan_model, 0.7)
    model.save_pretrained(folder, safe_serialization=True)
    torch.save(_speakers() if speakers is None else speakers, folder / "spk_dict.pt")
    return ids


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(checkpoint, bundle, special ids): the tiny model exported with every part."""
    ckpt = tmp_path_factory.mktemp("omnisp") / "ckpt"
    ids = build_checkpoint(ckpt)
    out = tmp_path_factory.mktemp("omnispb") / "bundle"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return ckpt, out, ids


@pytest.fixture(scope="module")
def full(omni):
    """The reference: transformers' full model, loaded by its own from_pretrained (which reads
    spk_dict.pt with torch.load(weights_only=True))."""
    import transformers as T

    return T.Qwen2_5OmniForConditionalGeneration.from_pretrained(omni[0], attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pipe(omni):
    from onnxport.runtime.tasks import open_task

    return open_task(omni[1])


def _torch_noise(seed: int):
    """token2wav's initial noise as torch draws it after manual_seed(seed)."""
    return lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def _generate(full, inputs, speaker: str, seed: int, tokens: int, codes: int):
    """transformers' generate (greedy thinker, greedy talker) on a processor batch: the thinker's
    new tokens, the talker's codes per row (cut at the first end code), the waveforms. The
    pixels go to the thinker only (passed to both, the talker's generate refuses them), the
    grids to both (the talker's positions follow the image's)."""
    captured = {}
    talker_generate = full.talker.generate

    def capture(*args, **kwargs):
        captured["codes"] = talker_generate(*args, **kwargs)
        return captured["codes"]

    kwargs = dict(inputs)
    if "pixel_values" in kwargs:
        kwargs["thinker_pixel_values"] = kwargs.pop("pixel_values")
    full.talker.generate = capture
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            sequences, waves = full.generate(**kwargs, speaker=speaker, thinker_max_new_tokens=tokens,
                                             thinker_eos_token_id=None, thinker_do_sample=False,
                                             talker_max_new_tokens=codes, talker_do_sample=False,
                                             talker_eos_token_id=END_CODES)
    finally:
        del full.talker.generate
    prompt = inputs["input_ids"].shape[1]
    rows = []
    for row in captured["codes"][:, prompt + 2:].tolist():
        rows.append(row[:next((i for i, c in enumerate(row) if c in END_CODES), len(row))])
    waves = waves if isinstance(waves, list) else [waves]
    return sequences[:, prompt:].numpy(), rows, [w.reshape(-1).numpy() for w in waves]


def test_manifest_chains_every_part(omni):
    """Five parts, every graph verified against PyTorch at two or more sizes, the any-to-any
    pipeline checked end to end at export, the speakers in safetensors (no pickle copied)."""
    _, out, _ = omni
    mf = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in mf["parts"]] == ["decoder", "vision", "audio", "talker", "token2wav"]
    assert all(p["verification"]["ok"] for p in mf["parts"])
    graphs = {g.get("name") or g["role"]: g for g in mf["graphs"]}
    for name in ("talker", "talker_embed", "dit_step", "bigvgan"):
        sizes = {json.dumps(r["sizes"], sort_keys=True) for r in graphs[name]["verification"]["results"]}
        assert graphs[name]["verification"]["ok"] and len(sizes) >= 2, name
    # the thinker's decoder graph also gives the last hidden state, verified like the logits
    decoder = graphs["decoder"]
    assert [o["name"] for o in decoder["outputs"]][:2] == ["logits", "last_hidden_state"]
    assert all(c["outputs"]["last_hidden_state"]["ok"] for c in mf["verification"]["cases"])
    pipeline = mf["pipeline"]
    assert pipeline["kind"] == "any-to-any"
    assert pipeline["graphs"] == {"embedding": "embed_tokens.onnx", "decoder": "model.onnx", "vision": "vision",
                                  "audio": "audio", "talker": "talker", "talker_embedding": "talker_embed",
                                  "dit": "dit_step", "vocoder": "bigvgan"}
    check = pipeline["verification"]
    assert check["ok"] and check["tokens_equal"] and check["codes_equal"] and check["snr_db"] >= MIN_SNR_DB, check
    assert check["codes"] >= 8 and check["log_mel_distance"] < 1e-3, check
    speakers = pipeline["config"]["speech"]["speakers"]
    assert speakers["names"] == list(SPEAKERS) and speakers["default"] == "Chelsie"
    assert (out / speakers["file"]).is_file() and not list(out.glob("*.pt"))
    # the speech modules' weights are the talker / token2wav parts', named in the decoder's record
    skipped = mf["parts"][0]["weights"]["skipped"]
    assert any(n.startswith("talker.") for n in skipped) and any(n.startswith("token2wav.") for n in skipped)


def test_codes_and_waveform_equal_transformers(omni, full, pipe):
    """Image + audio + text: the thinker's greedy tokens and the talker's greedy codes equal
    transformers' generate (row 0 of a left-padded batch: transformers keeps the attention mask,
    as Qwen's talker needs for its first step), and the waveform from the same noise is within
    MIN_SNR_DB of transformers' own; the talker's TMRoPE positions follow the image's grid."""
    ckpt, _, _ = omni
    image, clips = _image(0, 37, 53), [_clip(1, 1.0), _clip(2, 0.5)]
    texts = [_turn(f"{IMG}{AUD}what is it"), _turn(f"{AUD}hi")]
    inputs = _processor(ckpt)(text=texts, images=[image], audio=clips, padding=True, return_tensors="pt")
    assert inputs["attention_mask"][0].all() and not inputs["attention_mask"][1].all()
    tokens, codes, waves = _generate(full, inputs, "Chelsie", seed=3, tokens=6, codes=40)
    got = pipe.generate(texts[0], images=[image], audio=clips[:1], max_new_tokens=6, eos_token_id=None, speak=True,
                        speaker="Chelsie", talker_max_new_tokens=40, noise=_torch_noise(3))
    np.testing.assert_array_equal(got.tokens, tokens[0])
    assert got.codes.tolist() == codes[0] and len(codes[0]) >= 8
    snr = snr_db(got.samples, waves[0])
    print(f"\nimage+audio: {len(codes[0])} codes equal, stopped at end code: {got.stopped_at_eos}, waveform "
          f"{got.samples.size} samples, SNR {snr:.1f} dB, max|diff| {np.abs(got.samples - waves[0]).max():.2e}")
    assert got.samples.shape == waves[0].shape and snr >= MIN_SNR_DB
    assert 0.01 < float(np.sqrt(np.mean(waves[0] ** 2))) < 1  # a waveform the SNR means something for


def test_talker_stops_at_its_end_code(omni, full, pipe):
    """Audio + text, another speaker: codes equal up to the talker's end code, where both stop."""
    ckpt, _, _ = omni
    clips = [_clip(4, 0.8), _clip(5, 0.4)]
    texts = [_turn(f"{AUD}say something longer"), _turn(f"{AUD}?")]
    inputs = _processor(ckpt)(text=texts, audio=clips, padding=True, return_tensors="pt")
    tokens, codes, waves = _generate(full, inputs, "Ethan", seed=5, tokens=5, codes=120)
    got = pipe.generate(texts[0], audio=clips[:1], max_new_tokens=5, eos_token_id=None, speak=True, speaker="Ethan",
                        talker_max_new_tokens=120, noise=_torch_noise(5))
    np.testing.assert_array_equal(got.tokens, tokens[0])
    assert got.codes.tolist() == codes[0] and got.stopped_at_eos and len(codes[0]) < 120
    assert snr_db(got.samples, waves[0]) >= MIN_SNR_DB


def test_token2wav_equals_pytorch(full, pipe):
    """token2wav alone on given codes: the ODE on the host (Runge-Kutta 4, transformers' time
    points) over the DiT step graph, then BigVGAN, against PyTorch's token2wav with the same
    noise; the host's own time points equal transformers' for other settings too."""
    from onnxport.recipes.qwen2_5_omni_speech import ode_time_points
    from onnxport.runtime.tasks.omni_speech import time_points

    codes = np.random.default_rng(7).integers(0, CODEC["vocab_size"], 17)
    voice = pipe.speakers["Ethan"]
    got = pipe.token2wav(codes, "Ethan", noise=_torch_noise(11))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(11)
        ref = full.token2wav(torch.from_numpy(codes)[None], conditioning=torch.from_numpy(voice["cond"].copy())[None],
                             reference_mel=torch.from_numpy(voice["ref_mel"].copy())[None]).reshape(-1).numpy()
    snr = snr_db(got, ref)
    print(f"\ntoken2wav on 17 codes: {got.size} samples, SNR {snr:.1f} dB, max|diff| {np.abs(got - ref).max():.2e}")
    assert got.shape == ref.shape and snr >= MIN_SNR_DB
    for steps, sway in ((10, -1.0), (7, -0.5), (16, None)):
        np.testing.assert_allclose(time_points(steps, sway), ode_time_points(steps, sway).numpy(), rtol=0, atol=1e-6)


def test_bad_speaker_pickle_is_refused(omni, tmp_path):
    """A spk_dict.pt that is not tensors-only (its unpickling would run a command) is refused in
    one line, the command never runs, and nothing is written."""
    ckpt, _, _ = omni
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in ckpt.iterdir():
        if f.name != "spk_dict.pt":
            os.symlink(f, bad / f.name)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"Chelsie": {"cond": torch.zeros(COND_DIM), "ref_mel": torch.zeros(4, MEL_DIM),
                            "bos_token": 1004, "extra": Payload()}}, bad / "spk_dict.pt")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["export", str(bad), "-o", str(out), "--part", "talker"])
    assert res.exit_code != 0, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert "spk_dict.pt is not a tensors-only pickle" in res.output
    assert not marker.exists() and not out.exists()


def test_speak_and_generate_write_wavs(omni, pipe, tmp_path):
    """`onnxport speak` speaks the model's reply to the text (a chat turn); `generate --speak`
    writes the reply's speech beside the text; both WAVs read back with the wave module."""
    _, out, _ = omni
    wav = tmp_path / "reply.wav"
    res = CliRunner().invoke(app, ["speak", str(out), "--text", "good morning", "-o", str(wav), "--max-new-tokens", "6",
                                   "--max-frames", "30", "--speaker", "Ethan"])
    assert res.exit_code == 0, res.output
    expected = pipe.generate("good morning", chat=True, max_new_tokens=6, speak=True, speaker="Ethan",
                             talker_max_new_tokens=30)
    with wave.open(str(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert samples.size == expected.samples.size > 0
    assert np.abs(samples / 32767 - expected.samples).max() < 2e-4  # 16-bit rounding
    spoken = tmp_path / "gen.wav"
    res = CliRunner().invoke(app, ["generate", str(out), "-p", "good morning", "--chat", "-n", "6", "--speak",
                                   str(spoken)])
    assert res.exit_code == 0, res.output
    with wave.open(str(spoken)) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0


def test_speak_refuses_empty_text_and_unknown_speaker(omni, tmp_path):
    """Bad input to `onnxport speak` on an any-to-any bundle: one line, exit 2, no WAV."""
    _, out, _ = omni
    wav = tmp_path / "x.wav"
    for args, message in ((["--text", "  "], "the text to speak is empty"),
                          (["--text", "hi", "--speaker", "Nobody"], "no speaker 'Nobody' in the bundle")):
        res = CliRunner().invoke(app, ["speak", str(out), "-o", str(wav), *args])
        assert res.exit_code == 2 and res.output.count("error:") == 1 and message in res.output, res.output
        assert not wav.exists()


def test_verify_rechecks_the_speech_pipeline(omni, tmp_path):
    """`onnxport verify` re-runs every graph and the any-to-any check on a copy of the bundle."""
    import shutil

    shutil.copytree(omni[1], tmp_path / "b")
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    mf = json.loads((tmp_path / "b" / "manifest.json").read_text())
    check = mf["pipeline"]["verification"]
    assert check["ok"] and check["codes_equal"] and check["snr_db"] >= MIN_SNR_DB, check
    assert mf["verification"]["ok"]


def test_speakers_file_outside_the_bundle_is_refused(omni, tmp_path):
    """A manifest naming a speakers file outside the bundle is refused before it is opened."""
    import shutil

    from onnxport.errors import BundleError
    from onnxport.runtime.tasks import open_task

    bundle = tmp_path / "b"
    shutil.copytree(omni[1], bundle)
    (tmp_path / "outside.safetensors").write_bytes((bundle / "speakers.safetensors").read_bytes())
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["pipeline"]["config"]["speech"]["speakers"]["file"] = "../outside.safetensors"
    (bundle / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="outside the bundle"):
        open_task(bundle)
