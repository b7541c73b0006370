"""Split and static layouts: contracts checked on the files, greedy tokens equal to the
monolithic bundle and to transformers for every decoder recipe, runtime limits enforced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_ARCHS, hf_greedy, make_tiny_checkpoint
from typer.testing import CliRunner

from onnxport.errors import RuntimeInputError
from onnxport.runtime import Generator

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 600, 23, 8]]
NEW = 24
STATIC = {"static": True, "max_len": 48, "prefill_len": 16, "pack": 2, "head": "argmax"}
STATIC_OPTS = {"opset": 13, "exporter": "torchscript", "kv_layout": "bshd"}


@pytest.mark.parametrize("model_type", list(TINY_ARCHS))
def test_split_dynamic_and_static_match_monolithic_and_transformers(model_type, exported, tiny_checkpoints):
    ref = hf_greedy(tiny_checkpoints(model_type), PROMPTS, NEW)
    mono = Generator(exported(model_type)).generate_ids(PROMPTS, max_new_tokens=NEW, eos_token_id=None).padded
    dyn_bundle = exported(model_type, split={"pack": 1}, kv_layout="bshd")
    dyn = Generator(dyn_bundle).generate_ids(PROMPTS, max_new_tokens=NEW, eos_token_id=None).padded
    sta_bundle = exported(model_type, split=STATIC, **STATIC_OPTS)
    sta = Generator(sta_bundle).generate_ids(PROMPTS, max_new_tokens=NEW, eos_token_id=None).padded
    np.testing.assert_array_equal(mono, ref)
    np.testing.assert_array_equal(dyn, ref)
    np.testing.assert_array_equal(sta, ref)
    for bundle in (dyn_bundle, sta_bundle):
        mf = json.loads((bundle / "manifest.json").read_text())
        assert mf["verification"]["ok"]
        parts = {c["shape"].split(" ")[0] for c in mf["verification"]["cases"]}
        assert {"embedding.onnx", "lm_head.onnx", "end-to-end"} <= parts


def test_static_files_are_fully_static_opset13_without_control_flow(exported):
    bundle = exported("llama", split=STATIC, **STATIC_OPTS)
    mf = json.loads((bundle / "manifest.json").read_text())
    files = [g["file"] for g in mf["graphs"]]
    assert files == ["embedding.onnx", "embedding_cache.onnx", "block_0-1.onnx", "block_cache_0-1.onnx", "lm_head.onnx"]
    for f in files:
        m = onnx.load(str(bundle / f))
        assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [13]
        assert not {n.op_type for n in m.graph.node} & {"If", "Loop", "Scan", "SequenceConstruct"}
        m = onnx.shape_inference.infer_shapes(m)
        for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
            for d in vi.type.tensor_type.shape.dim:
                assert d.HasField("dim_value"), (f, vi.name)
    # every weight stored once: prefill and decode blocks read the same bytes of weights.data
    assert all(g["external_data"] == ["weights.data"] for g in mf["graphs"]), [g["external_data"] for g in mf["graphs"]]
    ckpt_bytes = sum(f.stat().st_size for f in Path(mf["source"]["path"]).glob("*.safetensors"))
    stored = sum((bundle / f).stat().st_size for f in [*files, "weights.data"])
    assert stored < 1.2 * ckpt_bytes, (stored, ckpt_bytes)  # separate copies were ~2x
    cache = next(g for g in mf["graphs"] if g["role"] == "block_cache")
    dims = {i["name"]: i["dims"] for i in cache["inputs"] + cache["outputs"]}
    assert dims["attention_mask"] == [1, 1, 1, 49]
    assert dims["past_key_values.1.key"] == [1, 48, 2, 16]  # bshd, fixed MAX_LEN
    assert dims["present.1.key"] == [1, 1, 2, 16]  # only the new token; the runtime writes slot n


def test_static_runtime_refuses_too_long_inputs(exported):
    gen = Generator(exported("llama", split=STATIC, **STATIC_OPTS))
    with pytest.raises(RuntimeInputError, match="prefills at most 16"):
        gen.generate_ids([list(range(1, 18))], max_new_tokens=2)
    with pytest.raises(RuntimeInputError, match="exceeds this static bundle's --max-len 48"):
        gen.generate_ids([[1, 2, 3]], max_new_tokens=47)
    assert len(gen.generate_ids([[1, 2, 3]], max_new_tokens=46, eos_token_id=None).tokens[0]) == 46
    with pytest.raises(RuntimeInputError, match="cannot sample"):
        gen.generate_ids([[1, 2, 3]], do_sample=True)
    from onnxport.cli import app

    res = CliRunner().invoke(app, ["generate", str(gen.folder), "-p", "The assert statement", "-n", "60"])
    assert res.exit_code == 2 and "--max-len 48" in res.output and "Traceback" not in res.output, res.output


def test_rope_outside_topk_head_embedding_bin(exported, tiny_checkpoints):
    split = {"pack": 2, "rope": "outside", "head": "topk:4", "embedding_bin": True}
    bundle = exported("llama", split=split, kv_layout="bhsd")
    mf = json.loads((bundle / "manifest.json").read_text())
    table = next(g for g in mf["graphs"] if g["role"] == "embedding_table")
    assert table["shape"] == [1024, 64] and (bundle / "embedding.bin").stat().st_size == 1024 * 64 * 4
    block = next(g for g in mf["graphs"] if g["role"] == "block")
    # with cos / sin given the layers read no positions: the graph takes none
    assert [i["name"] for i in block["inputs"]][:4] == ["hidden_states", "attention_mask", "cos", "sin"]
    head = next(g for g in mf["graphs"] if g["role"] == "lm_head")
    assert [o["name"] for o in head["outputs"]] == ["values", "indices"]
    ours = Generator(bundle).generate_ids(PROMPTS, max_new_tokens=NEW, eos_token_id=None).padded
    np.testing.assert_array_equal(ours, hf_greedy(tiny_checkpoints("llama"), PROMPTS, NEW))
    sampled = Generator(bundle).generate_ids([[5, 6]], max_new_tokens=8, do_sample=True, seed=3, eos_token_id=None)
    assert len(sampled.tokens[0]) == 8


def test_pack_last_file_shorter_and_cli_verify(tmp_path):
    from onnxport.cli import app

    ck = make_tiny_checkpoint("qwen2", tmp_path / "q3", num_hidden_layers=3)
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["export", str(ck), "-o", str(out), "--layout", "split", "--pack", "2",
                                   "--copy-weights"])
    assert res.exit_code == 0, res.output
    mf = json.loads((out / "manifest.json").read_text())
    assert not (out / "weights.data").exists() and all(g["external_data"] == [] for g in mf["graphs"])
    assert [g["file"] for g in mf["graphs"]] == [
        "embedding.onnx", "block_0-1.onnx", "block_cache_0-1.onnx", "block_2.onnx", "block_cache_2.onnx", "lm_head.onnx"]
    assert mf["kv_cache"]["layout"] == "bshd" and mf["weights"]["skipped"] == {"lm_head.weight": "tied to model.embed_tokens.weight"}
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "block_cache_2.onnx" in res.output
    ours = Generator(out).generate_ids(PROMPTS, max_new_tokens=12, eos_token_id=None).padded
    np.testing.assert_array_equal(ours, hf_greedy(ck, PROMPTS, 12))


def test_split_bad_options(tmp_path, tiny_checkpoints):
    from onnxport.cli import app

    ck = tiny_checkpoints("llama")
    for args, needle in [
        (["--layout", "split", "--head", "top3"], "--head must be"),
        (["--static", "--max-len", "8", "--prefill-len", "16"], "--prefill-len 16"),
        (["--layout", "split", "--kv-naming", "seed"], "monolithic layout only"),
        (["--layout", "tiled"], "unknown layout"),
        (["--pack", "2"], "--pack applies to the split layout only"),  # was ignored: one model.onnx
        (["--head", "argmax"], "--head applies to the split layout only"),
    ]:
        out = tmp_path / "o"
        res = CliRunner().invoke(app, ["export", str(ck), "-o", str(out), *args])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (args, res.output)
        assert not out.exists()


def test_max_graph_size_picks_the_pack(tmp_path, tiny_checkpoints):
    """--max-graph-size chooses the most layers per block graph under the size; a size below one
    layer, or one that cannot be read, is a one-line error with nothing written."""
    from transformers import AutoModelForCausalLM

    from onnxport.cli import app
    from onnxport.config import parse_size
    from onnxport.export.split import pack_for_size
    from onnxport.recipes.generic import GenericDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints("llama"))
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    recipe = GenericDecoder("llama")
    assert pack_for_size(recipe, model, 2, int(2.5 * layer)) == 2
    assert pack_for_size(recipe, model, 2, int(1.5 * layer)) == 1
    assert parse_size("1.5GiB") == 1610612736 and parse_size("500MB") == 500_000_000
    for size, needle in [("1KB", "more than --max-graph-size"), ("lots", "cannot read the size")]:
        out = tmp_path / size
        res = CliRunner().invoke(app, ["export", str(tiny_checkpoints("llama")), "-o", str(out), "--max-graph-size", size])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
        assert not out.exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_split_layouts_convert_precision_and_reverify(dtype, tiny_checkpoints, tmp_path):
    """--dtype on the static split layout (NPU flows): every graph converted (fp16 compute with
    the range guard on its own sample inputs, or bf16-stored weights), graph I/O float32 so the
    split runtime is unchanged, weights shared again in one weights.data, and the bundle
    verified again with the dtype's tolerances (each graph, and 8 greedy tokens end to end)."""
    from onnxport.cli import app

    ckpt = tiny_checkpoints("qwen2")
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out), "--static", "--max-len", "64",
                                   "--prefill-len", "16", "--pack", "2", "--dtype", dtype])
    assert res.exit_code == 0, res.output
    mf = json.loads((out / "manifest.json").read_text())
    name = "float16" if dtype == "fp16" else "bfloat16"
    onnx_graphs = [g for g in mf["graphs"] if g["file"].endswith(".onnx")]
    assert all(g["precision"]["dtype"] == name for g in onnx_graphs)
    assert mf["verification"]["ok"] and mf["verification"]["tolerance"]["dtype"] == name
    assert sorted(p.name for p in out.glob("*.data")) == ["weights.data"]
    stored = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16
    block = onnx.load(str(out / "block_cache_0-1.onnx"), load_external_data=False)
    assert any(t.data_type == stored for t in block.graph.initializer)
    prompts = [[5, 17, 300, 42, 7, 99]]
    got = Generator(out).generate_ids(prompts, max_new_tokens=6, eos_token_id=None).padded
    np.testing.assert_array_equal(got, hf_greedy(ckpt, prompts, 6))


def test_each_split_graphs_garbage_is_collected():
    """Stamped split graphs allocate too few objects to trigger Python's cyclic collector, so
    their onnx-ir / onnxslim graphs (reference cycles holding weight copies) piled up (SmolLM2
    static split: 2.60 GB peak against 2.05 GB traced). The export collects after each graph,
    with the objects alive on entry frozen (a cheap scan), and leaves a caller's freeze alone."""
    import gc
    import weakref

    from onnxport.export.split import _collected_per_graph

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.peer, b.peer, a.weights = b, a, np.ones(1 << 20, dtype=np.float32)
        return weakref.ref(a)

    assert gc.get_freeze_count() == 0
    gc.disable()  # no automatic collection between the steps
    try:
        with _collected_per_graph() as collect:
            assert gc.get_freeze_count() > 0
            alive = cycle()
            assert alive() is not None  # unreachable, but only the cyclic collector frees it
            collect()
            assert alive() is None
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _collected_per_graph() as collect:
            collect()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
