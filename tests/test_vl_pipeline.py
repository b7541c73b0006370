"""Image + text -> text end to end in ONNX Runtime (Qwen2.5-VL): one `onnxport export` gives the
vision tower, the text decoder on inputs_embeds with mrope positions, and its embedding graph,
chained by the manifest's pipeline section; the torch-free pipeline (numpy image processor,
placeholder expansion, features placed among the token embeddings, mrope ids on the host)
produces transformers' greedy tokens for transformers' own processor inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import DEMO_DIR
from typer.testing import CliRunner

from onnxport.cli import app

SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: small images for a 4-pixel patch, 2x2 merge (factor 8): the pixel limits keep grids small
PROCESSOR = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 16 * 16,
             "max_pixels": 48 * 48}


def _image(seed: int, h: int, w: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """(checkpoint, bundle, special token ids): a tiny Qwen2.5-VL whose tokenizer has the image
    tokens, exported with every part."""
    import transformers as T
    from tokenizers import Tokenizer

    ckpt = tmp_path_factory.mktemp("vlck") / "ckpt"
    ckpt.mkdir()
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    tok.add_special_tokens(SPECIAL)
    tok.save(str(ckpt / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    cfg = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, pad_token="<|im_end|>", eos_token="<|im_end|>")
    cfg.pop("added_tokens_decoder", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor",
                                                               **PROCESSOR}))
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=16, out_hidden_size=48, fullatt_block_indexes=[1])
    text = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=1040, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})
    config = T.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                                video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = T.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits: no greedy near-ties
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(ckpt, safe_serialization=True)
    out = tmp_path_factory.mktemp("vlb") / "bundle"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return ckpt, out, ids


def _hf_inputs(ckpt, texts, images):
    """transformers' own processor: the PIL image processor and the fast tokenizer."""
    import transformers as T

    tokenizer = T.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), pad_token="<|im_end|>",
                                          padding_side="left")
    tokenizer.image_token = "<|image_pad|>"
    image_processor = T.Qwen2VLImageProcessorPil(**PROCESSOR)
    image_processor.merge_size = PROCESSOR["merge_size"]
    # the processor also wants a video processor, which needs torchvision (not installed):
    # images only here, so its class check is skipped
    from unittest import mock

    check = T.ProcessorMixin.check_argument_for_proper_class
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class",
                           lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        processor = T.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)
    return processor(text=texts, images=images, padding=True, return_tensors="pt", return_mm_token_type_ids=True)


def _hf_generate(ckpt, inputs, n):
    import transformers as T

    model = T.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def test_manifest_chains_the_parts(vl):
    _, out, ids = vl
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["pipeline"]["kind"] == "image-text-to-text"
    assert mf["pipeline"]["graphs"] == {"embedding": "embed_tokens.onnx", "decoder": "model.onnx", "vision": "vision"}
    cfg = mf["pipeline"]["config"]
    assert cfg["image_token_id"] == ids["<|image_pad|>"] and cfg["position_ids"]["rule"] == "mrope"
    assert cfg["image_processor"]["max_pixels"] == PROCESSOR["max_pixels"]
    assert all(p["verification"]["ok"] for p in mf["parts"])
    # checked end to end at export: the chain against transformers' generate
    assert mf["pipeline"]["verification"]["ok"] and mf["pipeline"]["verification"]["tokens_equal"] == 8


def test_one_image_greedy_tokens_equal_transformers(vl):
    from onnxport.runtime.tasks.image_text_to_text import ImageTextToText

    ckpt, out, _ = vl
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it<|im_end|>\n<|im_start|>assistant\n"
    image = _image(0, 37, 53)
    inputs = _hf_inputs(ckpt, [text], [image])
    ref = _hf_generate(ckpt, inputs, 16)
    pipe = ImageTextToText(out)
    got = pipe.generate(text, images=[image], max_new_tokens=16, eos_token_id=None)
    np.testing.assert_array_equal(got.padded, ref)
    # the pipeline's prompt is the processor's (placeholder expanded per merged patch)
    rows = pipe._expand(pipe.prompt_ids(text), [list(g) for g in inputs["image_grid_thw"].tolist()])
    assert rows == inputs["input_ids"][0].tolist()


def test_batch_of_two_images_and_text_only_row(vl):
    """Left-padded batch: two images in one row, none in the other (different mrope deltas)."""
    from onnxport.runtime.tasks.image_text_to_text import ImageTextToText

    ckpt, out, _ = vl
    two = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|> and "
           "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    plain = "<|im_start|>user\nno picture here, just text<|im_end|>\n<|im_start|>assistant\n"
    images = [_image(1, 24, 40), _image(2, 48, 20)]
    inputs = _hf_inputs(ckpt, [two, plain], images)
    ref = _hf_generate(ckpt, inputs, 12)
    got = ImageTextToText(out).generate([two, plain], images=[images, []], max_new_tokens=12, eos_token_id=None)
    np.testing.assert_array_equal(got.padded, ref)


def test_chat_messages_and_cli(vl, tmp_path):
    """Chat messages render through the bundle's template; `generate --image` runs the pipeline."""
    from onnxport.runtime.tasks.image_text_to_text import ImageTextToText

    ckpt, out, _ = vl
    image = _image(3, 40, 40)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe<|im_end|>\n"
            "<|im_start|>assistant\n")
    pipe = ImageTextToText(out)
    a = pipe.generate(messages, images=[image], max_new_tokens=8, eos_token_id=None).padded
    b = pipe.generate(text, images=[image], max_new_tokens=8, eos_token_id=None).padded
    np.testing.assert_array_equal(a, b)
    path = tmp_path / "x.png"
    image.save(path)
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(path), "-p", "describe", "--chat", "-n", "8"])
    assert res.exit_code == 0, res.output
    assert pipe.tokenizer.decode(a[0].tolist()).rstrip("\ufffd") in res.output


@pytest.mark.parametrize("case", ["no_placeholder", "too_many_placeholders", "not_an_image"])
def test_bad_image_inputs_fail_in_one_line(vl, tmp_path, case):
    ckpt, out, _ = vl
    img = tmp_path / "a.png"
    _image(4, 30, 30).save(img)
    if case == "not_an_image":
        img.write_bytes(b"definitely not a png")
        args = ["-p", "describe", "--chat"]
    elif case == "no_placeholder":
        args = ["-p", "just text without the image tag"]
    else:
        args = ["-p", "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"]
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), *args, "-n", "2"])
    assert res.exit_code != 0, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output


def test_text_bundle_rejects_an_image(vl, tmp_path):
    """--part decoder: no vision graph, so no pipeline: --image says so in one line."""
    ckpt, _, _ = vl
    out = tmp_path / "text"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out), "--part", "decoder"])
    assert res.exit_code == 0, res.output
    assert "pipeline" not in json.loads((out / "manifest.json").read_text())
    img = tmp_path / "a.png"
    _image(5, 30, 30).save(img)
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), "-p", "x", "-n", "2"])
    assert res.exit_code != 0 and "error:" in res.output and "Traceback" not in res.output
    shutil.rmtree(out)


def test_short_video_greedy_tokens_equal_transformers(vl):
    """A 4-frame video (two temporal patches at 2 fps): video pad tokens per merged patch,
    temporal mrope ids spaced by tokens_per_second * temporal_patch_size / fps. transformers'
    video processor needs torchvision (absent here), so the reference gets the pixels from the
    numpy processor (equal to transformers' per-frame image processing: tests/test_processors.py)
    and the video inputs its processor would give."""
    import transformers as T

    from onnxport.runtime.tasks.image_text_to_text import ImageTextToText

    ckpt, out, ids = vl
    frames = [np.asarray(_image(10 + i, 32, 40)) for i in range(4)]
    pipe = ImageTextToText(out)
    prompt = [5, 17, ids["<|vision_start|>"], ids["<|video_pad|>"], ids["<|vision_end|>"], 42, 7]
    got = pipe.generate(prompt, videos=[frames], max_new_tokens=12, eos_token_id=None).padded
    video = pipe.processor.preprocess_videos([frames])
    grid = video["video_grid_thw"]
    rows = pipe._expand(prompt, [], [list(g) for g in grid.tolist()])
    input_ids = torch.tensor([rows])
    model = T.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values_videos=torch.from_numpy(video["pixel_values_videos"]),
                             video_grid_thw=torch.from_numpy(grid), second_per_grid_ts=torch.tensor([2 / 2.0]),
                             mm_token_type_ids=(input_ids == ids["<|video_pad|>"]).int() * 2, max_new_tokens=12,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[:, len(rows):].numpy()
    assert int(grid[0, 0]) == 2
    np.testing.assert_array_equal(got, ref)


def test_verify_rechecks_the_chain(vl):
    """`onnxport verify` re-runs every part and the chained pipeline against transformers."""
    import json as _json

    _, out, _ = vl
    before = _json.loads((out / "manifest.json").read_text())["pipeline"]["verification"]
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    after = _json.loads((out / "manifest.json").read_text())["pipeline"]["verification"]
    assert after["ok"] and after["tokens_equal"] == before["tokens_equal"] == 8
