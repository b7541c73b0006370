"""`logits_to_keep`: an optional decoder input that limits the lm_head to the last positions.

A prompt's logits are wanted at its last position only (the next token), yet a decoder graph
computes them at every position: for a 128-token prompt of Qwen2-0.5B (vocabulary 151936) the
lm_head is a quarter of the prefill's arithmetic. transformers' `forward(logits_to_keep=N)`
slices the hidden states before the lm_head; this pass gives the exported graph the same
choice without changing its contract:

    hidden -> Slice(starts=-logits_to_keep, axis=1) -> lm_head -> ... -> logits

`logits_to_keep` is an int64 scalar input backed by an initializer of value 0 (an
overridable initializer: callers that do not feed it get every position, so verification,
scoring and other runtimes see the graph as before); the generator feeds 1 at prefill. The
lm_head is found from the `logits` output backwards, through per-position ops (a Cast, a
soft-capping Tanh / Mul / Div, a bias Add) to the MatMul (or FusedMatMul / MatMulNBits) of
the hidden states with a constant weight; anything else leaves the graph as it was.

The edit is on the graph's structure only: the weights (external data) are not read or
rewritten, so it costs the same for a 7B graph as for a tiny one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from onnxport.optimize.passes import GraphFile, GraphPass, PassResult

log = logging.getLogger(__name__)

NAME = "logits_to_keep"
#: ops between the lm_head and the logits output that act on each position alone
_PER_POSITION = {"Cast", "Tanh", "Mul", "Div", "Add", "Sub", "Identity"}
_HEADS = {("", "MatMul"), ("com.microsoft", "FusedMatMul"), ("com.microsoft", "MatMulNBits")}


def _save_in_place(model, path: Path) -> None:
    """Write the edited structure over `path` (its external-data references unchanged)."""
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _lm_head(graph, output: str = "logits"):
    """The node computing the logits from the hidden states, or (None, why)."""
    producer = {o: n for n in graph.node for o in n.output}
    constant = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    inputs = {i.name for i in graph.input}
    value = output
    for _ in range(8):
        node = producer.get(value)
        if node is None:
            return None, f"{output} is not computed by a node"
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) in _HEADS:
            if node.input[0] in constant or node.input[1] not in constant and node.input[1] not in producer:
                return None, f"{node.op_type} {node.name!r} does not multiply the hidden states by a weight"
            if any(a.name in ("transA", "transBatchA") and a.i for a in node.attribute):
                return None, f"{node.op_type} {node.name!r} transposes the hidden states"
            return node, ""
        if domain or node.op_type not in _PER_POSITION:
            return None, f"{output} comes from {node.op_type}, not from an lm_head MatMul"
        varying = [i for i in node.input if i and i not in constant]
        if len(varying) != 1 or varying[0] in inputs:
            return None, f"{node.op_type} {node.name!r} before {output} mixes positions or graph inputs"
        value = varying[0]
    return None, f"no lm_head MatMul found within 8 nodes of {output}"


def add_logits_to_keep(path: Path, output: str = "logits") -> dict:
    """Give the decoder graph at `path` the optional `logits_to_keep` input (in place; the
    graph's weights are not touched). Returns {"applied": bool, "result": why}."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if NAME in {i.name for i in graph.input}:
        return {"applied": False, "result": "already has logits_to_keep"}
    if opset < 10 or model.ir_version < 4:
        return {"applied": False, "result": f"opset {opset} / IR {model.ir_version}: Slice with inputs needs opset 10"}
    out = next((o for o in graph.output if o.name == output), None)
    if out is None or len(out.type.tensor_type.shape.dim) != 3:
        return {"applied": False, "result": f"no [batch, sequence, vocab] {output} output"}
    head, why = _lm_head(graph)
    if head is None:
        return {"applied": False, "result": why}
    hidden = head.input[0]
    p = f"/{NAME}/"
    graph.initializer.extend([
        helper.make_tensor(NAME, TensorProto.INT64, [], [0]),
        helper.make_tensor(p + "one", TensorProto.INT64, [1], [1]),
        helper.make_tensor(p + "end", TensorProto.INT64, [1], [2**63 - 1]),
    ])
    graph.input.append(helper.make_tensor_value_info(NAME, TensorProto.INT64, []))
    sliced = p + "hidden_states"
    nodes = [
        helper.make_node("Neg", [NAME], [p + "neg"], name=p + "Neg"),
        helper.make_node("Reshape", [p + "neg", p + "one"], [p + "start"], name=p + "Reshape"),
        # axis 1: the sequence; starts = -0 = 0 keeps every position
        helper.make_node("Slice", [hidden, p + "start", p + "end", p + "one"], [sliced], name=p + "Slice"),
    ]
    at = list(graph.node).index(head)
    for k, n in enumerate(nodes):
        graph.node.insert(at + k, n)
    head.input[0] = sliced
    _save_in_place(model, path)
    log.info("logits_to_keep: slicing before %s %r", head.op_type, head.name)
    return {"applied": True, "result": f"before {head.op_type} {head.name!r}"}


def remove_logits_to_keep(path: Path) -> bool:
    """Undo `add_logits_to_keep` on the graph at `path` (in place): graph passes that would
    fold the initializer into a constant or drop the input run on the graph without it."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    p = f"/{NAME}/"
    cut = next((n for n in graph.node if n.name == p + "Slice"), None)
    if cut is None:
        return False
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == cut.output[0]:
                node.input[k] = cut.input[0]
    ours = [n for n in graph.node if n.name.startswith(p)]
    for n in ours:
        graph.node.remove(n)
    for t in [t for t in graph.initializer if t.name == NAME or t.name.startswith(p)]:
        graph.initializer.remove(t)
    for i in [i for i in graph.input if i.name == NAME]:
        graph.input.remove(i)
    _save_in_place(model, path)
    return True


def optional_input_record() -> dict:
    """The manifest's `graphs[].optional_inputs` entry for the input."""
    return {NAME: {"dtype": "int64", "dims": [], "default": 0,
                   "doc": "logits for the last N positions only (0: every position); feed 1 at prefill"}}


class LogitsToKeep(GraphPass):
    """Add the optional input to a finished monolithic decoder graph (its outputs unchanged
    when it is not fed); recorded in the graph's `optional_inputs`. No check: the default is
    the graph as it was, bit for bit (tests/test_optimize.py)."""

    name = NAME

    def call(self, graph: GraphFile) -> PassResult:
        rec = add_logits_to_keep(graph.path)
        if rec["applied"]:
            graph.entry.optional_inputs = {**(graph.entry.optional_inputs or {}), **optional_input_record()}
        else:
            log.info("logits_to_keep not added: %s", rec["result"])
        return PassResult(graph, rec["applied"], {"name": self.name, **rec})


class WithoutLogitsToKeep(GraphPass):
    """Take the optional input out (fusions and onnxscript's rewriter fold or drop an
    initializer-backed input): passes that run on an exported graph run between this and
    `LogitsToKeep`."""

    name = f"remove {NAME}"

    def call(self, graph: GraphFile) -> PassResult:
        removed = NAME in (graph.entry.optional_inputs or {}) and remove_logits_to_keep(graph.path)
        if removed:
            graph.entry.optional_inputs = {k: v for k, v in graph.entry.optional_inputs.items() if k != NAME} or None
        return PassResult(graph, bool(removed), {"name": self.name, "applied": bool(removed)})
