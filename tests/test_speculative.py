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
        (exported("llama", attention="gqa", optimize=True), ["--speculative", "4"], "concatenated cache"),
        (demo, ["--speculative", "4", "--sample"], "greedy"),
        (demo, ["--speculative", "0", "--sample", "--top-k", "-1"], "top"),
    ]:
        res = CliRunner().invoke(app, ["generate", str(bundle), "-p", "x", *flags])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (flags, res.output)
