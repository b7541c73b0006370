"""MiniCPM-V 4.6 image + text -> text end to end in ONNX Runtime: one `onnxport export` gives the
vision tower, the merger, the text decoder on inputs_embeds and its embedding graph, chained by
the manifest's pipeline section (kind image-text-to-text/minicpmv); the torch-free pipeline
(numpy image processor with slicing, placeholder expansion into image / slice markers, features
placed among the token embeddings) produces transformers' greedy tokens for transformers' own
processor inputs. Two text models: Qwen3 (a key/value cache, batched prefill) and Qwen3.5
(`MiniCPMV4_6Config`'s default: linear-attention layers, a one-token-per-call graph)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import DEMO_DIR
from typer.testing import CliRunner

from onnxport.cli import app

MARKERS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
           "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
           "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
SPECIAL = [*MARKERS.values(), "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image_pad|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: a 4-pixel patch and 16x merge: sizes are multiples of 16 pixels; images above 48x48 pixels
#: are sliced (at most 4 slices), so the token counts stay small
PROCESSOR = {"scale_resolution": 48, "patch_size": 4, "max_slice_nums": 4}
TEXT = {
    "qwen3": dict(model_type="qwen3", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, vocab_size=1040, head_dim=12, initializer_range=0.2),
    "qwen3_5_text": dict(model_type="qwen3_5_text", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=1040, head_dim=12,
                         initializer_range=0.2, layer_types=["linear_attention", "full_attention"],
                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                         linear_value_head_dim=8),
}
KINDS = list(TEXT)
ATOL = 1e-4  # fp32 vision features (tests/test_encoders.py's tolerance; observed max|diff| ~1e-6)
SMALL = "<|im_start|>user\ndescribe <|image_pad|> please<|im_end|>\n<|im_start|>assistant\n"
#: two images in one row, none in the other (left padding; image ids 0 and 1 in the first row)
TWO = "<|im_start|>user\n<|image_pad|> and <|image_pad|><|im_end|>\n<|im_start|>assistant\n"
PLAIN = "<|im_start|>user\nno picture here, just a longer piece of text<|im_end|>\n<|im_start|>assistant\n"


def _image(seed: int, h: int, w: int, channels: int = 3):
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a)


def _checkpoint(folder, kind: str):
    import transformers as T
    from tokenizers import Tokenizer

    folder.mkdir(parents=True)
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    tok.add_special_tokens(SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    cfg = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, pad_token="<|im_end|>", eos_token="<|im_end|>",
               extra_special_tokens=MARKERS)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "MiniCPMV4_6ImageProcessor",
                                                                 **PROCESSOR}))
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4, window_kernel_size=[2, 2])
    config = T.MiniCPMV4_6Config(vision_config=vision, text_config=TEXT[kind], insert_layer_id=0,
                                 image_token_id=tok.token_to_id("<|image_pad|>"),
                                 video_token_id=tok.token_to_id("<|video_pad|>"))
    torch.manual_seed(0)
    model = T.MiniCPMV4_6ForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits: no greedy near-ties
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """kind -> (checkpoint, bundle, transformers model): each exported once, every part."""
    import transformers as T

    made = {}

    def get(kind: str):
        if kind not in made:
            ckpt = _checkpoint(tmp_path_factory.mktemp(f"mcv-{kind}") / "ckpt", kind)
            out = ckpt.parent / "bundle"
            res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out)])
            assert res.exit_code == 0, res.output
            model = T.MiniCPMV4_6ForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
            made[kind] = (ckpt, out, model)
        return made[kind]

    return get


def _hf_processor(ckpt, **settings):
    """transformers' own processor: the PIL image processor and the checkpoint's tokenizer."""
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(ckpt)
    image_processor = T.MiniCPMV4_6ImageProcessorPil(**{**PROCESSOR, **settings})
    # the processor also wants a video processor, which needs torchvision (not installed): a
    # stand-in with the two settings its __init__ reads, its class check skipped
    check = T.ProcessorMixin.check_argument_for_proper_class
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class",
                           lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        return T.MiniCPMV4_6Processor(image_processor=image_processor, tokenizer=tokenizer,
                                      video_processor=SimpleNamespace(slice_mode=False, downsample_mode="16x"))


def _hf_generate(model, inputs, n: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def test_numpy_image_processor_equals_transformers():
    """Bit-identical pixel values, slice sizes and grids: unsliced (small, upscaled), sliced
    (square, wide, tall, extreme ratios), grayscale and RGBA (composited onto white)."""
    import transformers as T

    from onnxport.runtime.image_processor import MiniCPMVImageProcessor

    cases = [(20, 30, 3), (48, 48, 3), (49, 49, 3), (100, 60, 1), (60, 100, 4), (37, 200, 3), (300, 17, 3),
             (130, 131, 3), (5, 5, 3)]
    for settings in (PROCESSOR, {**PROCESSOR, "slice_mode": False}, {"scale_resolution": 64, "patch_size": 8}):
        ref, mine = T.MiniCPMV4_6ImageProcessorPil(**settings), MiniCPMVImageProcessor(settings)
        for seed, (h, w, c) in enumerate(cases):
            image = _image(seed, h, w, c)
            want, got = ref([image], return_tensors="np"), mine([image])
            np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
            np.testing.assert_array_equal(got["target_sizes"], want["target_sizes"])
            assert got["grids"] == want["grids"] and got["num_patches_per_image"] == want["num_patches_per_image"]
    # several images in one call: packed in order
    images = [_image(1, 100, 60), _image(2, 20, 30)]
    want, got = T.MiniCPMV4_6ImageProcessorPil(**PROCESSOR)(images, return_tensors="np"), \
        MiniCPMVImageProcessor(PROCESSOR)(images)
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    assert got["grids"] == want["grids"] == [[2, 1], [0, 0]]


def test_manifest_chains_the_parts(bundles):
    _, out, model = bundles("qwen3")
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["pipeline"]["kind"] == "image-text-to-text/minicpmv"
    assert mf["pipeline"]["graphs"] == {"embedding": "embed_tokens.onnx", "decoder": "model.onnx",
                                        "vision": "vision", "merger": "merger"}
    cfg = mf["pipeline"]["config"]
    assert cfg["image_token_id"] == model.config.image_token_id and cfg["tokens"]["slice_start_token"] == "<slice>"
    assert cfg["image_processor"]["scale_resolution"] == PROCESSOR["scale_resolution"]
    assert all(p["verification"]["ok"] for p in mf["parts"])
    assert [i["name"] for i in next(g for g in mf["graphs"] if g["file"] == "model.onnx")["inputs"]][:3] == \
        ["inputs_embeds", "attention_mask", "position_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_text_only_greedy_tokens_equal_transformers(bundles, kind):
    """The decoder alone (ids through embed_tokens.onnx): a left-padded batch for the key/value
    model; one prompt for the one-token-per-call Qwen3.5 graph."""
    from onnxport.runtime.generator import Generator

    _, out, model = bundles(kind)
    rows = [[5, 17, 300, 41, 9, 77, 2], [88, 3, 512]] if kind == "qwen3" else [[5, 17, 300, 41, 9, 77, 2]]
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[:, longest:].numpy()
    got = Generator(out).generate_ids(rows, max_new_tokens=16, eos_token_id=None)
    np.testing.assert_array_equal(got.padded, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["small_image", "sliced_image", "batch"])
def test_greedy_tokens_equal_transformers(bundles, kind, case):
    """One image below scale_resolution**2 (upscaled, not sliced); one sliced into a 2x2 grid
    plus its source image; a left-padded batch: two images (one sliced) and a text-only row."""
    from onnxport.runtime.tasks import open_task

    ckpt, out, model = bundles(kind)
    texts, images = {"small_image": ([SMALL], [[_image(0, 30, 40)]]),
                     "sliced_image": ([SMALL], [[_image(1, 130, 120)]]),
                     "batch": ([TWO, PLAIN], [[_image(2, 60, 110), _image(3, 20, 20)], []])}[case]
    inputs = _hf_processor(ckpt)(text=list(texts), images=[i for row in images for i in row], return_tensors="pt")
    ref = _hf_generate(model, inputs, 12)
    pipe = open_task(out)
    got = pipe.generate(texts, images=images, max_new_tokens=12, eos_token_id=None)
    np.testing.assert_array_equal(got.padded, ref)
    if case == "sliced_image":
        assert inputs["target_sizes"].shape[0] == 5  # source + 2x2 slices


def test_image_features_equal_transformers(bundles):
    """vision.onnx + merger.onnx, one call per slice, on the processor's packed pixels ==
    get_image_features on all slices at once (a sliced image and a small one)."""
    from onnxport.runtime.tasks import open_task

    ckpt, out, model = bundles("qwen3")
    inputs = _hf_processor(ckpt)(text=["<|image_pad|><|image_pad|>"], images=[_image(1, 130, 120), _image(0, 30, 40)],
                                 return_tensors="pt")
    with torch.no_grad():
        want = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["target_sizes"])
                         .pooler_output).numpy()
    got = open_task(out).image_features(inputs["pixel_values"].numpy(), inputs["target_sizes"].numpy())
    assert got.shape == want.shape == (6 * 9, 48)  # 6 slices of 12x12 patches, 9 tokens each
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_prompt_ids_equal_the_processors(bundles):
    """The placeholder expansion (image ids, source tokens, slice rows) equals the processor's
    input_ids, with and without image ids and slicing, for text and for token-id prompts."""
    from onnxport.runtime.image_processor import MiniCPMVImageProcessor
    from onnxport.runtime.tasks import open_task

    ckpt, out, _ = bundles("qwen3")
    pipe = open_task(out)
    images = [_image(4, 120, 50), _image(5, 16, 16), _image(6, 90, 200)]
    text = "<|image_pad|> first, then <|image_pad|>\nand <|image_pad|>."
    for settings in ({}, {"slice_mode": False}, {"use_image_id": False}):
        pipe.processor = MiniCPMVImageProcessor({**PROCESSOR, **settings})
        hf = _hf_processor(ckpt, **settings)
        want = hf(text=[text], images=images, return_tensors="np")["input_ids"][0].tolist()
        out_ = pipe.processor(images)
        sizes = np.split(out_["target_sizes"], np.cumsum(out_["num_patches_per_image"])[:-1])
        use_id = pipe.processor.config.use_image_id
        replacements = [pipe.placeholder(s, g, i if use_id else None)
                        for i, (s, g) in enumerate(zip(sizes, out_["grids"]))]
        assert pipe.prompt_ids(text, replacements) == want
        assert pipe.prompt_ids(pipe.tokenizer.encode(text), replacements) == want


def test_chat_messages_and_cli(bundles, tmp_path):
    """Chat messages render through the bundle's template; `generate --image` runs the pipeline."""
    from onnxport.runtime.tasks import open_task

    _, out, _ = bundles("qwen3")
    image = _image(7, 70, 50)
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe "}, {"type": "image"},
                                             {"type": "text", "text": " please"}]}]
    pipe = open_task(out)
    a = pipe.generate(messages, images=[image], max_new_tokens=8, eos_token_id=None).padded
    b = pipe.generate(SMALL, images=[image], max_new_tokens=8, eos_token_id=None).padded
    np.testing.assert_array_equal(a, b)
    path = tmp_path / "x.png"
    image.save(path)
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(path), "-p", "describe", "--chat", "-n", "8"])
    assert res.exit_code == 0, res.output
    want = pipe.generate([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]],
                         images=[[image]], max_new_tokens=8).texts[0]
    assert want.rstrip("\ufffd") in res.output


@pytest.mark.parametrize("case", ["no_placeholder", "too_many_placeholders", "not_an_image"])
def test_bad_image_inputs_fail_in_one_line(bundles, tmp_path, case):
    _, out, _ = bundles("qwen3")
    img = tmp_path / "a.png"
    _image(8, 30, 30).save(img)
    if case == "not_an_image":
        img.write_bytes(b"definitely not a png")
        args = ["-p", "describe", "--chat"]
    elif case == "no_placeholder":
        args = ["-p", "just text without the image tag"]
    else:
        args = ["-p", "<|image_pad|><|image_pad|>"]
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), *args, "-n", "2"])
    assert res.exit_code != 0, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output


def test_token_id_prompt_with_a_stray_image_token_is_refused(bundles):
    from onnxport.errors import RuntimeInputError
    from onnxport.runtime.tasks import open_task

    _, out, model = bundles("qwen3")
    pipe = open_task(out)
    with pytest.raises(RuntimeInputError, match="1 image placeholder"):
        pipe.generate([5, model.config.image_token_id, 6], images=[], max_new_tokens=2)
