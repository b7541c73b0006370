"""Stamped decoder exports (export/stamp.py): two layers traced, the others copies of layer 1
that read their own weights and caches.

Proven against tracing every layer (`stamp=False`) of the same 5-layer checkpoint, whose
layers all have different (randomized) weights and norms: the stamped graph has the same ops,
inputs and outputs, names every layer's weights as the checkpoint does, carries each copy's
module scope, and its outputs equal the full trace's. The `--low-memory` path (weights bound to
the checkpoint) and the GQA graph are stamped too. Layers that differ fall back to tracing
every layer and say why: by module (layer types, an attribute) or in the traced graph itself
(a computation that depends on the layer index, which no module attribute shows). A model whose
first layer differs (dense before MoE) is traced up to its second MoE layer and stamped from it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import make_tiny_checkpoint

from onnxport.api import export
from onnxport.config import ExportConfig

LAYERS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def bundles(checkpoint, tmp_path_factory):
    """The same checkpoint exported four ways (each verified against PyTorch by export)."""
    root = tmp_path_factory.mktemp("bundles")
    configs = {"stamped": ExportConfig(), "full": ExportConfig(stamp=False),
               "low_memory": ExportConfig(low_memory=True), "gqa": ExportConfig(attention="gqa")}
    return {name: (root / name, export(checkpoint, root / name, cfg)) for name, cfg in configs.items()}


def feeds(manifest) -> dict:
    """A left-padded batch of 2 continuing a 3-token cache (random past tensors)."""
    from onnxport.spec import ShapeCase
    from onnxport.spec import feeds as make

    return make(manifest.graph("decoder").inputs, ShapeCase(2, 5, 3).sizes, vocab_size=1024, past=3, left_pad=2)


def run(folder, manifest, inputs) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {i.name: inputs[i.name] for i in sess.get_inputs()})))


def test_stamped_graph_is_the_full_trace(bundles):
    (sf, stamped), (ff, full) = bundles["stamped"], bundles["full"]
    assert stamped.graph("decoder").stamped == {"traced_layers": 2, "stamped_layers": LAYERS - 2}
    assert full.graph("decoder").stamped is None
    assert stamped.verification["ok"] and full.verification["ok"]
    a, b = onnx.load(str(sf / "model.onnx")), onnx.load(str(ff / "model.onnx"))
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert Counter((n.domain, n.op_type) for n in a.graph.node) == Counter((n.domain, n.op_type) for n in b.graph.node)
    # every layer reads its own checkpoint tensors, by their checkpoint names
    inits = {i.name for i in a.graph.initializer}
    for i in range(LAYERS):
        assert f"model.layers.{i}.mlp.down_proj.weight" in inits
        assert f"model.layers.{i}.input_layernorm.weight" in inits
    x = feeds(stamped)
    ours, ref = run(sf, stamped, x), run(ff, full, x)
    assert set(ours) == set(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-5, err_msg=name)


def test_copies_carry_their_layers_module_scope(bundles):
    """bisect and the quantizer's per-layer record read the exporter's name scopes."""
    from onnxport.optimize.quantize import module_names

    folder, _ = bundles["stamped"]
    names = set(module_names(folder / "model.onnx").values())
    for i in range(LAYERS):
        assert f"model.layers.{i}.self_attn.q_proj" in names
        assert f"model.layers.{i}.mlp.down_proj" in names


def test_low_memory_and_gqa_graphs_are_stamped(bundles):
    (sf, stamped), (lf, low) = bundles["stamped"], bundles["low_memory"]
    gf, gqa = bundles["gqa"]
    for m in (low, gqa):
        assert m.graph("decoder").stamped == {"traced_layers": 2, "stamped_layers": LAYERS - 2}
        assert m.verification["ok"]
    x = feeds(stamped)
    ours, ref = run(lf, low, x), run(sf, stamped, x)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-5, err_msg=name)
    ops = Counter(n.op_type for n in onnx.load(str(gf / "model.onnx")).graph.node)
    assert ops["GroupQueryAttention"] == LAYERS


def test_unlike_layers_are_traced_whole(checkpoint):
    """why_not names what differs; nothing is exported."""
    from transformers import AutoModelForCausalLM

    from onnxport.export.stamp import why_not
    from onnxport.spec import KVSpec

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    kv = KVSpec.uniform(LAYERS, 2, 16)
    cfg = ExportConfig()
    assert why_not(model, kv, cfg) is None
    scaling = model.model.layers[3].self_attn.scaling
    model.model.layers[3].self_attn.scaling = 0.5
    assert why_not(model, kv, cfg) == "layer 3 is not built like layer 4"
    model.model.layers[3].self_attn.scaling = scaling
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2 + ["full_attention"]
    assert "several types" in why_not(model, kv, cfg)
    assert "TorchScript" in why_not(model, kv, ExportConfig(exporter="torchscript", opset=17))


def test_layer_index_in_the_computation_falls_back(checkpoint, tmp_path, monkeypatch):
    """Attention output scaled by (1 + layer index / 2): every module is alike, but the traced
    layers 0 and 1 are not the same graph. The export traces every layer, says why, and
    verifies (a stamped copy of layer 1 would scale layer k by 1.5 and fail verification)."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaAttention.forward

    def scaled(self, *args, **kwargs):
        out, weights = forward(self, *args, **kwargs)
        return out * (1.0 + 0.5 * self.layer_idx), weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", scaled)
    m = export(checkpoint, tmp_path / "b", ExportConfig())
    record = m.graph("decoder").stamped
    assert record["stamped_layers"] == 0 and record["traced_layers"] == LAYERS
    assert "layer 0" in record["why_not"] and "layer 1" in record["why_not"]
    assert m.verification["ok"]


def test_dense_first_layer_then_moe_layers(tmp_path):
    """qwen2_moe with layer 0 dense (mlp_only_layers, as DeepSeek's first_k_dense_replace): the
    template is layer 2, checked against layer 1; the MoE copies verify."""
    ckpt = make_tiny_checkpoint("qwen2_moe", tmp_path / "moe", num_hidden_layers=LAYERS, mlp_only_layers=[0],
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                shared_expert_intermediate_size=64)
    m = export(ckpt, tmp_path / "b", ExportConfig())
    assert m.graph("decoder").stamped == {"traced_layers": 3, "stamped_layers": LAYERS - 3}
    assert m.verification["ok"]


def test_multimodal_text_decoder_is_stamped(tmp_path):
    """Qwen2.5-VL's text decoder (inputs_embeds in, mrope positions [3, batch, seq]) with 4
    layers: stamped past its vision tower's blocks, and verified."""
    import torch
    import transformers as T

    from onnxport.testing.tiny import randomize_norms

    torch.manual_seed(0)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=16, out_hidden_size=48, fullatt_block_indexes=[1])
    text = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=300, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})
    model = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vision, text_config=text)).eval()
    randomize_norms(model)
    model.save_pretrained(tmp_path / "vl")
    m = export(tmp_path / "vl", tmp_path / "b", ExportConfig(), parts=("decoder",))
    assert m.graph("decoder").stamped == {"traced_layers": 2, "stamped_layers": 2}
    assert m.verification["ok"]


#: weights in model.onnx.data for these tiny models (the default keeps graphs under 1 GiB whole)
EXTERNAL = 4096


@pytest.fixture(scope="module")
def early_bundles(checkpoint, tmp_path_factory):
    """Stamped exports with external weights: written while the graph is traced (in memory and
    --low-memory) and, for comparison, when it is saved."""
    root = tmp_path_factory.mktemp("early")
    configs = {"early": ExportConfig(external_data_threshold_bytes=EXTERNAL),
               "low_memory": ExportConfig(external_data_threshold_bytes=EXTERNAL, low_memory=True),
               "late": ExportConfig(external_data_threshold_bytes=EXTERNAL, early_weights=False)}
    return {name: (root / name, export(checkpoint, root / name, cfg)) for name, cfg in configs.items()}


def _initializers(folder) -> dict:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer}


def _no_leftovers(folder) -> None:
    assert sorted(f.name for f in folder.iterdir() if f.name.startswith(".")) == []


def test_weights_written_during_the_trace_are_the_saved_ones(early_bundles):
    """The data file written beside the trace holds, under every initializer's name, exactly
    the bytes the save writes (in memory and from the checkpoint); the seal's digest is the
    file's; the bundles verify and run alike."""
    import hashlib

    (ef, early), (lf, low), (tf, late) = (early_bundles[k] for k in ("early", "low_memory", "late"))
    data = ef / "model.onnx.data"
    record = early.graph("decoder").stamped["early_weights"]
    assert record["tensors"] >= 9 * LAYERS and 0 < record["bytes"] <= data.stat().st_size
    assert low.graph("decoder").stamped["early_weights"]["tensors"] == record["tensors"]
    assert "early_weights" not in late.graph("decoder").stamped
    for m in (early, low, late):
        assert m.verification["ok"]
    ours, mem, ref = _initializers(ef), _initializers(lf), _initializers(tf)
    assert set(ours) == set(ref) == set(mem)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
        np.testing.assert_array_equal(mem[name], ref[name], err_msg=name)
    assert early.graph("decoder").files["model.onnx.data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    x = feeds(early)
    a, b = run(ef, early, x), run(tf, late, x)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for folder in (ef, lf, tf):
        _no_leftovers(folder)


@pytest.mark.parametrize("fault", ["unread", "write_error"])
def test_early_weights_that_do_not_fit_are_written_at_save(checkpoint, early_bundles, tmp_path, monkeypatch, fault):
    """A prediction that writes a tensor the graph does not read (here an untransposed copy of
    a linear weight), or a failed write: the early file is dropped, the save writes every
    weight, the manifest says why, and the bundle equals the one written at save."""
    from onnxport.export import stream

    predict = stream.predicted_readers

    class Failing:
        def __init__(self, reader):
            self.reader = reader

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def tofile(self, file):
            raise OSError("No space left on device")

    def predicted(model, weights, path, embeds=False):
        readers = predict(model, weights, path, embeds)
        if fault == "unread":
            return readers + [weights.lazy("model.layers.2.self_attn.q_proj.weight", (64, 64)).meta["onnxport_reader"]]
        return readers[:3] + [Failing(readers[3])] + readers[4:]

    monkeypatch.setattr(stream, "predicted_readers", predicted)
    m = export(checkpoint, tmp_path / "b", ExportConfig(external_data_threshold_bytes=EXTERNAL))
    why = m.graph("decoder").stamped["early_weights"]["why_not"]
    assert ("not read by the graph" if fault == "unread" else "No space left") in why, why
    assert m.verification["ok"]
    ref_folder, _ = early_bundles["late"]
    ours, ref = _initializers(tmp_path / "b"), _initializers(ref_folder)
    assert set(ours) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    _no_leftovers(tmp_path / "b")


def test_early_weights_stop_when_stamping_falls_back(checkpoint, tmp_path, monkeypatch):
    """The layer-index-scaled attention above traces every layer: the weights written during
    the short trace are dropped (none left in the bundle) and the full trace's save writes them."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaAttention.forward

    def scaled(self, *args, **kwargs):
        out, weights = forward(self, *args, **kwargs)
        return out * (1.0 + 0.5 * self.layer_idx), weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", scaled)
    m = export(checkpoint, tmp_path / "b", ExportConfig(external_data_threshold_bytes=EXTERNAL))
    record = m.graph("decoder").stamped
    assert record["stamped_layers"] == 0 and "early_weights" not in record
    assert m.verification["ok"]
    assert (tmp_path / "b" / "model.onnx.data").stat().st_size > 0
    _no_leftovers(tmp_path / "b")


@pytest.fixture(scope="module")
def split_bundles(checkpoint, tmp_path_factory):
    """The split layout (one layer per block graph) stamped and traced whole, and the static
    split stamped: dynamo with cos/sin given, and TorchScript at opset 13 (NPU toolchains)."""
    from onnxport.config import SplitConfig

    root = tmp_path_factory.mktemp("split")
    runs = {"stamped": (ExportConfig(), SplitConfig()), "full": (ExportConfig(stamp=False), SplitConfig()),
            "static": (ExportConfig(kv_layout="bshd"),
                       SplitConfig(static=True, max_len=16, prefill_len=8, rope="outside", head="argmax")),
            "static_torchscript": (ExportConfig(kv_layout="bshd", exporter="torchscript", opset=13),
                                   SplitConfig(static=True, max_len=16, prefill_len=8, head="argmax"))}
    return {name: (root / name, export(checkpoint, root / name, cfg, split=split))
            for name, (cfg, split) in runs.items()}


def _run_graph(path, inputs) -> list:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: inputs[i.name] for i in sess.get_inputs()})


def test_split_blocks_after_two_are_stamped_and_equal_the_traced_ones(split_bundles):
    """Blocks 2-4 (prefill and decode) are copies of block 1 reading layer k's weights and
    cache; on the same inputs every block graph gives the traced graph's outputs."""
    from onnxport.export.split import example_feeds
    from onnxport.spec import PAST, SEQ, TOTAL

    (sf, stamped), (ff, full) = split_bundles["stamped"], split_bundles["full"]
    assert stamped.verification["ok"] and full.verification["ok"]
    by_file = {g.file: g for g in stamped.graphs}
    for k in range(LAYERS):
        for role in ("block", "block_cache"):
            g = by_file[f"{role}_{k}.onnx"]
            assert g.stamped == ({"from": f"{role}_1.onnx"} if k >= 2 else None), g.file
    assert not any(g.stamped for g in full.graphs)
    for k in range(2, LAYERS):
        for role in ("block", "block_cache"):
            entry = by_file[f"{role}_{k}.onnx"]
            a = onnx.load(str(sf / entry.file), load_external_data=False)
            assert [i.name for i in a.graph.input][-2:] == (
                [f"past_key_values.{k}.key", f"past_key_values.{k}.value"] if role == "block_cache"
                else [i.name for i in a.graph.input][-2:])
            assert [o.name for o in a.graph.output][1:] == [f"present.{k}.key", f"present.{k}.value"]
            inits = {i.name for i in a.graph.initializer}
            assert f"model.layers.{k}.mlp.down_proj.weight" in inits and not any(
                f"layers.{j}." in n for n in inits for j in range(LAYERS) if j != k)
            scopes = {s for n in a.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"
                      for s in eval(p.value)}  # noqa: S307 - the exporter's repr of a list of str
            assert f"model.model.layers.{k}.self_attn" in scopes and "model.model.layers.1.self_attn" not in scopes
            x = example_feeds(entry, {SEQ: 3, PAST: 4, TOTAL: 5 if role == "block_cache" else 3}, k, 1024,
                              4 if role == "block_cache" else 0)
            for u, v in zip(_run_graph(sf / entry.file, x), _run_graph(ff / entry.file, x)):
                np.testing.assert_allclose(u, v, rtol=0, atol=1e-5, err_msg=entry.file)


@pytest.mark.parametrize("name", ["static", "static_torchscript"])
def test_static_split_blocks_are_stamped(split_bundles, name):
    folder, m = split_bundles[name]
    assert m.verification["ok"]
    stamped = [g.file for g in m.graphs if (g.stamped or {}).get("from")]
    assert stamped == [f"{r}_{k}.onnx" for k in range(2, LAYERS) for r in ("block", "block_cache")]
    for k in range(2, LAYERS):  # every copy reads its own layer's weights, by their checkpoint names
        inits = {i.name for i in onnx.load(str(folder / f"block_cache_{k}.onnx"), load_external_data=False)
                 .graph.initializer}
        assert f"model.layers.{k}.mlp.down_proj.weight" in inits or any(f"layers.{k}." in n for n in inits)
        assert not any(f"layers.{j}." in n for n in inits for j in range(LAYERS) if j != k)


def test_torchscript_blocks_with_merged_weights_are_traced(tmp_path):
    """Untrained all-ones norms: TorchScript stores them once per graph, under one name, so a
    copy would read that one tensor for both norms of a layer whose norms differ. The blocks
    are traced, say why, and the bundle verifies."""
    from onnxport.config import SplitConfig

    ckpt = make_tiny_checkpoint("llama", tmp_path / "ones", untrained_norms=True, num_hidden_layers=LAYERS)
    m = export(ckpt, tmp_path / "b", ExportConfig(kv_layout="bshd", exporter="torchscript", opset=13),
               split=SplitConfig(static=True, max_len=16, prefill_len=8, head="argmax"))
    assert m.verification["ok"]
    blocks = [g for g in m.graphs if g.role in ("block", "block_cache")]
    assert not any((g.stamped or {}).get("from") for g in blocks)
    assert "merged equal tensors" in next(g for g in blocks if g.layers == [1]).stamped["why_not"]


def test_split_blocks_unlike_in_the_graph_are_traced(checkpoint, tmp_path, monkeypatch):
    """The layer-index-scaled attention above: block 1's graph is not block 0's; every block
    is traced, block 1 and later say why, and the bundle verifies."""
    from transformers.models.llama import modeling_llama

    from onnxport.config import SplitConfig

    forward = modeling_llama.LlamaAttention.forward

    def scaled(self, *args, **kwargs):
        out, weights = forward(self, *args, **kwargs)
        return out * (1.0 + 0.5 * self.layer_idx), weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", scaled)
    m = export(checkpoint, tmp_path / "b", ExportConfig(), split=SplitConfig())
    assert m.verification["ok"]
    blocks = [g for g in m.graphs if g.role in ("block", "block_cache")]
    assert not any((g.stamped or {}).get("from") for g in blocks)
    for g in blocks:
        if g.layers[0] >= 1:
            why = g.stamped["why_not"]
            first = "block_cache_0.onnx" if g.role == "block_cache" else "block_0.onnx"
            assert first in why and first.replace("_0", "_1") in why, (g.file, why)
