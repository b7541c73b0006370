"""Traced templates kept across exports (export/template.py).

A stamped decoder's optimized two-layer trace is kept, without weights, under a key covering
the code, the versions and the traced module; the next export with the same key loads it
instead of tracing. Proven on a 5-layer checkpoint: the bundle written from a kept template is
byte for byte the traced one (in memory, --low-memory and the GQA graph); another checkpoint of
the same architecture reuses it and its bundle is that checkpoint's (verified, equal to its
own traced bundle, unlike the first one's outputs), as does one of another depth; a changed
architecture is traced; an
entry that does not read back is traced again and replaced; ONNXPORT_TEMPLATES=off and
`template_cache=False` keep nothing."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from conftest import make_tiny_checkpoint

from onnxport.api import export
from onnxport.config import ExportConfig

LAYERS = 5
#: weights above 4 KiB external, written while the graph is traced (the path of large models)
EXTERNAL = 4096


def _digests(folder) -> dict:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("model.onnx", "model.onnx.data")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 5-layer llama and a copy with other weights (the same config): a fine-tune."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("ckpt")
    a = make_tiny_checkpoint("llama", root / "a", num_hidden_layers=LAYERS)
    b = root / "b"
    shutil.copytree(a, b)
    f = b / "model.safetensors"
    tensors = load_file(str(f))
    rng = np.random.default_rng(1)
    save_file({k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in tensors.items()}, str(f),
              metadata={"format": "pt"})
    return a, b


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXPORT_TEMPLATES", str(folder))
        yield folder


@pytest.fixture(scope="module")
def kept(checkpoints, cache, tmp_path_factory):
    """Checkpoint a exported twice (traced, then from the template), each way."""
    root = tmp_path_factory.mktemp("kept")
    configs = {"memory": {}, "low_memory": {"low_memory": True}, "gqa": {"attention": "gqa"}}
    out = {}
    for name, kw in configs.items():
        out[name] = [(root / f"{name}{i}", export(checkpoints[0], root / f"{name}{i}",
                                                   ExportConfig(external_data_threshold_bytes=EXTERNAL, **kw)))
                     for i in range(2)]
    return out


@pytest.mark.parametrize("way", ["memory", "low_memory", "gqa"])
def test_a_kept_template_writes_the_traced_bundle(kept, way):
    (first, m1), (second, m2) = kept[way]
    assert m1.graph("decoder").stamped["template"] == "traced and kept"
    assert m2.graph("decoder").stamped["template"] == "reused"
    assert m2.graph("decoder").stamped["stamped_layers"] == LAYERS - 2
    assert m1.verification["ok"] and m2.verification["ok"]
    assert _digests(first) == _digests(second)
    assert m1.graph("decoder").patches == m2.graph("decoder").patches


def test_one_entry_per_binding_and_graph(kept, cache):
    """In memory, --low-memory (weights bound to the checkpoint) and GQA are three traces."""
    assert len(list(cache.glob("*.json"))) == len(list(cache.glob("*.onnx"))) == 3


def test_another_checkpoint_of_the_architecture_reuses_it(checkpoints, kept, tmp_path, monkeypatch):
    """A fine-tune (same config, other weights) loads the template; its bundle holds its own
    weights: verified against its PyTorch model, byte for byte its traced bundle, and its
    logits are not the first checkpoint's."""
    from test_stamp import feeds, run

    cfg = ExportConfig(external_data_threshold_bytes=EXTERNAL)
    reused = export(checkpoints[1], tmp_path / "reused", cfg)
    assert reused.graph("decoder").stamped["template"] == "reused"
    assert reused.verification["ok"]
    monkeypatch.setenv("ONNXPORT_TEMPLATES", "off")
    traced = export(checkpoints[1], tmp_path / "traced", cfg)
    assert "template" not in traced.graph("decoder").stamped
    assert _digests(tmp_path / "reused") == _digests(tmp_path / "traced")
    x = feeds(reused)
    mine = run(tmp_path / "reused", reused, x)["logits"]
    (first, m1) = kept["memory"][0]
    theirs = run(first, m1, x)["logits"]
    assert np.abs(mine - theirs).max() > 1e-2


def test_another_process_reuses_it(checkpoints, kept, cache, tmp_path):
    """The key does not depend on the process (string hashing is seeded per process)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys; from pathlib import Path; from onnxport.api import export; "
            "from onnxport.config import ExportConfig; "
            f"m = export(Path(sys.argv[1]), Path(sys.argv[2]), ExportConfig(external_data_threshold_bytes={EXTERNAL})); "
            "print(json.dumps(m.graph('decoder').stamped))")
    p = subprocess.run([sys.executable, "-c", code, str(checkpoints[0]), str(tmp_path / "out")], capture_output=True,
                       text=True, env={**os.environ, "ONNXPORT_TEMPLATES": str(cache), "PYTHONHASHSEED": "12345"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["template"] == "reused"
    assert _digests(tmp_path / "out") == _digests(kept["memory"][0][0])


def test_the_architecture_at_another_depth_reuses_it(kept, tmp_path):
    """The key is made with the config truncated to the two traced layers: a 4-layer model of
    the same shape loads the 5-layer model's template."""
    ckpt = make_tiny_checkpoint("llama", tmp_path / "four", num_hidden_layers=4)
    m = export(ckpt, tmp_path / "out", ExportConfig(external_data_threshold_bytes=EXTERNAL))
    assert m.graph("decoder").stamped == {"traced_layers": 2, "stamped_layers": 2, "template": "reused",
                                          "early_weights": m.graph("decoder").stamped["early_weights"]}
    assert m.verification["ok"]


def test_a_changed_architecture_is_traced(checkpoints, kept, cache, tmp_path):
    """The same model with another rms_norm_eps is another key."""
    import json

    ckpt = tmp_path / "eps"
    shutil.copytree(checkpoints[0], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (ckpt / "config.json").write_text(json.dumps(config))
    before = set(cache.glob("*.json"))
    m = export(ckpt, tmp_path / "out", ExportConfig(external_data_threshold_bytes=EXTERNAL))
    assert m.graph("decoder").stamped["template"] == "traced and kept"
    assert m.verification["ok"]
    assert len(set(cache.glob("*.json")) - before) == 1


def test_an_unreadable_template_is_traced_and_replaced(checkpoints, kept, cache, tmp_path):
    from onnxport.export.template import TemplateCache

    record = TemplateCache(cache)
    entries = {p.stem for p in cache.glob("*.onnx")}
    (first, m1) = kept["memory"][0]
    for digest in entries:  # every entry damaged: the in-memory one is among them
        graph = cache / f"{digest}.onnx"
        blob = bytearray(graph.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        graph.write_bytes(bytes(blob))
    m = export(checkpoints[0], tmp_path / "out", ExportConfig(external_data_threshold_bytes=EXTERNAL))
    assert m.graph("decoder").stamped["template"] == (
        "traced and kept (the kept one was unreadable: ValueError)")
    assert m.verification["ok"]
    assert _digests(tmp_path / "out") == _digests(first)
    again = export(checkpoints[0], tmp_path / "again", ExportConfig(external_data_threshold_bytes=EXTERNAL))
    assert again.graph("decoder").stamped["template"] == "reused"
    assert record.folder == cache


@pytest.mark.parametrize("how", ["env", "config"])
def test_turned_off_keeps_nothing(checkpoints, tmp_path, monkeypatch, how):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONNXPORT_TEMPLATES", "off" if how == "env" else str(folder))
    m = export(checkpoints[0], tmp_path / "out", ExportConfig(template_cache=how != "config"))
    assert "template" not in m.graph("decoder").stamped
    assert m.graph("decoder").stamped["stamped_layers"] == LAYERS - 2
    assert not folder.exists()


def test_the_folder_is_in_onnxports_cache(tmp_path, monkeypatch):
    """By default beside the Triton environment (serve/triton.py) in $ONNXPORT_CACHE."""
    from onnxport.export.template import cache_folder

    monkeypatch.delenv("ONNXPORT_TEMPLATES")
    monkeypatch.setenv("ONNXPORT_CACHE", str(tmp_path))
    assert cache_folder() == tmp_path / "templates"
    monkeypatch.setenv("ONNXPORT_TEMPLATES", str(tmp_path / "mine"))
    assert cache_folder() == tmp_path / "mine"
    monkeypatch.setenv("ONNXPORT_TEMPLATES", "Off")
    assert cache_folder() is None


def test_the_key_covers_buffers_and_not_the_folder(checkpoints):
    """Two loads of one checkpoint from two folders: one key. A changed buffer (folded into
    the graph by the optimizer) or module setting: another."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnxport.export.template import TemplateCache
    from onnxport.spec import TensorSpec

    class Bind:
        weights, unbound_buffers = object(), None

    def key(model):
        args = (torch.ones(1, 3, dtype=torch.long),)
        return TemplateCache(None).key(model, args, [TensorSpec("input_ids", "int64", ("batch", "seq"))], ["logits"],
                                       18, "", None, [], Bind())

    a = AutoModelForCausalLM.from_pretrained(str(checkpoints[0]))
    b = AutoModelForCausalLM.from_pretrained(str(checkpoints[1]))  # other weights, other folder
    assert key(a) == key(b) is not None
    saved = b.model.rotary_emb.inv_freq.clone()
    b.model.rotary_emb.inv_freq.mul_(1.01)
    assert key(b) != key(a)
    b.model.rotary_emb.inv_freq.copy_(saved)
    assert key(b) == key(a)
    b.model.rotary_emb.attention_scaling = 2.0
    assert key(b) != key(a)


def test_only_the_most_recently_used_entries_are_kept(tmp_path, monkeypatch):
    import os

    from onnxport.export import template

    monkeypatch.setattr(template, "MAX_ENTRIES", 2)
    for i, name in enumerate("abc"):
        for suffix in (".json", ".onnx"):
            (tmp_path / f"{name}{suffix}").write_text("{}")
        os.utime(tmp_path / f"{name}.json", (1000 + i, 1000 + i))
    os.utime(tmp_path / "a.json", (2000, 2000))  # a was reused last
    template.TemplateCache(tmp_path)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx", "c.json", "c.onnx"]
