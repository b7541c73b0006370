"""Image + audio + text -> text end to end in ONNX Runtime (Qwen2.5-Omni's thinker): one
`onnxport export` of a full `qwen2_5_omni` checkpoint gives the thinker's text decoder (on
inputs_embeds with TMRoPE positions) and its embedding graph, its vision tower and its audio
tower, chained by the manifest's any-to-text pipeline; the torch-free pipeline (numpy image
processor and log-mel, placeholder expansion, features placed among the token embeddings,
TMRoPE ids on the host) produces the thinker's greedy tokens for transformers' own processor
inputs."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from conftest import DEMO_DIR
from typer.testing import CliRunner

from onnxport.cli import app

SPECIAL = ["<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>", "<|VIDEO|>",
           "<|AUDIO|>", "<|im_start|>", "<|im_end|>"]
#: the tokenizer attributes Qwen2_5OmniProcessor reads
TOKENIZER_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
#: Qwen2.5-Omni's chat template, its system turn left out
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: small images for a 4-pixel patch, 2x2 merge (factor 8): the pixel limits keep grids small
IMAGES = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 16 * 16, "max_pixels": 48 * 48}
#: Whisper log-mel as Qwen2.5-Omni's processor computes it (128 bins), over 10 s windows
FEATURES = {"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 10, "n_fft": 400,
            "padding_value": 0.0, "dither": 0.0}
RATE = 16000


def _image(seed: int, h: int, w: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _clip(seed: int, seconds: float) -> np.ndarray:
    """A chirp with noise: mel frames that differ from each other."""
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * (200 + 400 * seed) * t * (1 + t)) + 0.05 * noise).astype(np.float32)


def _write_wav(path, samples: np.ndarray, rate: int = RATE) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def write_processor_files(folder) -> dict[str, int]:
    """tokenizer.json (the demo tokenizer + the Omni special tokens), tokenizer_config.json with
    the chat template, preprocessor_config.json; returns the special tokens' ids."""
    from tokenizers import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    tok.add_special_tokens(SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    cfg = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, pad_token="<|im_end|>", eos_token="<|im_end|>")
    cfg.pop("added_tokens_decoder", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
        **IMAGES, **FEATURES}))
    return ids


def media_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The thinker's (and talker's) placeholder and start / end token config fields."""
    return {"image_token_index": ids["<|IMAGE|>"], "video_token_index": ids["<|VIDEO|>"],
            "audio_token_index": ids["<|AUDIO|>"], "vision_start_token_id": ids["<|vision_bos|>"],
            "vision_end_token_id": ids["<|vision_eos|>"], "audio_start_token_id": ids["<|audio_bos|>"],
            "audio_end_token_id": ids["<|audio_eos|>"]}


def thinker_config(ids: dict[str, int]) -> dict:
    """A tiny thinker: 2-block vision tower, 2-layer audio encoder, 2-layer text decoder."""
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16, "out_hidden_size": 48,
              "fullatt_block_indexes": [1]}
    # n_window 10: 20-frame chunks, so a clip spans several chunks and a ragged tail
    audio = {"num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
             "d_model": 64, "n_window": 10, "output_dim": 48}
    text = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 96, "vocab_size": 1040, "initializer_range": 0.2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0}}
    return {"audio_config": audio, "vision_config": vision, "text_config": text, **media_token_ids(ids)}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(checkpoint, bundle, special token ids): a tiny Qwen2.5-Omni without speech output
    (enable_audio_output=False: no talker / token2wav weights), exported with every part."""
    import transformers as T

    ckpt = tmp_path_factory.mktemp("omnick") / "ckpt"
    ids = write_processor_files(ckpt)
    config = T.Qwen2_5OmniConfig(thinker_config=thinker_config(ids), enable_audio_output=False)
    torch.manual_seed(0)
    model = T.Qwen2_5OmniForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits: no greedy near-ties
        model.thinker.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(ckpt, safe_serialization=True)
    out = tmp_path_factory.mktemp("omnib") / "bundle"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return ckpt, out, ids


@pytest.fixture(scope="module")
def thinker(omni):
    """The reference: the checkpoint's thinker in PyTorch (the full class's from_pretrained
    also wants the talker's spk_dict.pt, which a model without speech output lacks)."""
    import transformers as T

    full = T.PreTrainedModel.from_pretrained.__func__(T.Qwen2_5OmniForConditionalGeneration, omni[0],
                                                      attn_implementation="eager")
    return full.thinker.eval()


@pytest.fixture(scope="module")
def pipe(omni):
    from onnxport.runtime.tasks.omni import AnyToText

    return AnyToText(omni[1])


def _processor(ckpt):
    """transformers' own Qwen2_5OmniProcessor: the PIL image processor, Whisper's feature
    extractor and the fast tokenizer."""
    import transformers as T

    tokenizer = T.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), pad_token="<|im_end|>",
                                          padding_side="left", extra_special_tokens=TOKENIZER_TOKENS)
    image_processor = T.Qwen2VLImageProcessorPil(**IMAGES)
    features = T.WhisperFeatureExtractor(**{k: v for k, v in FEATURES.items() if k != "dither"})
    # the processor also wants a video processor, which needs torchvision (not installed):
    # no videos here, so its class check is skipped
    from unittest import mock

    check = T.ProcessorMixin.check_argument_for_proper_class
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class",
                           lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        return T.Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=None,
                                      feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _hf_inputs(ckpt, texts, images=None, audio=None):
    return _processor(ckpt)(text=texts, images=images or None, audio=audio or None, padding=True,
                            return_tensors="pt")


def _hf_generate(thinker, inputs, n):
    with torch.no_grad():
        out = thinker.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


IMG = "<|vision_bos|><|IMAGE|><|vision_eos|>"
AUD = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def _turn(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def test_manifest_chains_the_parts(omni):
    _, out, ids = omni
    mf = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in mf["parts"]] == ["decoder", "vision", "audio"]
    assert mf["pipeline"]["kind"] == "any-to-text"
    assert mf["pipeline"]["graphs"] == {"embedding": "embed_tokens.onnx", "decoder": "model.onnx",
                                       "vision": "vision", "audio": "audio"}
    cfg = mf["pipeline"]["config"]
    assert cfg["audio_token_id"] == ids["<|AUDIO|>"] and cfg["position_ids"]["rule"] == "tmrope"
    assert cfg["image_processor"]["max_pixels"] == IMAGES["max_pixels"]
    assert cfg["feature_extractor"] == FEATURES
    assert all(p["verification"]["ok"] for p in mf["parts"])
    # checked end to end at export: the chain against the thinker's generate
    assert mf["pipeline"]["verification"]["ok"] and mf["pipeline"]["verification"]["tokens_equal"] == 8
    # every thinker weight is in a graph or skipped with its owner named (the encoders' weights
    # are the other parts'); checkpoint names are kept
    skipped = mf["parts"][0]["weights"]["skipped"]
    assert any(n.startswith("thinker.model.visual.") for n in skipped)
    assert all(n.startswith(("thinker.model.visual.", "thinker.model.audio_tower.")) for n in skipped)


def test_rope_index_equals_transformers(omni, thinker):
    """The numpy TMRoPE ids and deltas against the thinker's get_rope_index on a left-padded
    batch (image + audio, audio only, text only), and on an audio-only batch (transformers'
    branch without grids)."""
    from onnxport.runtime.tasks.omni import audio_token_count, rope_index

    _, _, ids = omni
    v, a = ids["<|IMAGE|>"], ids["<|AUDIO|>"]
    vs, ve, as_, ae = ids["<|vision_bos|>"], ids["<|vision_eos|>"], ids["<|audio_bos|>"], ids["<|audio_eos|>"]
    grids = [[1, 6, 8], [1, 4, 4]]
    frames = [57, 130, 33]
    na = audio_token_count(frames).tolist()
    rows = [[5, vs, *[v] * 12, ve, 9, as_, *[a] * na[0], ae, 7, vs, *[v] * 4, ve, 3],
            [8, as_, *[a] * na[1], ae, 11, as_, *[a] * na[2], ae, 2],
            [4, 5, 6]]
    kw = {"image_token_id": v, "audio_token_id": a, "vision_start_token_id": vs, "audio_start_token_id": as_,
          "spatial_merge_size": 2, "position_id_per_seconds": thinker.config.position_id_per_seconds}
    for batch, grid, lens in ((rows, grids, frames), (rows[1:], [], frames[1:])):
        longest = max(len(r) for r in batch)
        input_ids = np.zeros((len(batch), longest), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for i, r in enumerate(batch):
            input_ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
        got, delta = rope_index(input_ids, mask, grid, lens, **kw)
        ref, ref_delta = thinker.get_rope_index(torch.from_numpy(input_ids), torch.tensor(grid) if grid else None,
                                                None, torch.from_numpy(mask), audio_seqlens=torch.tensor(lens))
        np.testing.assert_array_equal(got[:, mask == 1], ref.numpy()[:, mask == 1])
        np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


@pytest.mark.parametrize("case", ["image", "audio", "image_audio"])
def test_greedy_tokens_equal_transformers(omni, thinker, pipe, case):
    """image + text, audio + text, image + audio + text: transformers' processor and the
    thinker's generate against the ONNX pipeline on the same image / samples and text."""
    ckpt, _, _ = omni
    images = [_image(0, 37, 53)] if "image" in case else []
    audio = [_clip(1, 1.37)] if "audio" in case else []
    text = _turn((IMG if images else "") + (AUD if audio else "") + "what is it")
    inputs = _hf_inputs(ckpt, [text], images, audio)
    ref = _hf_generate(thinker, inputs, 16)
    got = pipe.generate(text, images=images, audio=audio, max_new_tokens=16, eos_token_id=None)
    np.testing.assert_array_equal(got.padded, ref)
    # the pipeline's prompt is the processor's (placeholders expanded per merged patch / audio frame)
    assert pipe.prepare(text, images, audio).rows[0] == inputs["input_ids"][0].tolist()


def test_batch_of_mixed_rows(omni, thinker, pipe):
    """Left-padded batch: two clips and an image in one row, one clip in another, text alone
    in the third (three different TMRoPE deltas)."""
    ckpt, _, _ = omni
    rows = [_turn(f"{AUD} then {IMG} and {AUD}"), _turn(f"{AUD}?"), _turn("no media here, just text")]
    image, clips = _image(2, 24, 40), [_clip(2, 0.8), _clip(3, 2.3), _clip(4, 0.41)]
    inputs = _hf_inputs(ckpt, rows, [image], clips)
    ref = _hf_generate(thinker, inputs, 10)
    got = pipe.generate(rows, images=[[image], [], []], audio=[clips[:2], clips[2:], []], max_new_tokens=10,
                        eos_token_id=None)
    np.testing.assert_array_equal(got.padded, ref)


def test_chat_messages_and_cli(omni, pipe, tmp_path):
    """Chat messages render through the bundle's template; `generate --image --audio` runs
    the pipeline on the files."""
    from onnxport.runtime.audio_features import read_wav

    _, out, _ = omni
    image, clip = _image(3, 40, 40), _clip(5, 1.0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"},
                                             {"type": "text", "text": "describe"}]}]
    a = pipe.generate(messages, images=[image], audio=[clip], max_new_tokens=8, eos_token_id=None).padded
    b = pipe.generate(_turn(f"{IMG}{AUD}describe"), images=[image], audio=[clip], max_new_tokens=8,
                      eos_token_id=None).padded
    np.testing.assert_array_equal(a, b)
    img, wav = tmp_path / "x.png", tmp_path / "x.wav"
    image.save(img)
    _write_wav(wav, clip)
    samples, _ = read_wav(wav)  # the 16-bit samples the CLI reads
    expected = pipe.generate(messages, images=[image], audio=[samples], max_new_tokens=8, eos_token_id=None)
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), "--audio", str(wav), "-p", "describe",
                                   "--chat", "-n", "8"])
    assert res.exit_code == 0, res.output
    assert expected.tokens[0] and pipe.tokenizer.decode(expected.tokens[0]).rstrip("\ufffd") in res.output


@pytest.mark.parametrize("case", ["wrong_rate", "no_placeholder"])
def test_bad_audio_fails_in_one_line(omni, tmp_path, case):
    """8 kHz audio is refused (never resampled); a clip without its placeholder says so."""
    _, out, _ = omni
    wav = tmp_path / "a.wav"
    _write_wav(wav, _clip(6, 1.0)[::2], rate=8000 if case == "wrong_rate" else RATE)
    prompt = [f"{AUD}what is it"] if case == "wrong_rate" else ["just text"]
    res = CliRunner().invoke(app, ["generate", str(out), "--audio", str(wav), "-p", *prompt, "-n", "2"])
    assert res.exit_code != 0, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert ("8000 Hz" in res.output) if case == "wrong_rate" else ("audio placeholder" in res.output)


def test_speech_modules_are_skipped_by_name():
    """A checkpoint with speech output: the talker's and token2wav's weights are declared
    skipped (another part), the thinker's encoders as the vision / audio parts'. Built on the
    meta device with the default (7B) sizes: names only, no memory."""
    import transformers as T

    from onnxport.recipes import get_recipe
    from onnxport.recipes.qwen2_5_omni_thinker import OmniThinkerLM

    with torch.device("meta"):
        full = T.Qwen2_5OmniForConditionalGeneration(T.Qwen2_5OmniConfig())
    model = OmniThinkerLM(full)
    recipe = get_recipe("qwen2_5_omni", "decoder")
    names = {n for n, _ in model.named_parameters()}
    outside = {n for n in names if not n.startswith(("thinker.model.language_model.", "thinker.lm_head."))}
    skipped = recipe.skipped_weights(model, outside)
    assert set(skipped) == outside
    assert any(n.startswith("talker.") for n in skipped) and any(n.startswith("token2wav.") for n in skipped)
    assert all("speech output" in r for n, r in skipped.items() if n.startswith(("talker.", "token2wav.")))
