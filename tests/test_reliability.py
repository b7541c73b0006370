"""Faults and hostile inputs through the CLI: no silent wrong weights, no lost user data, a
bundle that cannot read outside itself, one-line failures (exit code, no traceback, nothing
left at OUT or beside it), text printed verbatim."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxport.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def clean_failure(res, *needles: str, code: int | None = None) -> str:
    text = res.output
    assert res.exit_code != 0, text
    if code is not None:
        assert res.exit_code == code, text
    assert "Traceback" not in text, text
    assert "error:" in text and "hint:" in text, text
    for n in needles:
        assert n in text, (n, text)
    return text


def nothing_beside(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture
def bundle(exported, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(exported("llama"), dst)
    return dst


# --- weights ------------------------------------------------------------------------------------

def test_a_missing_checkpoint_weight_fails_and_is_named(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints("llama"), ck)
    sd = load_file(ck / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    clean_failure(run("export", ck, "-o", out), "not in the checkpoint: model.layers.1.mlp.down_proj.weight",
                  "never exports random weights", code=2)
    nothing_beside(out)


# --- the output folder --------------------------------------------------------------------------

def test_force_never_deletes_a_folder_that_is_not_a_bundle(tiny_checkpoints, tmp_path):
    user = tmp_path / "mydata"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    res = run("export", tiny_checkpoints("llama"), "-o", user, "--force")
    clean_failure(res, "not an onnxport bundle", code=2)
    assert (user / "thesis.txt").read_text() == "years of work"
    assert not list(tmp_path.glob(".mydata.*"))


def test_force_on_the_current_folder_is_refused(tiny_checkpoints, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    clean_failure(run("export", tiny_checkpoints("llama"), "-o", ".", "--force"), "not an onnxport bundle", code=2)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_force_replaces_a_bundle_and_files_are_world_readable(tiny_checkpoints, bundle):
    (bundle / "marker").write_text("old")
    res = run("export", tiny_checkpoints("llama"), "-o", bundle, "--force", "--no-verify")
    assert res.exit_code == 0, res.output
    assert not (bundle / "marker").exists() and (bundle / "model.onnx").is_file()
    assert oct(bundle.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert not list(bundle.parent.glob(".bundle.*"))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_stale_partial_folder_of_a_dead_process_is_removed(tiny_checkpoints, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    res = run("export", tiny_checkpoints("llama"), "-o", tmp_path / "out", "--no-verify")
    assert res.exit_code == 0, res.output
    assert not stale.exists()


def test_a_second_export_to_the_same_output_fails_at_the_lock(tiny_checkpoints, tmp_path):
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "a+") as fh:  # what a running export holds
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run("export", tiny_checkpoints("llama"), "-o", out)
    clean_failure(res, "another onnxport process is writing", code=2)
    assert not out.exists()


def test_disk_full_is_reported_as_such(tiny_checkpoints, tmp_path, monkeypatch):
    import onnx_ir

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "model.onnx")

    monkeypatch.setattr(onnx_ir, "save", full)
    out = tmp_path / "out"
    text = clean_failure(run("export", tiny_checkpoints("llama"), "-o", out), "the disk is full", code=2)
    assert "torchscript" not in text
    nothing_beside(out)


def test_read_only_output_is_one_line(tiny_checkpoints, tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    clean_failure(run("export", tiny_checkpoints("llama"), "-o", out), "Read-only file system", "writable", code=2)
    nothing_beside(out)


# --- the bundle is sealed -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd"])
def test_manifest_cannot_point_outside_the_bundle(bundle, name):
    mf = json.loads((bundle / "manifest.json").read_text())
    (bundle.parent / "outside.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    mf["graphs"][0]["file"] = name
    (bundle / "manifest.json").write_text(json.dumps(mf))
    clean_failure(run("generate", bundle, "-p", "x"), "outside the bundle", code=2)


def test_external_data_escape_is_refused_before_onnxruntime(bundle):
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["graphs"][0]["external_data"] = ["../../secret.data"]
    (bundle / "manifest.json").write_text(json.dumps(mf))
    clean_failure(run("generate", bundle, "-p", "x"), "outside the bundle", code=2)


@pytest.mark.parametrize("location", ["../secret.data", "/tmp/secret.data"])
def test_graph_naming_external_data_outside_is_refused(bundle, location, tmp_path):
    """The graph file itself (not only the manifest) may name external data: an absolute or
    escaping location is refused before ONNX Runtime opens (and reads) it."""
    import onnx
    from onnx.external_data_helper import set_external_data

    m = onnx.load(str(bundle / "model.onnx"))
    init = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    (bundle.parent / "secret.data").write_bytes(init.raw_data)
    set_external_data(init, location=location, offset=0, length=len(init.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(m, str(bundle / "model.onnx"))
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["graphs"][0].pop("files")  # an edit that also drops the size record
    (bundle / "manifest.json").write_text(json.dumps(mf))
    clean_failure(run("generate", bundle, "-p", "x"), "external data", code=2)


def test_bundle_external_locations_are_read_from_the_graph(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    from onnxport.bundle.folder import external_locations

    t = numpy_helper.from_array(np.ones((300, 300), np.float32), "w")
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [300, 300])], [t])
    onnx.save(helper.make_model(g), str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    assert external_locations(tmp_path / "m.onnx") == ["w.bin"]


def test_graph_files_are_recorded_and_a_changed_size_is_refused(bundle):
    import hashlib

    mf = json.loads((bundle / "manifest.json").read_text())
    rec = mf["graphs"][0]["files"]["model.onnx"]
    data = (bundle / "model.onnx").read_bytes()
    assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    clean_failure(run("generate", bundle, "-p", "x"), "the manifest recorded", code=2)


def test_corrupt_graph_and_tokenizer_are_one_line_errors(bundle):
    (bundle / "model.onnx").write_bytes(b"\x00not a graph")
    clean_failure(run("generate", bundle, "-p", "x"), "truncated or replaced", code=2)
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["graphs"][0].pop("files")  # without the size record, ONNX Runtime's refusal is the line
    (bundle / "manifest.json").write_text(json.dumps(mf))
    clean_failure(run("generate", bundle, "-p", "x"), "cannot load model.onnx", code=2)


def test_non_utf8_manifest_is_one_line(bundle):
    (bundle / "manifest.json").write_bytes(b"\xff\xfe{")
    clean_failure(run("generate", bundle, "-p", "x"), "not valid JSON", code=2)


def test_verify_refuses_pickle_weights_without_opt_in(bundle, tmp_path):
    import torch
    from safetensors.torch import load_file

    ck = tmp_path / "pk"
    src = Path(json.loads((bundle / "manifest.json").read_text())["source"]["path"])
    ck.mkdir()
    shutil.copy(src / "config.json", ck / "config.json")
    torch.save(load_file(src / "model.safetensors"), ck / "pytorch_model.bin")
    before = (bundle / "manifest.json").read_text()
    clean_failure(run("verify", bundle, "--model", ck), "pickle", "--allow-pickle", code=2)
    assert (bundle / "manifest.json").read_text() == before


# --- runtime limits and verbatim text -----------------------------------------------------------

def test_more_tokens_than_positions_is_refused(bundle):
    clean_failure(run("generate", bundle, "-p", "x", "-n", "100000"), "max_position_embeddings", code=2)


def test_prompt_and_help_text_are_printed_verbatim(bundle):
    res = run("generate", bundle, "-p", "letters = [a, b, c]", "-n", "2", "--no-stream", "-p", "[bold]x")
    assert res.exit_code == 0, res.output
    assert "letters = [a, b, c]" in res.output and "[bold]x" in res.output
    res = run("export", "--help")
    assert "[batch, heads, seq, head_dim]" in res.output


def test_debug_keeps_the_exit_code(tmp_path):
    res = run("--debug", "export", tmp_path / "nope", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_interrupt_during_export_leaves_nothing(tiny_checkpoints, tmp_path):
    """A real SIGINT while the exporter runs: exit 130, no traceback, nothing at OUT or beside it."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "onnxport.cli", "export", str(tiny_checkpoints("llama")),
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.2)
    proc.send_signal(2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    nothing_beside(out)
