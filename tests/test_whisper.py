"""Whisper speech-to-text end to end: a tiny random WhisperForConditionalGeneration exported with
every part (audio encoder, cross k/v, decoder with cache), each graph verified against PyTorch,
the manifest's speech-to-text pipeline section, and the torch-free runtime's greedy tokens equal
to transformers' `generate` (language detection, language + task, timestamps and their
segments, a batch, EOS, the window loop), from raw audio, the Python API and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxport.cli import app
from onnxport.errors import BundleError, RuntimeInputError

# The vocabulary follows Whisper's layout, shrunk: text tokens, <|endoftext|>,
# <|startoftranscript|>, languages, tasks, <|startoflm|> .. <|notimestamps|>, then timestamps.
N_TEXT, N_TIMESTAMPS = 50, 30
EOT, SOT = N_TEXT, N_TEXT + 1
LANGS = {"<|en|>": N_TEXT + 2, "<|fr|>": N_TEXT + 3, "<|de|>": N_TEXT + 4}
TRANSLATE, TRANSCRIBE, START_LM, START_PREV, NO_SPEECH, NO_TIMESTAMPS = range(N_TEXT + 5, N_TEXT + 11)
VOCAB = NO_TIMESTAMPS + 1 + N_TIMESTAMPS
MAX_NEW = 20
ATOL = 1e-4  # fp32 graphs; observed max|diff| <= 1e-5
RATE = 16000


def _tokenizer():
    """Byte-level BPE over single characters (no merges) plus Whisper's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    chars = ["Ġ", *(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in alphabet)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars[:N_TEXT])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", *LANGS, "<|translate|>", "<|transcribe|>",
                            "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
                            *(f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS))])
    assert tok.token_to_id("<|notimestamps|>") == NO_TIMESTAMPS and tok.get_vocab_size() == VOCAB
    return tok


def make_whisper_checkpoint(out: Path) -> Path:
    """d_model 64, 2 + 2 layers, 80 mels, a 1 s window (100 mel frames -> 50 encoder frames)."""
    import torch
    import transformers as T

    from onnxport.testing.tiny import randomize_norms

    cfg = T.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=50, max_target_positions=64,
        vocab_size=VOCAB, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT, decoder_start_token_id=SOT,
        # spread logits: greedy argmax without near-ties (see conftest.make_tiny_checkpoint)
        init_std=0.2, suppress_tokens=None, begin_suppress_tokens=None)
    torch.manual_seed(0)
    model = T.WhisperForConditionalGeneration(cfg).eval()
    randomize_norms(model)
    with torch.no_grad():  # <|endoftext|> gets the row of a token the model emits: rows end early
        emb = model.model.decoder.embed_tokens.weight
        emb[[EOT, 42]] = emb[[42, EOT]].clone()
    model.generation_config = T.GenerationConfig(
        decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT, max_length=40,
        no_timestamps_token_id=NO_TIMESTAMPS, suppress_tokens=[3, START_LM, START_PREV, NO_SPEECH],
        begin_suppress_tokens=[0, EOT], lang_to_id=LANGS, task_to_id={"translate": TRANSLATE, "transcribe": TRANSCRIBE},
        is_multilingual=True, max_initial_timestamp_index=5, forced_decoder_ids=[[1, None], [2, TRANSCRIBE]])
    model.save_pretrained(out)
    T.WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out)
    _tokenizer().save(str(out / "tokenizer.json"))
    return out


def random_audios() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(12000) * 0.1).astype(np.float32)
    tone = (np.sin(np.arange(RATE) * 0.05) * 0.3 + rng.standard_normal(RATE) * 0.02).astype(np.float32)
    return [noise, tone]


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    ints = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1 if ints.ndim == 1 else ints.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(ints.tobytes())
    return path


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """(checkpoint, bundle, manifest dict): exported once for the module."""
    from onnxport.api import export
    from onnxport.config import ExportConfig

    root = tmp_path_factory.mktemp("whisper")
    ckpt = make_whisper_checkpoint(root / "ckpt")
    manifest = export(ckpt, root / "bundle", ExportConfig())
    return ckpt, root / "bundle", manifest.to_dict()


@pytest.fixture(scope="module")
def reference(whisper):
    """transformers' generate on transformers' features of the same audio."""
    import torch
    import transformers as T

    ckpt = whisper[0]
    model = T.WhisperForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    extractor = T.WhisperFeatureExtractor.from_pretrained(ckpt)

    def generate(audios: list[np.ndarray], **kw):
        features = extractor(audios, sampling_rate=RATE, return_tensors="pt").input_features
        with torch.no_grad():
            return model.generate(features, max_new_tokens=MAX_NEW, **kw)

    return generate


@pytest.fixture(scope="module")
def stt(whisper):
    from onnxport.runtime.tasks import open_task

    return open_task(whisper[1])


def assert_tokens_equal(ours: list[list[int]], sequences) -> None:
    """transformers pads the shorter rows of a batch with pad (= end-of-text) on the right."""
    for row, ref in zip(ours, sequences.tolist()):
        assert ref[: len(row)] == row and all(t == EOT for t in ref[len(row):]), (row, ref)


# --- export ---------------------------------------------------------------------------------------

def test_every_graph_verified_at_several_sizes(whisper):
    _, bundle, mf = whisper
    assert mf["layout"]["kind"] == "modules" and mf["onnxport_task"] == "automatic-speech-recognition"
    assert mf["verification"]["ok"] and {p["name"] for p in mf["parts"]} == {"audio", "decoder"}
    graphs = {g["name"]: g for g in mf["graphs"]}
    assert set(graphs) == {"audio", "cross_kv", "decoder"}
    for g in graphs.values():
        assert (bundle / g["file"]).is_file() and g["verification"]["ok"]
        for r in g["verification"]["results"]:
            assert r["ok"] and r["max_abs_diff"] <= ATOL and r["cosine"] > 0.9999, (g["name"], r)
    sizes = [r["sizes"] for r in graphs["decoder"]["verification"]["results"]]
    assert {s["past_sequence_length"] > 0 for s in sizes} == {False, True} and {s["batch_size"] for s in sizes} == {1, 2}
    assert {s["batch_size"] for s in (r["sizes"] for r in graphs["cross_kv"]["verification"]["results"])} == {1, 2}
    dims = {io["name"]: io["dims"] for g in graphs.values() for io in g["inputs"] + g["outputs"]}
    assert dims["input_features"] == ["batch_size", 80, 100]
    assert dims["cross.1.value"] == ["batch_size", 4, 50, 16]
    assert dims["past_key_values.0.key"] == ["batch_size", 4, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", 4, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", VOCAB]
    # the decoder reads the cross k/v as inputs: their projections live in cross_kv.onnx
    assert graphs["cross_kv"]["weights"]["not_read"] == [] and graphs["audio"]["weights"]["not_read"] == []
    assert graphs["decoder"]["weights"]["not_read"] == [f"decoder.layers.{i}.encoder_attn.{w}_proj.weight"
                                                        for i in range(2) for w in ("k", "v")]


def test_manifest_pipeline_section(whisper):
    from onnxport.bundle import read_manifest

    _, bundle, mf = whisper
    pipe = read_manifest(bundle).pipeline
    assert pipe.kind == "speech-to-text"
    assert pipe.graphs == {"audio": "audio", "cross_kv": "cross_kv", "decoder": "decoder"}
    c = pipe.config
    assert (c["decoder_start_token_id"], c["no_timestamps_token_id"], c["eos_token_id"]) == (SOT, NO_TIMESTAMPS, EOT)
    assert c["suppress_tokens"] == [3, START_LM, START_PREV, NO_SPEECH] and c["begin_suppress_tokens"] == [0, EOT]
    assert c["lang_to_id"] == LANGS and c["task_to_id"]["translate"] == TRANSLATE
    assert c["forced_decoder_ids"] == [[1, None], [2, TRANSCRIBE]]
    assert c["language_codes"] == {"english": "en", "french": "fr", "german": "de"}
    assert (c["max_target_positions"], c["max_length"], c["num_frames"], c["input_stride"]) == (64, 40, 100, 2)
    for f in ("preprocessor_config.json", "generation_config.json", "tokenizer.json"):
        assert f in mf["source"]["files"] and (bundle / f).is_file()


def test_pipeline_needs_every_graph_it_chains():
    from onnxport.bundle import Graph, Pipeline
    from onnxport.bundle.assemble import complete_pipeline

    class Manifest:
        graphs = [Graph("decoder", "decoder.onnx", name="decoder"), Graph("encoder", "cross_kv.onnx", name="cross_kv")]

    pipe = Pipeline("speech-to-text", {"audio": "audio", "cross_kv": "cross_kv", "decoder": "decoder"})
    assert complete_pipeline([None, pipe], Manifest()) is None  # exported with --part decoder
    Manifest.graphs.append(Graph("encoder", "audio.onnx", name="audio"))
    assert complete_pipeline([None, pipe], Manifest()) is pipe


def test_reverify_bundle(whisper):
    from onnxport.api import verify

    mf = verify(whisper[1])
    assert mf.verification["ok"] and all(g.verification["ok"] for g in mf.graphs)


# --- greedy parity --------------------------------------------------------------------------------

@pytest.mark.parametrize("audio", [0, 1])
def test_each_audio_equals_transformers(audio, stt, reference):
    """Language detection (no language given) and the forced prompt, one audio at a time."""
    wave_ = random_audios()[audio]
    ours = stt.generate(wave_, max_new_tokens=MAX_NEW)
    assert ours.prompts[0][0] == SOT and ours.prompts[0][1] in LANGS.values()
    assert ours.prompts[0][2:] == [TRANSCRIBE, NO_TIMESTAMPS] and ours.languages[0] in LANGS
    assert_tokens_equal(ours.tokens, reference([wave_]))
    assert ours.text == stt.tokenizer.decode([t for t in ours.tokens[0] if t < NO_TIMESTAMPS])


@pytest.mark.parametrize("kw", [{}, {"language": "fr", "task": "translate"}, {"language": "german"},
                                {"return_timestamps": True}], ids=["detect", "fr-translate", "german", "timestamps"])
def test_batch_equals_transformers(kw, stt, reference):
    audios = random_audios()
    ours = stt.generate(audios, max_new_tokens=MAX_NEW, **kw)
    if not kw.get("return_timestamps"):
        assert_tokens_equal(ours.tokens, reference(audios, **kw))
        return
    ref = reference(audios, return_segments=True, **kw)
    assert_tokens_equal(ours.tokens, ref["sequences"])
    for row, ref_row in zip(ours.segments, ref["segments"]):
        assert [(s["start"], s["end"], s["tokens"]) for s in row] == [
            (float(s["start"]), float(s["end"]), s["tokens"].tolist()) for s in ref_row]
    assert ours.prompts[0][-1] != NO_TIMESTAMPS and any(t > NO_TIMESTAMPS for t in ours.tokens[0])
    # end-of-text stopped the first audio early: the EOS path is exercised
    assert len(ours.tokens[0]) < MAX_NEW


def test_without_max_new_tokens_follows_generates_length_rule(stt, whisper):
    """No max_new_tokens: generate's max_length (+ the prompt, capped at the model's
    positions) bounds each window, as on a real checkpoint (max_length 448 = the positions);
    detection, the forced prompt and both suppress lists as before."""
    import torch
    import transformers as T

    model = T.WhisperForConditionalGeneration.from_pretrained(whisper[0], attn_implementation="eager").eval()
    extractor = T.WhisperFeatureExtractor.from_pretrained(whisper[0])
    audios = random_audios()
    features = extractor(audios, sampling_rate=RATE, return_tensors="pt").input_features
    with torch.no_grad():
        ref = model.generate(features)
    ours = stt.generate(audios)
    assert_tokens_equal(ours.tokens, ref)
    assert max(len(t) for t in ours.tokens) > MAX_NEW  # past the other tests' limit


def test_saved_language_and_task_of_a_fine_tuned_checkpoint(whisper, tmp_path):
    """A checkpoint whose generation config saved language / task (the usual result of
    fine-tuning): the export records them and the runtime uses them when none is given, as
    transformers' generate does; an explicit language still wins."""
    import torch
    import transformers as T

    from onnxport.recipes.whisper import speech_to_text_config
    from onnxport.runtime.tasks import open_task

    model = T.WhisperForConditionalGeneration.from_pretrained(whisper[0], attn_implementation="eager").eval()
    model.generation_config.language, model.generation_config.task = "fr", "translate"
    config = speech_to_text_config(model)
    assert (config["language"], config["task"]) == ("fr", "translate")
    bundle = tmp_path / "b"
    shutil.copytree(whisper[1], bundle)
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["pipeline"]["config"].update(language="fr", task="translate")
    (bundle / "manifest.json").write_text(json.dumps(mf))
    extractor = T.WhisperFeatureExtractor.from_pretrained(whisper[0])
    audios = random_audios()
    features = extractor(audios, sampling_rate=RATE, return_tensors="pt").input_features
    stt = open_task(bundle)
    with torch.no_grad():
        ref = model.generate(features, max_new_tokens=MAX_NEW)
        ref_de = model.generate(features, max_new_tokens=MAX_NEW, language="de")
    ours = stt.generate(audios, max_new_tokens=MAX_NEW)
    assert ours.prompts[0][:3] == [SOT, LANGS["<|fr|>"], TRANSLATE]
    assert_tokens_equal(ours.tokens, ref)
    assert_tokens_equal(stt.generate(audios, max_new_tokens=MAX_NEW, language="de").tokens, ref_de)


def test_runtime_input_errors(stt):
    noise = random_audios()[0]
    for kw, needle in [({"language": "xx"}, "not one of this model's"), ({"task": "summarize"}, "unknown task"),
                       ({"max_new_tokens": 61}, "decoder positions"), ({"sampling_rate": 8000}, "8000 Hz")]:
        with pytest.raises(RuntimeInputError, match=needle):
            stt.generate(noise, **kw)
    with pytest.raises(RuntimeInputError, match="channels"):
        stt.generate(np.stack([noise, noise], axis=1))


def test_runtime_runs_without_torch(whisper, tmp_path):
    wav = write_wav(tmp_path / "clip.wav", random_audios()[1])
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'transformers'):\n"
        "        raise ImportError('runtime must not import ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from onnxport.runtime.tasks import open_task\n"
        f"r = open_task({str(whisper[1])!r}).generate({str(wav)!r}, max_new_tokens=8)\n"
        "assert r.tokens[0] and isinstance(r.text, str), r\n"
        "print(r.text)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CLI ------------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_transcribes_wav(whisper, stt, tmp_path):
    wavs = [write_wav(tmp_path / f"clip{i}.wav", a) for i, a in enumerate(random_audios())]
    res = run("generate", whisper[1], "--audio", wavs[0], "--audio", wavs[1], "-n", MAX_NEW)
    assert res.exit_code == 0, res.output
    want = stt.generate(wavs, max_new_tokens=MAX_NEW).texts
    assert all(want) and res.stdout.splitlines()[:2] == want


def test_cli_language_and_task(whisper, stt, tmp_path):
    wav = write_wav(tmp_path / "clip.wav", random_audios()[1])
    res = run("generate", whisper[1], "--audio", wav, "-n", MAX_NEW, "--language", "french", "--task", "translate")
    assert res.exit_code == 0, res.output
    want = stt.generate([wav], max_new_tokens=MAX_NEW, language="fr", task="translate")
    assert want.prompts[0][:3] == [SOT, LANGS["<|fr|>"], TRANSLATE]
    assert res.stdout.splitlines()[0] == want.texts[0]
    res = run("generate", whisper[1], "--audio", wav, "--language", "klingon")
    assert res.exit_code == 2 and "not one of this model's" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("case", ["rate", "stereo", "missing", "with-prompt", "no-pipeline"])
def test_cli_bad_audio_is_one_line(case, whisper, tmp_path):
    bundle, wav = whisper[1], tmp_path / "clip.wav"
    noise = random_audios()[0]
    args, needle = ["--audio", wav], None
    if case == "rate":
        write_wav(wav, noise, rate=8000)
        needle = "8000 Hz"
    elif case == "stereo":
        write_wav(wav, np.stack([noise, noise], axis=1))
        needle = "2 channels"
    elif case == "missing":
        needle = "no such file"
    elif case == "with-prompt":
        write_wav(wav, noise)
        args, needle = [*args, "-p", "hello"], "not both"
    else:  # a bundle without the pipeline section
        shutil.copytree(whisper[1], tmp_path / "b")
        mf = json.loads((tmp_path / "b" / "manifest.json").read_text())
        del mf["pipeline"]
        (tmp_path / "b" / "manifest.json").write_text(json.dumps(mf))
        bundle, needle = tmp_path / "b", "no pipeline section"
        write_wav(wav, noise)
    res = run("generate", bundle, *args)
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), res.output
    assert needle in lines[0], res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    if case == "no-pipeline":
        from onnxport.runtime.tasks import open_task

        with pytest.raises(BundleError):
            open_task(bundle)
