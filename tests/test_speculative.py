"""Prompt-lookup speculative decoding (runtime/speculative.py) is greedy-exact: the same tokens as
plain greedy decoding, token for token, on the trained demo model (code and summary-like prompts
whose continuations repeat their context, with and without EOS) and on a bshd-cache bundle; the
draft search finds the latest earlier n-gram; graphs it cannot run are one clean error. Speed is
measured in bench/speculative.py, not asserted here."""

from __future__ import annotations

import pytest
from conftest import DEMO_DIR
from typer.testing import CliRunner

from onnxport.runtime.speculative import find_draft

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
    "def fibonacci_memo(n, memo={}):\n",
    "The os module provides a portable way of using operating system dependent functionality. "
    "In short, the os module",
    "import json\n",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from onnxport.api import export
    from onnxport.config import ExportConfig

    out = tmp_path_factory.mktemp("spec") / "demo"
    export(DEMO_DIR, out, ExportConfig())
    return out


def test_find_draft_takes_what_followed_the_latest_match():
    assert find_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2) == [7, 8]  # the latest 3-gram match
    assert find_draft([5, 6, 7, 5], k=3) == [6, 7, 5]  # falls back to a 1-gram
    assert find_draft([1, 2, 3], k=4) == []


@pytest.mark.parametrize("eos", [None, -1], ids=["no-eos", "bundle-eos"])
def test_tokens_equal_plain_greedy_on_trained_weights(demo, eos):
    from onnxport.runtime import Generator

    gen = Generator(demo)
    accepted = 0
    for text in PROMPTS:
        ids = gen.tokenizer.encode(text)
        plain = gen.generate_ids([ids], max_new_tokens=48, eos_token_id=eos)
        spec = gen.generate_ids([ids], max_new_tokens=48, eos_token_id=eos, speculative=8)
        assert spec.tokens == plain.tokens, text
        s = spec.speculative
        assert s["accepted"] <= s["drafted"] and s["forwards"] <= s["decode_tokens"]
        # each forward adds its accepted drafts and the model's next token (the last one may stop early)
        assert s["forwards"] + s["accepted"] - 1 <= s["decode_tokens"] <= s["forwards"] + s["accepted"]
        accepted += s["accepted"]
    assert accepted > 0  # the prompts repeat their context: some drafts are taken


def test_the_gqa_graph_cuts_its_shared_buffer_by_the_mask(exported):
    """On the GroupQueryAttention graph (one cache buffer written in place) a refused draft is
    forgotten by a shorter mask: still plain greedy's tokens, drafts taken and refused."""
    from onnxport.runtime import Generator

    gen = Generator(exported("llama", attention="gqa", optimize=True))
    assert gen.shared_buffer and gen.keeps_logits
    prompts = [[5, 17, 300, 42, 5, 17, 300, 42, 5, 17], [11, 600, 23, 8, 11, 600, 23], [7, 7, 7, 7, 7, 7]]
    taken = refused = 0
    for p in prompts:
        plain = gen.generate_ids([p], max_new_tokens=32, eos_token_id=None)
        spec = gen.generate_ids([p], max_new_tokens=32, eos_token_id=None, speculative=4)
        assert spec.tokens == plain.tokens, p
        taken += spec.speculative["accepted"]
        refused += spec.speculative["drafted"] - spec.speculative["accepted"]
    assert taken > 0 and refused > 0, (taken, refused)


def test_a_batch_and_a_bshd_cache(exported):
    from onnxport.runtime import Generator

    bundle = exported("llama", kv_layout="bshd", kv_naming="seed")
    gen = Generator(bundle)
    prompts = [[5, 17, 300, 42, 5, 17, 300, 42, 5, 17], [11, 600, 23, 8]]
    plain = gen.generate_ids(prompts, max_new_tokens=24, eos_token_id=None)
    spec = gen.generate_ids(prompts, max_new_tokens=24, eos_token_id=None, speculative=4)
    assert spec.tokens == plain.tokens and (spec.padded == plain.padded).all()


def test_cli_flag_and_what_it_refuses(demo, exported):
    from onnxport.cli import app

    runs = [CliRunner().invoke(app, ["generate", str(demo), "-p", PROMPTS[0], "-n", "24", "--no-stream", *flags])
            for flags in ([], ["--speculative", "8"])]
    assert all(r.exit_code == 0 for r in runs)
    assert runs[0].output.split("tokens/s", 1)[1] == runs[1].output.split("drafted tokens accepted)", 1)[1]
    for bundle, flags, needle in [
        (exported("llama", split={"pack": 1}, kv_layout="bshd"), ["--speculative", "4"], "monolithic decoder"),
        (demo, ["--speculative", "4", "--sample"], "greedy"),
        (demo, ["--speculative", "0", "--sample", "--top-k", "-1"], "top"),
    ]:
        res = CliRunner().invoke(app, ["generate", str(bundle), "-p", "x", *flags])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (flags, res.output)


@pytest.fixture(scope="module")
def demo_int4(demo, tmp_path_factory):
    """The demo model quantized (int4 RTN, no gate): a draft that agrees often, not always."""
    from onnxport.api import quantize
    from onnxport.config import QuantConfig

    out = tmp_path_factory.mktemp("spec") / "demo-int4"
    quantize(demo, out, QuantConfig(block_size=128, accuracy_level=4, max_ppl_increase=1e9, escalate=False))
    return out


@pytest.mark.parametrize("k", [1, 4])
def test_draft_bundle_tokens_equal_plain_greedy(demo, demo_int4, k):
    """A draft bundle (the model quantized) proposes, the model verifies: plain greedy's tokens,
    with drafts both taken and refused along the way, on text that does not repeat itself."""
    from onnxport.runtime import Generator

    gen, draft = Generator(demo), Generator(demo_int4)
    taken = refused = 0
    for text in [*PROMPTS, "Once upon a time", "The weather today"]:
        ids = gen.tokenizer.encode(text)
        plain = gen.generate_ids([ids], max_new_tokens=40, eos_token_id=None)
        spec = gen.generate_ids([ids], max_new_tokens=40, eos_token_id=None, speculative=k, draft=draft)
        assert spec.tokens == plain.tokens, text
        s = spec.speculative
        assert s["forwards"] + s["accepted"] - 1 <= s["decode_tokens"] <= s["forwards"] + s["accepted"]
        assert s["drafted"] <= k * s["forwards"] and s["draft_ms"] > 0 and not s["int8_activations"]
        taken, refused = taken + s["accepted"], refused + s["drafted"] - s["accepted"]
    assert taken > 0 and refused > 0, (taken, refused)
    # an int4 graph at accuracy level 4 rounds activations to int8: exact only away from near-ties, and said so
    assert draft.generate_ids([ids], max_new_tokens=8, eos_token_id=None, speculative=k).speculative["int8_activations"]


def test_draft_bundle_cli_and_what_it_refuses(demo, demo_int4, exported, tmp_path):
    from types import SimpleNamespace

    from onnxport.cli import app
    from onnxport.errors import RuntimeInputError
    from onnxport.runtime.speculative import same_tokenizer

    runs = [CliRunner().invoke(app, ["generate", str(demo), "-p", "Once upon a time", "-n", "20", "--no-stream", *flags])
            for flags in ([], ["--draft", str(demo_int4)])]
    assert all(r.exit_code == 0 for r in runs), runs[1].output
    assert "drafting" in runs[1].output
    assert runs[0].output.split("tokens/s", 1)[1] == runs[1].output.split(" ms)", 1)[1]
    res = CliRunner().invoke(app, ["generate", str(demo), "-p", "x", "--draft",
                                   str(exported("llama", split={"pack": 1}, kv_layout="bshd"))])
    assert res.exit_code == 2 and "monolithic decoder" in res.output and "Traceback" not in res.output, res.output
    # another tokenizer: another vocabulary size, or the same size with other tokens
    for i, vocab in enumerate(({"a": 0, "b": 1}, {"a": 1, "b": 0})):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "tokenizer.json").write_text('{"model": {"vocab": %s}}' % str(vocab).replace("'", '"'))
    a, b = (SimpleNamespace(folder=tmp_path / str(i), vocab_size=2) for i in range(2))
    same_tokenizer(a, a)
    for draft, needle in ((b, "tokenizer differs"), (SimpleNamespace(folder=tmp_path / "1", vocab_size=3), "vocabulary has 3")):
        with pytest.raises(RuntimeInputError, match=needle):
            same_tokenizer(a, draft)
