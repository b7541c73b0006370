"""optimize/passes.py: the pass infrastructure every optimize pass runs through. A toy pass over
a one-node graph (y = x * c) offers candidates with other constants; a check accepts only the
graphs that still compute y = 2x."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxport.bundle import GQA_ATTENTION, Graph
from onnxport.errors import InputError, OnnxportError
from onnxport.optimize.passes import (
    Candidate,
    GraphFile,
    GraphPass,
    PassResult,
    Sequential,
    Verified,
    fusion_passes,
)


def _graph(path, c: float) -> None:
    node = helper.make_node("Mul", ["x", "c"], ["y"], name="mul")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                          [numpy_helper.from_array(np.array([c], np.float32), "c")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _factor(path) -> float:
    return float(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])[0])


class Rescale(GraphPass):
    """Candidates with these constants, in order."""

    name = "rescale"

    def __init__(self, *factors: float, needs: str | None = None):
        self.factors, self.needs, self.ensured = factors, needs, []

    def requires(self, graph):
        if self.needs and graph.entry.role != self.needs:
            raise InputError(f"rescale runs on {self.needs} graphs", "export one")

    def ensures(self, graph):
        self.ensured.append(_factor(graph.path))

    def candidates(self, graph):
        from onnxport.bundle.weights import stage_graph

        for f in self.factors:
            dst = stage_graph(graph.path)
            _graph(dst, f)
            yield Candidate(dst, {"factor": f})

    def failure(self, message, attempts):
        return OnnxportError(f"rescale: {len(attempts)} candidates, none verifies: {message}")


def _doubles(path, entry) -> tuple[bool, str, dict]:
    import onnxruntime as ort

    x = np.arange(3, dtype=np.float32)
    y = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    ok = bool(np.allclose(y, 2 * x))
    return ok, "y == 2x" if ok else f"y == {float(y[1]):g}x", {"ok": ok}


@pytest.fixture()
def graph(tmp_path):
    _graph(tmp_path / "model.onnx", 2.0)
    return GraphFile(tmp_path, Graph("decoder", "model.onnx"))


def test_verified_keeps_the_first_candidate_that_passes(graph):
    p = Rescale(5.0, 2.0, 7.0)
    r = Verified(p, _doubles)(graph)
    assert r.modified and r.verification == {"ok": True}
    assert _factor(graph.path) == 2.0 and p.ensured == [2.0]
    assert r.record == {"name": "rescale", "applied": True, "factor": 2.0, "result": "y == 2x"}
    assert [p.name for p in graph.folder.iterdir()] == ["model.onnx"]  # rejected candidates discarded


def test_no_candidate_verifies_rolls_back_or_raises(graph):
    before = graph.path.read_bytes()
    r = Verified(Rescale(5.0, 3.0), _doubles)(graph)
    assert not r.modified and graph.path.read_bytes() == before
    assert r.record["applied"] is False and r.record["result"] == "rolled back: y == 3x"
    with pytest.raises(OnnxportError, match="2 candidates, none verifies: y == 3x"):
        Verified(Rescale(5.0, 3.0), _doubles, required=True)(graph)
    assert graph.path.read_bytes() == before and [p.name for p in graph.folder.iterdir()] == ["model.onnx"]


def test_no_check_keeps_the_first_candidate_and_no_candidate_says_why(graph):
    r = Rescale(9.0)(graph)  # GraphPass.call: no check (--no-verify)
    assert r.modified and _factor(graph.path) == 9.0 and r.record["result"] == "not checked (--no-verify)"
    empty = Rescale()
    empty.skipped = "no pattern matched"
    r = Verified(empty, _doubles)(graph)
    assert not r.modified and r.record == {"name": "rescale", "applied": False, "result": "no pattern matched"}


def test_requires_is_checked_before_anything_runs(graph):
    before = graph.path.read_bytes()
    with pytest.raises(InputError, match="rescale runs on block graphs"):
        Verified(Rescale(2.0, needs="block"), _doubles)(graph)
    assert graph.path.read_bytes() == before


def test_sequential_records_each_pass_in_order(graph):
    class Noop(GraphPass):
        name = "noop"

        def call(self, g):
            return PassResult(g, False, {"name": self.name, "applied": False})

    r = Sequential(Verified(Rescale(3.0), _doubles), Noop(), None, Verified(Rescale(2.0), _doubles))(graph)
    assert r.modified and [x["name"] for x in r.record["passes"]] == ["rescale", "noop", "rescale"]
    assert [x["applied"] for x in r.record["passes"]] == [False, False, True]


def test_fusion_passes_register_themselves_in_order():
    plain = [p.name for p in fusion_passes(Graph("decoder", "model.onnx"))]
    gqa = [p.name for p in fusion_passes(Graph("decoder", "model.onnx", attention=GQA_ATTENTION))]
    assert plain == ["ort_fusions", "matmul_packing", "reshape_chains"]
    assert gqa == [*plain, "gqa_rotary"]
    # a graph already right-padded has its rotary inside: gqa_rotary is not offered again
    assert "gqa_rotary" not in [p.name for p in fusion_passes(Graph("decoder", "m.onnx", attention=GQA_ATTENTION,
                                                                          padding="right"))]
