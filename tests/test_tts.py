"""Text to speech end to end (ChatTTS / MiniCPM-o TTS structure): a tiny `chattts` checkpoint
(Llama talker hidden 64 x 2 layers, num_vq 4 codebooks of 9 codes + EOS, GFSQ DVAE, Vocos head)
written with `save_pretrained`, exported once with `onnxport export`, every graph verified against
PyTorch; the torch-free runner's audio codes equal the PyTorch reference loop's exactly (default
speaker, a given speaker, LLM-hidden-state conditioning, EOS and max-frames stops), its waveform
from the same codes within 40 dB SNR of PyTorch's, the manifest's fidelity report, `onnxport
speak` writing a readable WAV, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.errors import CheckpointError, RuntimeInputError

DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "onnxport" / "demo_model"
TEXT = "The assert statement checks a condition."
#: fp32 graphs; observed max|diff| <= 3e-6 (talker hidden states 1.7e-6, waveform 2.7e-6)
ATOL = 1e-4
MIN_SNR_DB = 40.0
MAX_FRAMES = 64
GRAPHS = {"condition", "embed_text", "embed_codes", "talker", "code_heads", "dvae_decoder", "vocoder"}


def make_chattts_checkpoint(out: Path) -> Path:
    """The demo tokenizer plus ChatTTS' prompt tokens; weights ~N(0, 0.2) (norms ~1) so that
    greedy choices have clear margins; the EOS rows of the code heads scaled down (weight-norm
    gain x 0.3) so the greedy utterance runs ~50 frames before EOS instead of stopping at once."""
    from tokenizers import Tokenizer

    from onnxport.recipes.chattts_model import ChatTTSConfig, ChatTTSModel

    out.mkdir(parents=True)
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    tok.add_special_tokens(["[Stts]", "[Ptts]", "[audio_bos]"])
    tok.save(str(out / "tokenizer.json"))
    shutil.copy(DEMO_DIR / "tokenizer_config.json", out / "tokenizer_config.json")
    cfg = ChatTTSConfig(
        num_text_tokens=tok.get_vocab_size(), num_audio_tokens=10, num_vq=4, spk_emb_dim=48, num_spk_embs=1,
        audio_bos_token_id=tok.token_to_id("[audio_bos]"), min_new_token=4, max_new_token=MAX_FRAMES,
        sample_rate=16000,
        talker=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0),
        dvae=dict(levels=[3, 3], groups=2, residuals=2, dim=32, bn_dim=16, hidden=32, n_layer=2, kernel=7,
                  dilation=2, num_mels=16),
        vocos=dict(dim=32, intermediate_dim=64, num_layers=2, n_fft=32, hop_length=8))
    torch.manual_seed(0)
    model = ChatTTSModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, base = (0.1, 1.0) if name.endswith("norm.weight") else (0.2, 0.0)
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
        model.spk_stat.copy_(torch.stack([torch.randn(48, generator=g), torch.rand(48, generator=g)]))
        for head in model.head_code:
            head.parametrizations.weight.original0[cfg.audio_eos] *= 0.3
    return model.save_pretrained(out)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    """(checkpoint, bundle, the PyTorch model loaded from the checkpoint), exported once through
    the CLI."""
    from onnxport.checkpoint import open_checkpoint
    from onnxport.recipes.chattts_model import load_chattts

    root = tmp_path_factory.mktemp("tts")
    ckpt = make_chattts_checkpoint(root / "ckpt")
    res = run("export", ckpt, "-o", root / "bundle")
    assert res.exit_code == 0, res.output
    return ckpt, root / "bundle", load_chattts(open_checkpoint(ckpt))


@pytest.fixture(scope="module")
def runner(tts):
    from onnxport.runtime.tasks import open_task

    return open_task(tts[1])


def reference_ids(ckpt: Path, text: str) -> list[int]:
    """The prompt the PyTorch side builds: template, tokenized with the checkpoint's own
    tokenizer by transformers (not the runtime's code), then audio_bos."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((ckpt / "config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    return tok(cfg["text_template"].replace("{text}", text), add_special_tokens=False)["input_ids"] + [
        cfg["audio_bos_token_id"]]


def snr_db(actual: np.ndarray, expected: np.ndarray) -> float:
    noise = float(np.sum((actual.astype(np.float64) - expected) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(expected.astype(np.float64) ** 2)) / noise)


# --- export -----------------------------------------------------------------------------------------

def test_every_graph_is_verified_at_several_sizes(tts):
    manifest = json.loads((tts[1] / "manifest.json").read_text())
    assert manifest["onnxport_task"] == "text-to-speech"
    assert [(p["name"], p["verification"]["ok"]) for p in manifest["parts"]] == [("talker", True), ("codec", True)]
    graphs = {g["name"]: g for g in manifest["graphs"]}
    assert set(graphs) == GRAPHS
    for name, g in graphs.items():
        results = g["verification"]["results"]
        assert len({json.dumps(r["sizes"], sort_keys=True) for r in results}) >= 2, name
        for r in results:
            assert r["ok"] and r["max_abs_diff"] <= ATOL and r["cosine"] > 0.9999, (name, r)
        # ChatTTS' FSQ encode-side projections are the only weights no decode graph reads
        want = ([f"vq_layer.quantizer.rvqs.{i}.project_in.{w}" for i in (0, 1) for w in ("bias", "weight")]
                if name == "dvae_decoder" else [])
        assert sorted(g["weights"]["not_read"]) == want, name
    # the talker is checked against LlamaModel with a real cache, empty and not
    pasts = {r["sizes"]["past_sequence_length"] for r in graphs["talker"]["verification"]["results"]}
    assert 0 in pasts and len(pasts) >= 2
    assert graphs["dvae_decoder"]["patches"] == ["get_at_as_gather"]
    assert graphs["vocoder"]["patches"] == ["istft_as_conv"]
    dims = {(name, io["name"]): io["dims"] for name, g in graphs.items() for io in g["inputs"] + g["outputs"]}
    for key, want in {
        ("condition", "spk_emb"): ["batch_size", "condition_length", 48],
        ("embed_codes", "audio_codes"): ["batch_size", "sequence_length", 4],
        ("talker", "inputs_embeds"): ["batch_size", "sequence_length", 64],
        ("talker", "attention_mask"): ["batch_size", "total_sequence_length"],
        ("talker", "past_key_values.1.value"): ["batch_size", 2, "past_sequence_length", 16],
        ("talker", "present.1.value"): ["batch_size", 2, "total_sequence_length", 16],
        ("code_heads", "logits"): ["batch_size", "sequence_length", 4, 10],
        ("dvae_decoder", "audio_codes"): ["batch_size", 4, "num_codes"],
        ("dvae_decoder", "mel"): ["batch_size", 16, "mel_frames"],
        ("vocoder", "waveform"): ["batch_size", "audio_length"],
    }.items():
        assert dims[key] == want, key


def test_verify_rechecks_every_graph_and_keeps_the_pipeline(tts, tmp_path):
    shutil.copytree(tts[1], tmp_path / "b")
    res = run("verify", tmp_path / "b")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["verification"] == {"ok": True, "graphs": sorted(GRAPHS, key=[g["name"] for g in
                                                                                 manifest["graphs"]].index)}
    before = json.loads((tts[1] / "manifest.json").read_text())["pipeline"]
    # verify re-ran the end-to-end check: the same record but for the time it took
    timed = ("runtime_seconds",)
    after = manifest["pipeline"]
    assert {k: v for k, v in after.items() if k != "verification"} == {k: v for k, v in before.items()
                                                                        if k != "verification"}
    assert {k: v for k, v in after["verification"].items() if k not in timed} == \
        {k: v for k, v in before["verification"].items() if k not in timed}
    assert after["verification"]["ok"] and after["verification"]["runtime_seconds"] > 0


def test_manifest_fidelity_report(tts):
    manifest = json.loads((tts[1] / "manifest.json").read_text())
    pipe = manifest["pipeline"]
    assert pipe["kind"] == "text-to-speech" and set(pipe["graphs"]) == GRAPHS
    c = pipe["config"]
    assert (c["num_vq"], c["audio_eos_token_id"], c["sample_rate"], c["hop_length"]) == (4, 9, 16000, 8)
    assert len(c["speaker"]["default"]) == c["speaker"]["dim"] == 48
    v = pipe["verification"]
    print(f"export-time check: {v['frames']} frames, SNR {v['snr_db']} dB, log-mel distance {v['log_mel_distance']}, "
          f"max|diff| {v['max_abs_diff']:.2e}")
    assert v["ok"] and v["codes_equal"] and v["stopped_at_eos"] and v["frames"] > 10
    assert v["snr_db"] >= MIN_SNR_DB and v["log_mel_distance"] < 1e-3 and v["mel_max_abs_diff"] < ATOL


# --- the runtime against the PyTorch reference --------------------------------------------------------

@pytest.mark.parametrize("case", ["default-speaker", "speaker", "llm-hidden-states", "no-min-frames", "max-frames"])
def test_codes_equal_pytorch_reference_loop(case, tts, runner):
    ckpt, _, model = tts
    text = TEXT if case != "no-min-frames" else "Short."
    ids = reference_ids(ckpt, text)
    g = np.random.default_rng(1)
    spk = {"speaker": g.standard_normal(48), "llm-hidden-states": g.standard_normal((3, 48))}.get(case)
    spk = None if spk is None else spk.astype(np.float32)
    kw = {"max-frames": {"max_frames": 7}, "no-min-frames": {"min_frames": 0}}.get(case, {})
    codes, prompt, stopped = runner.generate_codes(text, spk, **kw)
    assert prompt == ids
    want = model.generate_codes(torch.tensor([ids]), None if spk is None else torch.from_numpy(spk),
                                max_frames=kw.get("max_frames", MAX_FRAMES), min_frames=kw.get("min_frames")).numpy()
    np.testing.assert_array_equal(codes, want)
    assert codes.dtype == np.int64 and codes.shape[1] == 4 and 0 <= codes.min() and codes.max() < 9
    if case == "max-frames":
        assert len(codes) == 7 and not stopped
    else:
        assert stopped and len(codes) < MAX_FRAMES
        assert len(codes) >= (0 if case == "no-min-frames" else 4)
    if case == "default-speaker":
        assert len(codes) > 20  # a real utterance, not an immediate stop


def test_waveform_snr_against_pytorch(tts, runner):
    model = tts[2]
    speech = runner.generate(TEXT)
    mel, wave_ref = model.decode_waveform(torch.from_numpy(np.ascontiguousarray(speech.codes.T[None])))
    wave_ref = wave_ref[0].numpy()
    assert speech.samples.dtype == np.float32 and speech.samples.shape == wave_ref.shape
    assert speech.samples.size == 8 * (2 * len(speech.codes) - 1)  # hop * (mel frames - 1)
    snr = snr_db(speech.samples, wave_ref)
    print(f"waveform SNR {snr:.1f} dB over {speech.samples.size} samples ({len(speech.codes)} frames), "
          f"max|diff| {np.abs(speech.samples - wave_ref).max():.2e}; talker {speech.talker_seconds * 1000:.0f} ms, "
          f"decode {speech.decode_seconds * 1000:.0f} ms")
    assert snr >= MIN_SNR_DB
    np.testing.assert_allclose(runner.mel(speech.codes), mel[0].numpy(), rtol=0, atol=ATOL)
    assert np.abs(wave_ref).max() > 0.05  # not a silent waveform that any graph would match


def test_sampling_is_seeded(runner):
    a = runner.generate_codes(TEXT, max_frames=12, do_sample=True, seed=3)[0]
    b = runner.generate_codes(TEXT, max_frames=12, do_sample=True, seed=3)[0]
    c = runner.generate_codes(TEXT, max_frames=12, do_sample=True, seed=4, temperature=1.5, top_k=0, top_p=1.0)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(c) == 0 or (c.min() >= 0 and c.max() < 9)


def test_runtime_bad_inputs_are_one_line(runner):
    for text in ("", "   \n"):
        with pytest.raises(RuntimeInputError, match="empty"):
            runner.generate(text)
    with pytest.raises(RuntimeInputError, match="width 48"):
        runner.generate(TEXT, spk_emb=np.zeros(12, dtype=np.float32))
    with pytest.raises(RuntimeInputError, match="positions"):
        runner.generate(TEXT, max_frames=10_000)
    with pytest.raises(RuntimeInputError, match="outside the codebook"):
        runner.decode(np.full((3, 4), 9))
    with pytest.raises(RuntimeInputError, match="vocabulary"):
        runner.generate([10**6])


def test_checkpoint_must_match_the_model(tts, tmp_path):
    """A tensor missing from the checkpoint is an error naming it, never a random weight."""
    from safetensors.torch import load_file, save_file

    from onnxport.checkpoint import open_checkpoint
    from onnxport.recipes.chattts_model import load_chattts

    shutil.copytree(tts[0], tmp_path / "c")
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    del state["emb_code.2.weight"]
    save_file(state, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="emb_code.2.weight"):
        load_chattts(open_checkpoint(tmp_path / "c"))


def test_runner_works_without_torch(tts, tmp_path):
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'transformers'):\n"
        "        raise ImportError('runtime must not import ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from onnxport.runtime.tasks import open_task\n"
        "from onnxport.runtime.tasks.text_to_speech import write_wav\n"
        f"s = open_task({str(tts[1])!r}).generate({TEXT!r})\n"
        "assert s.stopped_at_eos and s.samples.size > 0, s\n"
        f"write_wav({str(tmp_path / 'x.wav')!r}, s.samples, s.sample_rate)\n"
        "print(len(s.codes))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert int(res.stdout.strip()) > 20


# --- CLI ------------------------------------------------------------------------------------------

def test_speak_writes_a_readable_wav(tts, runner, tmp_path):
    out = tmp_path / "hello.wav"
    res = run("speak", tts[1], "--text", TEXT, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stdout
    speech = runner.generate(TEXT)
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert pcm.size == speech.samples.size
    np.testing.assert_array_equal(pcm, np.round(np.clip(speech.samples, -1, 1) * 32767).astype("<i2"))
    # --max-frames cuts the utterance, --seed samples; an existing file needs --force
    res = run("speak", tts[1], "--text", TEXT, "-o", out, "--max-frames", 5, "--seed", 7, "--force")
    assert res.exit_code == 0 and "stopped at --max-frames" in res.stdout, res.output
    with wave.open(str(out), "rb") as w:
        assert w.getnframes() == 8 * (2 * 5 - 1)


@pytest.mark.parametrize("case", ["empty-text", "exists", "no-pipeline", "not-a-bundle", "max-frames"])
def test_speak_bad_input_is_one_line(case, tts, tmp_path):
    bundle, out, extra = tts[1], tmp_path / "o.wav", []
    text, needle = TEXT, None
    if case == "empty-text":
        text, needle = " ", "empty"
    elif case == "exists":
        out.write_bytes(b"keep me")
        needle = "already exists"
    elif case == "no-pipeline":  # e.g. exported with --part codec: nothing chains the graphs
        shutil.copytree(bundle, tmp_path / "b")
        mf = json.loads((tmp_path / "b" / "manifest.json").read_text())
        del mf["pipeline"]
        (tmp_path / "b" / "manifest.json").write_text(json.dumps(mf))
        bundle, needle = tmp_path / "b", "has no pipeline section"
    elif case == "not-a-bundle":
        bundle, needle = tts[0], "not an onnxport bundle"
    else:
        extra, needle = ["--max-frames", 0], "max_frames"
    res = run("speak", bundle, "--text", text, "-o", out, *extra)
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), res.output
    assert needle in lines[0], res.output
    assert out.read_bytes() == b"keep me" if case == "exists" else not out.exists()
