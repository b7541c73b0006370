"""fp16 / bf16 for an exported fp32 graph, with a precision guard.

float16 (compute in fp16): ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`,
the same code as onnxconverter-common) rewrites the graph, with a node block list chosen by the
guard:

1. **ranges**: run the fp32 graph on the sample inputs with every intermediate value exposed and
   keep in fp32 each node that reads or writes a value past fp16's safe range (65504 / headroom;
   the x**2 of an RMSNorm over a residual stream of ~300, Gemma-like residuals, large logits),
   and the consumers of any weight fp16 cannot hold (the converter would clip it silently).
   Values beyond +-1e30 are masks built from finfo.min: fp16 saturates them, which is what they
   mean.
2. **check**: the caller's check (verify/ against PyTorch with the fp16 tolerances). When it
   fails, escalate: also keep norm statistics, softmax and exponentials in fp32; when that
   fails too, the export fails with a hint (bf16 keeps fp32's range).

bfloat16 (weight-only): float weights are stored in bf16 (rounded to nearest even by ml_dtypes)
and cast to fp32 where they are read, so ONNX Runtime on CPU runs the graph with fp32 compute
from half the bytes. Checkpoints stored in bf16 round-trip exactly.

Weights of a large graph are never all in memory: the graph is rewritten without them and each
tensor is read from the fp32 file, cast, and written one at a time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxport.bundle.weights import commit_graph, discard_staged, stage_graph
from onnxport.errors import ExportError
from onnxport.optimize.probe import graph_structure

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
#: |values| at or beyond this are masks (finfo(float32).min and friends), not data
INF_LIKE = 1e30
#: escalation level 2 keeps these in fp32 everywhere: norm statistics, softmax, exponentials
SENSITIVE_OPS = ("Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "Sqrt", "Reciprocal", "Softmax",
                 "LogSoftmax", "Exp", "LayerNormalization", "SimplifiedLayerNormalization")
#: at most this many kept nodes are listed by name in the record (counts cover all)
LISTED = 64


@dataclass
class PrecisionResult:
    """What a conversion did; `record()` is the manifest's `Graph.precision`."""

    dtype: str
    compute: str
    weights: str
    io: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # node name -> (op type, reason)
    level: int = 0
    attempts: list = field(default_factory=list)
    headroom: float | None = None
    #: bf16: weights stored in bf16, and those whose values bf16 could not hold exactly
    converted: int = 0
    rounded: list = field(default_factory=list)

    def record(self) -> dict:
        by_op = Counter(op for op, _ in self.kept.values())
        rec = {"dtype": self.dtype, "compute": self.compute, "weights": self.weights, "io": self.io}
        if self.dtype == "bfloat16" and self.compute == "float32":
            rec["weights_converted"] = self.converted
            rec["weights_rounded"] = len(self.rounded)
            rec["lossless"] = not self.rounded  # a bf16 checkpoint round-trips exactly
        if self.dtype == "bfloat16" and self.compute == "bfloat16":
            rec["verified_by"] = "CPU emulation (ONNX Runtime has no bf16 CPU kernels): each bf16 op in fp32, rounded"
            rec["attempts"] = self.attempts
            rec["kept_float32"] = {"count": len(self.kept),
                                   "by_op": dict(Counter(op for op, _ in self.kept.values()).most_common())}
        if self.dtype == "float16":
            rec["guard"] = {
                "safe_max": FP16_MAX / self.headroom if self.headroom else None,
                "level": self.level,
                "levels": ["fp16 except nodes past the safe range",
                           "also norm statistics, softmax and exponentials in fp32"][: self.level + 1],
                "attempts": self.attempts,
            }
            rec["kept_float32"] = {
                "count": len(self.kept),
                "by_op": dict(by_op.most_common()),
                "nodes": [{"node": n, "op": op, "reason": why} for n, (op, why) in list(self.kept.items())[:LISTED]],
            }
        return rec


# --- fp32 value ranges ------------------------------------------------------------------------

class ValueRanges:
    """max finite |x| per value name (ignoring mask-like values >= 1e30), fed by `note` with
    every feed, weight and computed value of runs of the fp32 graph."""

    def __init__(self):
        self.max: dict[str, float] = {}

    def note(self, name: str, arr: np.ndarray) -> None:
        if arr.dtype.kind != "f" or arr.size == 0:
            return
        a = np.abs(arr.astype(np.float32, copy=False))
        a = a[np.isfinite(a) & (a < INF_LIKE)]
        if a.size:
            self.max[name] = max(self.max.get(name, 0.0), float(a.max()))


def value_ranges(src: Path, samples: list[dict], segment_bytes: int = 1 << 30) -> dict[str, float]:
    """max finite |x| of every float value of the graph at `src` over the sample feeds: node
    outputs, graph inputs and weights (Constant node outputs included). A graph past
    `segment_bytes` of weights runs one segment at a time."""
    from onnxport.runtime.segments import run_feeds

    ranges = ValueRanges()
    run_feeds(src, [], samples, segment_bytes, observe=ranges.note)
    return ranges.max


def nodes_past_range(structure, ranges: dict[str, float], safe_max: float) -> dict[str, tuple[str, str]]:
    """node name -> (op type, reason) for the nodes of `structure` that read or write a value
    beyond safe_max."""
    weights = {i.name for i in structure.graph.initializer}
    kept = {}
    for node in structure.graph.node:
        if node.op_type in ("Constant", "Shape", "Cast"):
            continue
        for name in [*node.input, *node.output]:
            weight = name in weights
            limit = FP16_MAX if weight else safe_max  # a weight fp16 holds is converted as is
            r = ranges.get(name, 0.0) if name else 0.0
            if r > limit:
                what = "weight" if weight else "value"
                kept[node.name] = (node.op_type, f"{what} {name} reaches |x| {r:.3g} (fp16 safe max {limit:.4g})")
                break
    return kept


# --- float16 ------------------------------------------------------------------------------------

def to_float16(src: Path, samples: list[dict], check: Callable[[Path], tuple[bool, str]] | None,
               keep_io: tuple[str, ...] = ("logits",), headroom: float = 8.0,
               external_threshold: int = 1 << 30, segment_bytes: int = 1 << 30,
               ranges: dict[str, float] | None = None) -> PrecisionResult:
    """Replace the fp32 graph `src` by its fp16 version, with the guard described in the module
    doc. `check(path)` returns (ok, message) for a candidate; None skips the dynamic check
    (ranges only). `ranges`: the value ranges of `src` on `samples` when a run already read
    them (the fp32 verification can, saving a pass over a large graph). On failure `src` is
    left as it was and ExportError is raised."""
    safe_max = FP16_MAX / headroom
    structure = graph_structure(src)
    if ranges is None:
        ranges = value_ranges(src, samples, segment_bytes)
    kept = nodes_past_range(structure, ranges, safe_max)
    escalated = {**kept, **{n.name: (n.op_type, "norm / softmax / exp kept in fp32 (escalation)")
                            for n in structure.graph.node if n.op_type in SENSITIVE_OPS and n.name not in kept}}
    result = PrecisionResult("float16", "float16", "float16", headroom=headroom)
    dst = stage_graph(src)
    for level, keep in enumerate([kept, escalated]):
        try:
            io = _convert_fp16(src, structure, dst, keep, keep_io, external_threshold)
        except BaseException:
            discard_staged(dst)
            raise
        ok, msg = check(dst) if check is not None else (True, "not checked (--no-verify)")
        result.attempts.append({"level": level, "kept": len(keep), "ok": ok, "result": msg})
        log.info("fp16 level %d (%d nodes kept in fp32): %s", level, len(keep), msg)
        if ok:
            result.kept, result.level, result.io = keep, level, io
            commit_graph(dst, src)
            return result
    discard_staged(dst)
    raise ExportError(f"fp16 drifts past its tolerance even with {len(keep)} nodes kept in fp32: {msg}",
                      "export with --dtype bf16 (fp32's range, weights in half the bytes) or --dtype fp32")


def _convert_fp16(src: Path, structure, dst: Path, keep: dict, keep_io: tuple[str, ...],
                  external_threshold: int, bf16: bool = False) -> dict:
    """ORT's converter on the graph without its weight bytes (a copy of `structure`), then the
    weights cast one by one. `bf16`: the converted graph is retyped fp16 -> bf16 (the same
    placement of casts; bf16 has fp32's range, so only precision decides what stays fp32)."""
    from unittest import mock

    import onnx
    from onnx import helper
    from onnxruntime.transformers import float16

    model = onnx.ModelProto()
    model.CopyFrom(structure)
    before = {i.name: i.data_type for i in model.graph.initializer}
    float_io = [v.name for v in [*model.graph.input, *model.graph.output]
                if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name in keep_io]

    def value_info(tensor):  # the converter reads the array only for its shape; external data has none loaded
        return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    with mock.patch.object(float16, "make_value_info_from_tensor", value_info):
        converted = float16.convert_float_to_float16(
            model, keep_io_types=float_io, disable_shape_infer=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST), node_block_list=list(keep))
    if bf16:
        _retype_to_bf16(converted.graph)
    _save_cast(converted, before, src, dst, external_threshold)
    io = {}
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16"}
    for v in [*converted.graph.input, *converted.graph.output]:
        t = v.type.tensor_type.elem_type
        if t in names:
            io[v.name] = names[t]
    return io


def _retype_to_bf16(graph) -> None:
    """Every fp16 type of a converted graph -> bf16: value infos, Cast targets, initializers
    (their bytes are cast when saved), fp16 Constant values."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    f16, b16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.tensor_type.elem_type == f16:
            v.type.tensor_type.elem_type = b16
    for t in graph.initializer:
        if t.data_type != f16:
            continue
        if t.external_data:  # no bytes loaded: cast from the source when saved
            t.data_type = b16
        else:  # embedded: the converter wrote fp16 bytes; re-round them from those values
            arr = numpy_helper.to_array(t).astype(np.float32).astype(ml_dtypes.bfloat16)
            new = numpy_helper.from_array(arr.view(np.uint16), t.name)
            new.data_type = b16
            t.CopyFrom(new)
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == f16:
                a.i = b16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f16:
                arr = numpy_helper.to_array(a.t).astype(np.float32).astype(ml_dtypes.bfloat16)
                t = numpy_helper.from_array(arr.view(np.uint16), a.t.name)
                t.data_type = b16
                a.t.CopyFrom(t)
        for g in [a.g for a in node.attribute if a.HasField("g")]:
            _retype_to_bf16(g)


def emulate_bf16(src: Path, dst: Path) -> None:
    """A twin of the bf16-compute graph at `src` that ONNX Runtime's CPU kernels run (they have
    no bf16 arithmetic): every node reading or writing bf16 computes in fp32 between a Cast of
    its bf16 inputs up and a Cast of its outputs down to bf16. Values are rounded to bf16 where
    the real graph stores them, which is what a bf16 GPU / TensorRT kernel does (fp32
    accumulation, bf16 results). Saved beside `src` so its external data resolves."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    b16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    try:  # value types: a Shape of a bf16 tensor is int64, an Equal bool, ...
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; the fallback below types the rest
        inferred = model
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*g.input, *g.output, *inferred.graph.value_info] if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = a.t.data_type
        elif node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    # values inference could not type (after contrib ops): a float op's outputs take its
    # first float input's type
    floats = (b16, f32, onnx.TensorProto.FLOAT16)
    for node in g.node:
        if node.op_type in ("Cast", "Constant"):
            continue
        known = [types[i] for i in node.input if types.get(i) in floats]
        for o in node.output:
            if o and o not in types and known:
                types[o] = known[0]
    nodes = []
    for i, node in enumerate(g.node):
        if node.op_type in ("Cast", "Constant") or not any(types.get(n) == b16 for n in [*node.input, *node.output]):
            nodes.append(node)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(node.input):
            if name and types.get(name) == b16:
                up = f"{name}__emu_f32_{i}_{k}"
                nodes.append(helper.make_node("Cast", [name], [up], to=f32, name=f"emu_up_{i}_{k}"))
                new.input[k] = up
        downs = []
        for k, name in enumerate(node.output):
            if name and types.get(name) == b16:
                wide = f"{name}__emu_wide"
                new.output[k] = wide
                downs.append(helper.make_node("Cast", [wide], [name], to=b16, name=f"emu_down_{i}_{k}"))
        nodes.append(new)
        nodes += downs
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.save(model, str(dst))


def to_bfloat16_compute(src: Path, check: Callable[[Path], tuple[bool, str]] | None, keep_io: tuple[str, ...],
                        external_threshold: int = 1 << 30) -> PrecisionResult:
    """Replace the fp32 graph `src` by one that computes in bf16 (GPU / TensorRT targets):
    ORT's float16 converter places the casts, norm statistics, softmax and exponentials stay
    fp32 (bf16's 8-bit mantissa is too coarse for reductions), the graph is retyped to bf16,
    graph I/O stays fp32. ONNX Runtime's CPU provider has no bf16 kernels, so `check` runs on
    the `emulate_bf16` twin; the record says so."""
    structure = graph_structure(src)
    keep = {n.name: (n.op_type, "norm / softmax / exp kept in fp32 (bf16 precision)")
            for n in structure.graph.node if n.op_type in SENSITIVE_OPS}
    result = PrecisionResult("bfloat16", "bfloat16", "bfloat16")
    dst = stage_graph(src)
    twin = dst.with_name(dst.stem + ".emulated.onnx")
    try:
        io = _convert_fp16(src, structure, dst, keep, keep_io, external_threshold, bf16=True)
        if check is not None:
            emulate_bf16(dst, twin)
            ok, msg = check(twin)
        else:
            ok, msg = True, "not checked (--no-verify)"
        twin.unlink(missing_ok=True)
    except BaseException:
        discard_staged(dst)
        raise
    result.attempts.append({"level": 0, "kept": len(keep), "ok": ok, "result": msg,
                            "checked_on": "CPU emulation: bf16 ops computed in fp32, results rounded to bf16"})
    if not ok:
        discard_staged(dst)
        raise ExportError(f"bf16 compute drifts past its tolerance: {msg}",
                          "export with --dtype bf16 (weight-only, fp32 compute) or --dtype fp16")
    result.kept, result.io = keep, io
    commit_graph(dst, src)
    return result


def _save_cast(proto, before: dict, src: Path, dst: Path, external_threshold: int) -> None:
    """Save `proto` (converted without weight bytes) to `dst`: initializers whose type changed
    are read from `src`'s external data and cast lazily, one tensor at a time."""
    import onnx_ir as ir

    from onnxport.bundle.weights import save_model

    model = ir.serde.deserialize_model(proto)
    _drop_round_trips(model.graph)
    model.graph.sort()  # the converter appends its casts at the end; ONNX wants topological order
    for name, init in model.graph.initializers.items():
        t = init.const_value
        if not isinstance(t, ir.ExternalTensor):
            continue
        old = ir.DataType(before.get(name, t.dtype.value))
        source = ir.ExternalTensor(t.location, t.offset, t.length, old, shape=t.shape, name=name,
                                   base_dir=str(src.parent))
        if old == t.dtype:
            init.const_value = source
        else:
            target = t.dtype.numpy() if t.dtype != ir.DataType.BFLOAT16 else __import__("ml_dtypes").bfloat16
            init.const_value = ir.LazyTensor(_caster(source, target), dtype=t.dtype, shape=t.shape, name=name)
    save_model(model, dst, external_threshold)


def _drop_round_trips(graph) -> int:
    """The converter wraps every kept node in casts, so two kept nodes in a row still pass
    their value through fp16 (fp32 -> Cast(fp16) -> Cast(fp32)): an RMSNorm's x**2 overflows
    between its Pow and its ReduceMean although both are kept. Read the fp32 value directly."""
    import onnx_ir as ir

    def cast_to(node):
        a = node.attributes.get("to")
        return a.as_int() if a is not None else None

    n = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or cast_to(node) != ir.DataType.FLOAT16:
            continue
        src = node.inputs[0]
        if src is None or src.dtype != ir.DataType.FLOAT:
            continue
        for user, _ in list(node.outputs[0].uses()):
            if user.op_type == "Cast" and cast_to(user) == ir.DataType.FLOAT and not user.outputs[0].is_graph_output():
                user.outputs[0].replace_all_uses_with(src)
                n += 1
    if n:
        _remove_unused(graph)
    return n


def _remove_unused(graph) -> None:
    """Drop nodes none of whose outputs is read (the casts left behind), last to first."""
    for node in reversed(list(graph)):
        if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)


def _released(tensor, convert):
    """convert(tensor.numpy()) (a new array), then the tensor's memory map closed: onnx-ir's
    external tensors keep their file mapped, and every page read would stay resident."""
    try:
        return convert(tensor.numpy())
    finally:
        if hasattr(tensor, "release"):
            tensor.release()


def _caster(source, np_dtype):
    def cast(a):
        if np_dtype == np.float16:
            a32 = a.astype(np.float32)
            finite = np.abs(a32[np.isfinite(a32)])
            if finite.max(initial=0.0) > FP16_MAX:
                raise ExportError(f"weight {source.name} exceeds fp16's range and would be clipped",
                                  "this is an onnxport bug: its readers should have been kept in fp32")
            return a32.astype(np_dtype)
        return a.astype(np_dtype)

    return lambda: _released(source, cast)


# --- bfloat16 (weight-only) ---------------------------------------------------------------------

def to_bfloat16_weights(src: Path, external_threshold: int = 1 << 30, min_elements: int = 16) -> PrecisionResult:
    """Replace the graph `src` by one that stores every float weight with at least
    `min_elements` values in bf16 and reads it through Cast(to=float): fp32 compute, half the
    weight bytes."""
    import ml_dtypes
    import onnx_ir as ir

    from onnxport.bundle.weights import save_model

    model = ir.load(str(src))
    graph = model.graph
    io = {v.name: "float32" for v in [*graph.inputs, *graph.outputs] if v.dtype == ir.DataType.FLOAT}
    n, inexact = 0, []
    for name, init in list(graph.initializers.items()):
        t = init.const_value
        if t is None or t.dtype != ir.DataType.FLOAT or t.size < min_elements:
            continue
        uses = list(init.uses())
        if not uses or init.is_graph_output():
            continue
        stored = ir.Value(name=name, type=ir.TensorType(ir.DataType.BFLOAT16), shape=init.shape)
        stored.const_value = ir.LazyTensor(_to_bf16(t, ml_dtypes.bfloat16, inexact), dtype=ir.DataType.BFLOAT16,
                                           shape=t.shape, name=name)
        cast = ir.node("Cast", [stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}/cast_bf16_to_fp32")
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = f"{name}_fp32", ir.DataType.FLOAT, init.shape
        for user, idx in uses:
            user.replace_input_with(idx, out)
        graph.initializers.pop(name)
        graph.register_initializer(stored)
        graph.insert_before(graph[0], cast) if len(graph) else graph.append(cast)
        n += 1
    dst = stage_graph(src)
    try:
        save_model(model, dst, external_threshold)
    except BaseException:
        discard_staged(dst)
        raise
    del model, graph
    commit_graph(dst, src)
    log.info("bf16 weights: %d tensors, %d rounded", n, len(inexact))
    return PrecisionResult("bfloat16", "float32", "bfloat16", io=io, converted=n, rounded=inexact)


def _to_bf16(t, bf16, inexact: list):
    def read():
        a = _released(t, lambda x: x.astype(np.float32))
        b = a.astype(bf16)
        if not np.array_equal(b.astype(np.float32), a, equal_nan=True):
            inexact.append(t.name)
        return b

    return read


