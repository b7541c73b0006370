"""`onnxport bisect` names where a bundle first parts ways (verify/bisect.py): three injected
faults, each found exactly - a wrong weight in one layer (PyTorch vs bundle, module by module),
a broken rewrite inside one module (a Softmax on the wrong axis: the modules it feeds are told
apart as victims), and an fp16 overflow in one node (fp16 bundle vs fp32 bundle, node by node);
a clean bundle has no divergence; verify's failure message carries the culprit. Bundles come from
the session's `exported` fixture (tiny llama, 2 layers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(bundle: Path, change) -> Path:
    """Apply `change(model)` to the bundle's graph and record the files as they are now (an
    edit made on purpose: otherwise the seal refuses the bundle before anything runs)."""
    from onnxport.bundle.seal import reseal

    m = onnx.load(str(bundle / "model.onnx"))
    change(m)
    onnx.save(m, str(bundle / "model.onnx"))
    reseal(bundle)
    return bundle


def _scale_weight(module: str, factor: float):
    def change(m):
        from onnxport.verify.bisect import node_scopes

        scopes = node_scopes(m)
        inits = {i.name: i for i in m.graph.initializer}
        node = next(n for n in m.graph.node if n.op_type in ("MatMul", "Gemm")
                    and scopes[n.output[0]][0].removeprefix("model.") == module and any(i in inits for i in n.input))
        init = next(inits[i] for i in node.input if i in inits)
        arr = onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array((arr.astype(np.float32) * factor).astype(arr.dtype), init.name))
    return change


@pytest.fixture(scope="module")
def base(exported):
    return exported("llama")


def test_a_clean_bundle_has_no_divergence(base):
    from onnxport.api import bisect

    record = bisect(base)
    assert record["culprit"] is None and record["modules_compared"] >= 20  # 2 layers: ~15 modules each
    assert max(r["error"] for r in record["rows"]) < 1e-5


def test_a_wrong_weight_in_one_layer_is_named(base, tmp_path):
    from onnxport.api import bisect, verify
    from onnxport.cli import app
    from onnxport.errors import VerificationError

    bad = _edit(_copy(base, tmp_path / "bad"), _scale_weight("model.layers.1.mlp.down_proj", 1.05))
    record = bisect(bad)
    assert record["culprit"]["module"] == "model.layers.1.mlp.down_proj" and record["culprit"]["op"] == "MatMul"
    assert 0.04 < record["culprit"]["error"] < 0.06  # the 5 % it was given
    page = tmp_path / "bisect.html"
    res = CliRunner().invoke(app, ["bisect", str(bad), "--html", str(page)])
    assert res.exit_code == 4 and "first divergence: module model.layers.1.mlp.down_proj" in res.output
    assert page.read_text().count("<rect") == len(record["rows"])  # one bar per module in the plot
    with pytest.raises(VerificationError) as err:  # verify's failure says where
        verify(bad)
    assert "first divergence: module model.layers.1.mlp.down_proj" in err.value.message


def test_a_broken_rewrite_in_one_module_is_named_not_its_victims(base, tmp_path):
    def softmax_on_wrong_axis(m):
        from onnxport.verify.bisect import node_scopes

        scopes = node_scopes(m)
        node = next(n for n in m.graph.node if n.op_type == "Softmax"
                    and scopes[n.output[0]][0].endswith("layers.0.self_attn"))
        for a in node.attribute:
            if a.name == "axis":
                a.i = 2

    from onnxport.api import bisect

    record = bisect(_edit(_copy(base, tmp_path / "rw"), softmax_on_wrong_axis))
    assert record["culprit"]["module"] == "model.layers.0.self_attn"
    # o_proj, inside the attention, runs first with a wrong input: a victim, not the cause
    o_proj = next(r for r in record["rows"] if r["module"] == "model.layers.0.self_attn.o_proj")
    assert o_proj["error"] > 0.1 and o_proj["input_error"] > 0.1


def test_an_fp16_overflow_in_one_node_is_named(exported, tmp_path):
    """The same model in fp32 and fp16, layer 1's attention output scaled so its residual sum
    is ~1e3: the RMSNorm's square after it is past fp16's 65504 in the fp16 graph only."""
    from onnxport.api import bisect

    f32, f16 = exported("llama"), exported("llama", dtype="fp16")
    clean = bisect(f16, against=f32)
    assert clean["culprit"] is None and clean["values_compared"] > 100
    assert max(r["error"] for r in clean["rows"]) < clean["tolerance"] / 5  # fp16 rounding: far inside
    scale = _scale_weight("model.layers.1.self_attn.o_proj", 1000.0)
    a = _edit(_copy(f32, tmp_path / "a"), scale)
    b = _edit(_copy(f16, tmp_path / "b"), scale)
    record = bisect(b, against=a)
    c = record["culprit"]
    assert c["op"] == "Pow" and c["module"] == "model.layers.1.post_attention_layernorm" and c["error"] == float("inf")


def test_bisect_refuses_what_it_cannot_compare(exported):
    from onnxport.cli import app

    ts = exported("llama", exporter="torchscript", opset=17)  # no module metadata in the graph
    res = CliRunner().invoke(app, ["bisect", str(ts)])
    assert res.exit_code == 2 and "no module metadata" in res.output and "--against" in res.output
    split = exported("llama", split={"pack": 1}, kv_layout="bshd")
    res = CliRunner().invoke(app, ["bisect", str(split)])
    assert res.exit_code == 2 and "not a monolithic decoder bundle" in res.output
