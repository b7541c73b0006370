"""Bad input through the CLI: one-line error with a hint, exit code != 0, no traceback, and
nothing written at the output path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnxport.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(res, out: Path | None, *needles: str, code: int | None = None):
    text = res.output
    assert res.exit_code != 0, text
    if code is not None:
        assert res.exit_code == code, text
    assert "Traceback" not in text
    assert "error:" in text and "hint:" in text, text
    for n in needles:
        assert n in text, (n, text)
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial-*")), "temp folder left behind"


@pytest.fixture
def ckpt_copy(tiny_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints("llama"), dst)
    return dst


def test_missing_dir(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("export", tmp_path / "nope", "-o", out), out, "does not exist", code=2)


def test_missing_config(tmp_path, ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run("export", ckpt_copy, "-o", out), out, "no config.json")


def test_unknown_model_type(tmp_path, ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = run("export", ckpt_copy, "-o", out)
    assert_clean_failure(res, out, "'frobnicator' has no recipe", "llama", "qwen2")


def test_pickle_only_refused(tmp_path, ckpt_copy):
    import torch
    from safetensors.torch import load_file

    sd = load_file(ckpt_copy / "model.safetensors")
    (ckpt_copy / "model.safetensors").unlink()
    torch.save(sd, ckpt_copy / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_clean_failure(run("export", ckpt_copy, "-o", out), out, "pickle", "--allow-pickle")


def test_allow_pickle_opt_in_exports(tmp_path, ckpt_copy):
    import torch
    from safetensors.torch import load_file

    sd = load_file(ckpt_copy / "model.safetensors")
    (ckpt_copy / "model.safetensors").unlink()
    torch.save(sd, ckpt_copy / "pytorch_model.bin")
    out = tmp_path / "out"
    res = run("export", ckpt_copy, "-o", out, "--allow-pickle", "--no-verify")
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").is_file()


def test_truncated_safetensors(tmp_path, ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_failure(run("export", ckpt_copy, "-o", out), out, "truncated")


def test_corrupt_safetensors_header(tmp_path, ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    out = tmp_path / "out"
    assert_clean_failure(run("export", ckpt_copy, "-o", out), out, "not a valid safetensors")


def test_config_weight_shape_mismatch(tmp_path, ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_clean_failure(run("export", ckpt_copy, "-o", out), out, "mlp", "implies")


def test_existing_output_refused(tmp_path, ckpt_copy):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("export", ckpt_copy, "-o", out)
    assert_clean_failure(res, None, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_option_values(tmp_path, ckpt_copy):
    out = tmp_path / "out"
    assert_clean_failure(run("export", ckpt_copy, "-o", out, "--kv-layout", "hsbd"), out, "kv layout")
    assert_clean_failure(run("export", ckpt_copy, "-o", out, "--opset", "11"), out, "opset 11")


def test_debug_shows_traceback(tmp_path):
    res = run("--debug", "export", tmp_path / "nope", "-o", tmp_path / "out")
    assert res.exit_code != 0
    assert res.exception is not None  # raised, not swallowed into one line


def test_generate_on_missing_bundle(tmp_path):
    res = run("generate", tmp_path / "nothing", "-p", "hi")
    assert_clean_failure(res, None, "does not exist")


def test_sharded_checkpoint_that_disagrees_with_its_index(tmp_path, tiny_checkpoints):
    """Sharded checkpoints are read through their index: a missing shard, a stale extra shard,
    a tensor in two files or in another shard than the index says is a one-line error before
    any model is built (no weight is silently taken from the wrong file)."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from onnxport.checkpoint import open_checkpoint
    from onnxport.errors import CheckpointError

    good = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints("llama")).save_pretrained(good, max_shard_size="200KB")
    shards = sorted(good.glob("*.safetensors"))
    assert len(shards) >= 2 and len(open_checkpoint(good).tensors) > 10

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(d)
        return e.value.message

    assert "which is missing" in broken("missing", lambda d: (d / shards[0].name).unlink())
    assert "is not listed in" in broken("stray", lambda d: shutil.copy(d / shards[0].name, d / "old.safetensors"))

    def move(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        counts = {}
        for v in idx["weight_map"].values():
            counts[v] = counts.get(v, 0) + 1
        src = next(f for f, c in counts.items() if c > 1)  # a shard that stays named after the move
        name = next(k for k, v in idx["weight_map"].items() if v == src)
        idx["weight_map"][name] = next(f for f in counts if f != src)
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))

    assert "but it is in" in broken("moved", move)
    res = run("export", tmp_path / "missing", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "which is missing" in res.output and not (tmp_path / "o").exists()
