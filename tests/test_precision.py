"""--dtype fp16 / bf16: the precision guard, dtype tolerances, greedy agreement on trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_DIR, make_tiny_checkpoint
from typer.testing import CliRunner

PROMPTS = ["The built-in function len() returns", "A for loop iterates over", "Exceptions are raised when"]


@pytest.fixture(scope="module")
def demo_fp16(tmp_path_factory):
    from onnxport.api import export
    from onnxport.config import ExportConfig

    out = tmp_path_factory.mktemp("prec") / "demo-fp16"
    export(DEMO_DIR, out, ExportConfig(dtype="fp16"))
    return out


@pytest.fixture(scope="module")
def big_activations(tmp_path_factory):
    """A tiny llama whose residual stream reaches ~2e3 (embeddings scaled up, as in Gemma-like
    models): an RMSNorm's x**2 reaches ~5e6, far past fp16's 65504."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bigact")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3000.0)
    model.save_pretrained(ckpt)
    return ckpt


def _greedy_fp32(checkpoint: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def test_fp16_demo_model_manifest_runtime_and_greedy_agreement(demo_fp16):
    """Trained weights: fp16 compute with an fp16 KV cache verifies against the fp32 PyTorch
    model at the fp16 tolerances, and its greedy tokens agree with transformers' fp32 ones
    (measured: 160/160 over 5 prompts x 32 tokens, bench/precision.py)."""
    from onnxport.bundle import read_manifest
    from onnxport.runtime import Generator

    m = read_manifest(demo_fp16)
    assert m.export.dtype == "float16" and m.kv_cache.dtype == "float16"
    g = m.graph("decoder")
    assert g.precision["compute"] == "float16" and g.precision["io"]["logits"] == "float32"
    assert {t.name: t.dtype for t in g.inputs}["past_key_values.0.key"] == "float16"
    assert m.verification["ok"] and m.verification["tolerance"]["dtype"] == "float16"
    assert m.verification["float32_graph_ok"] is True  # the fp32 graph was verified before conversion
    worst = max(c["outputs"]["logits"]["max_abs_diff"] for c in m.verification["cases"])
    assert 0 < worst < 0.05  # really fp16 (not 0), and close (measured 0.0097 at logits ~12)
    data = sum(f.stat().st_size for f in demo_fp16.glob("*.onnx*"))
    assert data < 0.6 * 7_673_851  # the fp32 graph of this model is 7.67 MB

    gen = Generator(demo_fp16)
    prompts = [gen.tokenizer.encode(p) for p in PROMPTS]
    n = 24
    ref = _greedy_fp32(DEMO_DIR, prompts, n)
    got = [list(gen.generate_ids([p], max_new_tokens=n, eos_token_id=None).tokens[0]) for p in prompts]
    equal = sum(a == b for g_, r in zip(got, ref) for a, b in zip(g_, r))
    assert equal >= 0.9 * n * len(prompts), (equal, got, ref)


def test_fp16_bundle_reverifies_with_its_tolerances(demo_fp16):
    from onnxport.cli import app

    res = CliRunner().invoke(app, ["verify", str(demo_fp16)])
    assert res.exit_code == 0, res.output


def test_fp16_guard_keeps_overflowing_norm_statistics_in_fp32(big_activations, tmp_path):
    """The guard keeps each RMSNorm's Pow / ReduceMean / +eps / Sqrt in fp32 and the export
    verifies; the same conversion with nothing kept overflows (the proof the guard matters)."""
    import onnxruntime as ort

    from onnxport.api import export
    from onnxport.bundle import read_manifest
    from onnxport.config import ExportConfig
    from onnxport.optimize.precision import _convert_fp16
    from onnxport.optimize.probe import graph_structure
    from onnxport.spec import DECODER_CASES, feeds

    m = export(big_activations, tmp_path / "fp16", ExportConfig(dtype="fp16"))
    rec = m.graph("decoder").precision
    by_op = rec["kept_float32"]["by_op"]
    # every RMSNorm reads the residual stream (2 layers x 2 + the final one): its statistics
    # (x**2, mean, + eps, sqrt) stay fp32, nothing else
    assert by_op == {"Pow": 5, "ReduceMean": 5, "Add": 5, "Sqrt": 5}, by_op
    assert all("fp16 safe max" in n["reason"] for n in rec["kept_float32"]["nodes"])
    assert m.verification["ok"] and rec["guard"]["level"] == 0

    # ONNX Runtime on CPU runs fp16 ops without fp16 kernels in fp32 (inserted casts), which
    # hides overflow; onnx's reference evaluator does the fp16 arithmetic that GPU / NPU
    # kernels do. There the guarded graph holds and the same conversion with nothing kept fails.
    fp32 = tmp_path / "fp32"
    export(big_activations, fp32, ExportConfig(verify=False))
    g = read_manifest(fp32).graph("decoder")
    x = feeds(g.inputs, DECODER_CASES[0].sizes, 0, 1024)
    ref = ort.InferenceSession(str(fp32 / "model.onnx")).run(["logits"], x)[0]
    naive = tmp_path / "naive" / "model.onnx"
    naive.parent.mkdir()
    _convert_fp16(fp32 / "model.onnx", graph_structure(fp32 / "model.onnx"), naive, {}, ("logits",), 1 << 30)
    err = {name: np.abs(_fp16_arithmetic(path, x) - ref).max()
           for name, path in (("guarded", tmp_path / "fp16" / "model.onnx"), ("naive", naive))}
    assert err["guarded"] < 0.05 and err["naive"] > 1.0, err  # measured 0.0044 and 5.96


def _fp16_arithmetic(path: Path, x: dict) -> np.ndarray:
    import onnx
    from onnx.reference import ReferenceEvaluator

    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(path)).graph.input}
    xx = {k: v.astype(np.float16) if types[k] == onnx.TensorProto.FLOAT16 else v for k, v in x.items()}
    out = ReferenceEvaluator(str(path)).run(["logits"], xx)[0]
    return np.nan_to_num(out.astype(np.float32), nan=1e4, posinf=1e4, neginf=-1e4)


def test_fp16_that_cannot_be_made_safe_fails_with_a_hint_and_leaves_the_graph(big_activations, tmp_path):
    from onnxport.api import export
    from onnxport.bundle import read_manifest
    from onnxport.config import ExportConfig
    from onnxport.errors import ExportError
    from onnxport.optimize.passes import GraphFile, Verified
    from onnxport.optimize.precision import Float16
    from onnxport.spec import DECODER_CASES, feeds

    out = tmp_path / "fp32"
    export(big_activations, out, ExportConfig(verify=False))
    src = out / "model.onnx"
    before = src.read_bytes()
    g = read_manifest(out).graph("decoder")
    samples = [feeds(g.inputs, DECODER_CASES[0].sizes, 0, 1024)]
    seen = []
    with pytest.raises(ExportError) as e:
        Verified(Float16(samples), lambda p, graph: (seen.append(p) or False, "logits: max|diff| 9 (bound 0.1)", None),
                 required=True)(GraphFile(out, g))
    assert len(seen) == 2  # ranges only, then norm statistics / softmax / exp kept too
    assert "bf16" in e.value.hint and "max|diff| 9" in e.value.message
    assert src.read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # staging removed


def test_bf16_weights_of_a_bf16_checkpoint_are_lossless(tmp_path):
    """Weights stored in bf16, fp32 compute: a bf16 checkpoint round-trips exactly, so logits
    match the fp32 PyTorch model at fp32 precision and greedy tokens are equal."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.runtime import Generator

    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(ckpt)
    m = export(ckpt, tmp_path / "bf16", ExportConfig(dtype="bf16"))
    rec = m.graph("decoder").precision
    assert rec["compute"] == "float32" and rec["weights"] == "bfloat16"
    assert rec["lossless"] is True and rec["weights_converted"] >= 10
    assert m.kv_cache.dtype == "float32"
    worst = max(c["outputs"]["logits"]["max_abs_diff"] for c in m.verification["cases"])
    assert worst < 1e-3  # fp32-level agreement: the bf16 weights are the checkpoint's own
    import onnx

    stored = {}
    for t in onnx.load(str(tmp_path / "bf16" / "model.onnx")).graph.initializer:
        stored[t.data_type] = stored.get(t.data_type, 0) + len(t.raw_data)
    n_params = sum(v.numel() for v in model.state_dict().values())
    assert stored[onnx.TensorProto.BFLOAT16] == 2 * n_params  # every weight, 2 bytes each
    assert stored.get(onnx.TensorProto.FLOAT, 0) < 1024  # left in fp32: scalars only

    prompts = [[5, 17, 300, 42], [9, 8, 7]]
    ref = _greedy_fp32(ckpt, prompts, 12)
    gen = Generator(tmp_path / "bf16")
    got = [list(gen.generate_ids([p], max_new_tokens=12, eos_token_id=None).tokens[0]) for p in prompts]
    assert got == ref


def test_dtype_bad_input_is_one_line(tmp_path):
    from onnxport.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", str(DEMO_DIR), "-o", str(tmp_path / "a"), "--dtype", "fp8"])
    assert res.exit_code == 2 and "unknown dtype 'fp8'" in res.output and "fp16" in res.output
    res = runner.invoke(app, ["export", str(DEMO_DIR), "-o", str(tmp_path / "b"), "--dtype", "bf16", "--bf16-compute",
                              "--static"])
    assert res.exit_code == 2 and "--bf16-compute" in res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_encoder_parts_convert_verified_with_float32_io(dtype, encoder_checkpoints, exported_encoder, tmp_path):
    """--dtype on an encoder (SigLIP vision tower): converted after the fp32 graph verifies,
    each candidate re-verified against the PyTorch module at every size with the dtype's
    tolerances; inputs and outputs stay float32, so runners feed it unchanged; the output is
    within those tolerances of the fp32 graph's."""
    import onnx

    from onnxport.api import export
    from onnxport.config import ExportConfig, VerifyConfig
    from onnxport.runtime import EncoderRunner

    m = export(encoder_checkpoints("siglip"), tmp_path / "b", ExportConfig(exporter="auto", dtype=dtype))
    g = m.graph("encoder") if any(x.role == "encoder" for x in m.graphs) else m.graphs[0]
    name = "float16" if dtype == "fp16" else "bfloat16"
    assert g.precision["dtype"] == name and g.verification["ok"] and g.verification["dtype"] == name
    proto = onnx.load(str(tmp_path / "b" / g.file), load_external_data=False)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*proto.graph.input, *proto.graph.output])
    stored = {onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16}
    assert any(t.data_type in stored for t in proto.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours = EncoderRunner(tmp_path / "b")(pixel_values=x)["last_hidden_state"]
    ref = EncoderRunner(exported_encoder("siglip")[0])(pixel_values=x)["last_hidden_state"]
    atol, rtol, _ = VerifyConfig().for_dtype(name).atol, VerifyConfig().for_dtype(name).rtol, None
    assert np.abs(ours - ref).max() <= atol + rtol * np.abs(ref).max()


def test_bf16_compute_variant_is_verified_by_emulation_and_refused_on_cpu(tmp_path):
    """--dtype bf16 --bf16-compute (GPU / TensorRT): every float tensor of the graph is bf16
    except the norms' and softmax's fp32 islands and the fp32 I/O; it is verified on its CPU
    emulation twin (ONNX Runtime has no bf16 CPU kernels) at the bf16-compute tolerances, on
    export and again by `onnxport verify`; the CPU generator refuses it in one line."""
    import onnx

    from onnxport.cli import app

    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["export", str(DEMO_DIR), "-o", str(out), "--dtype", "bf16", "--bf16-compute"])
    assert res.exit_code == 0, res.output
    mf = json.loads((out / "manifest.json").read_text())
    p = next(g for g in mf["graphs"] if g["role"] == "decoder")["precision"]
    assert p["compute"] == "bfloat16" and p["attempts"][-1]["ok"] and "emulation" in p["verified_by"]
    assert p["kept_float32"]["by_op"]["Softmax"] == 4 and set(p["io"].values()) == {"float32"}
    proto = onnx.load(str(out / "model.onnx"))
    assert sum(t.data_type == onnx.TensorProto.BFLOAT16 for t in proto.graph.initializer) >= 28  # every linear weight
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert any(a.i == onnx.TensorProto.BFLOAT16 for n in casts for a in n.attribute)
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["generate", str(out), "-p", "x", "-n", "2"])
    assert res.exit_code != 0 and "no bf16 kernels" in res.output and "Traceback" not in res.output
