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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxport.bundle.weights import discard_staged, stage_graph
from onnxport.errors import ExportError, OnnxportError, VerificationError
from onnxport.optimize.passes import Candidate, GraphFile, GraphPass
from onnxport.optimize.probe import graph_structure
from onnxport.verify.emulate import emulate_bf16

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

class Float16(GraphPass):
    """fp16 compute with the guard described in the module doc; two candidates (the nodes past
    fp16's safe range kept in fp32, then also norm statistics, softmax and exponentials), the
    first that verifies is kept. `ranges`: the fp32 graph's value ranges on `samples` when a
    run already read them (the fp32 verification can, saving a pass over a large graph)."""

    name = "float16"

    def __init__(self, samples: list[dict], keep_io: tuple[str, ...] = ("logits",), headroom: float = 8.0,
                 external_threshold: int = 1 << 30, segment_bytes: int = 1 << 30,
                 ranges: dict[str, float] | None = None):
        self.samples, self.keep_io, self.headroom = samples, keep_io, headroom
        self.external_threshold, self.segment_bytes, self.ranges = external_threshold, segment_bytes, ranges
        self.levels: list[tuple[dict, dict]] = []  # (nodes kept in fp32, I/O dtypes) per candidate

    def candidates(self, graph: GraphFile) -> Iterator[Candidate]:
        src = graph.path
        structure = graph_structure(src)
        ranges = self.ranges if self.ranges is not None else value_ranges(src, self.samples, self.segment_bytes)
        kept = nodes_past_range(structure, ranges, FP16_MAX / self.headroom)
        escalated = {**kept, **{n.name: (n.op_type, "norm / softmax / exp kept in fp32 (escalation)")
                                for n in structure.graph.node if n.op_type in SENSITIVE_OPS and n.name not in kept}}
        for level, keep in enumerate([kept, escalated]):
            dst = stage_graph(src)
            try:
                io = _convert_fp16(src, structure, dst, keep, self.keep_io, self.external_threshold)
            except BaseException:
                discard_staged(dst)
                raise
            self.levels.append((keep, io))
            yield Candidate(dst, {"level": level, "kept": len(keep)})

    def record(self, kept, attempts, message) -> dict:
        result = PrecisionResult("float16", "float16", "float16", headroom=self.headroom, attempts=attempts)
        if kept is not None:
            result.level = kept.details["level"]
            result.kept, result.io = self.levels[result.level]
        return result.record()

    def failure(self, message: str, attempts: list[dict]) -> OnnxportError:
        return ExportError(f"fp16 drifts past its tolerance even with {len(self.levels[-1][0])} nodes kept in fp32: "
                           f"{message}", "export with --dtype bf16 (fp32's range, weights in half the bytes) or --dtype fp32")


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


class Bfloat16Compute(GraphPass):
    """A graph that computes in bf16 (GPU / TensorRT targets): ORT's float16 converter places
    the casts, norm statistics, softmax and exponentials stay fp32 (bf16's 8-bit mantissa is
    too coarse for reductions), the graph is retyped to bf16, graph I/O stays fp32. ONNX
    Runtime's CPU provider has no bf16 kernels, so the candidate is checked on its
    `emulate_bf16` twin; the record says so."""

    name = "bfloat16-compute"
    CHECKED_ON = "CPU emulation: bf16 ops computed in fp32, results rounded to bf16"

    def __init__(self, keep_io: tuple[str, ...], external_threshold: int = 1 << 30):
        self.keep_io, self.external_threshold = keep_io, external_threshold
        self.keep: dict = {}
        self.io: dict = {}

    def candidates(self, graph: GraphFile) -> Iterator[Candidate]:
        src = graph.path
        structure = graph_structure(src)
        self.keep = {n.name: (n.op_type, "norm / softmax / exp kept in fp32 (bf16 precision)")
                     for n in structure.graph.node if n.op_type in SENSITIVE_OPS}
        dst = stage_graph(src)
        try:
            self.io = _convert_fp16(src, structure, dst, self.keep, self.keep_io, self.external_threshold, bf16=True)
        except BaseException:
            discard_staged(dst)
            raise

        def twin() -> Path:
            path = dst.with_name(dst.stem + ".emulated.onnx")
            emulate_bf16(dst, path)
            return path

        yield Candidate(dst, {"level": 0, "kept": len(self.keep), "checked_on": self.CHECKED_ON}, check_file=twin)

    def record(self, kept, attempts, message) -> dict:
        result = PrecisionResult("bfloat16", "bfloat16", "bfloat16", attempts=attempts)
        if kept is not None:
            result.kept, result.io = self.keep, self.io
        return result.record()

    def failure(self, message: str, attempts: list[dict]) -> OnnxportError:
        return ExportError(f"bf16 compute drifts past its tolerance: {message}",
                           "export with --dtype bf16 (weight-only, fp32 compute) or --dtype fp16")


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

class Bfloat16Weights(GraphPass):
    """Every float weight with at least `min_elements` values stored in bf16 and read through
    Cast(to=float): fp32 compute, half the weight bytes. `label` prefixes the failure (the
    graph's name)."""

    name = "bfloat16-weights"

    def __init__(self, external_threshold: int = 1 << 30, min_elements: int = 16, label: str = ""):
        self.external_threshold, self.min_elements, self.label = external_threshold, min_elements, label
        self.result: PrecisionResult | None = None

    def candidates(self, graph: GraphFile) -> Iterator[Candidate]:
        import ml_dtypes
        import onnx_ir as ir

        from onnxport.bundle.weights import save_model

        src = graph.path
        model = ir.load(str(src))
        g = model.graph
        io = {v.name: "float32" for v in [*g.inputs, *g.outputs] if v.dtype == ir.DataType.FLOAT}
        n, inexact = 0, []
        for name, init in list(g.initializers.items()):
            t = init.const_value
            if t is None or t.dtype != ir.DataType.FLOAT or t.size < self.min_elements:
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
            g.initializers.pop(name)
            g.register_initializer(stored)
            g.insert_before(g[0], cast) if len(g) else g.append(cast)
            n += 1
        dst = stage_graph(src)
        try:
            save_model(model, dst, self.external_threshold)
        except BaseException:
            discard_staged(dst)
            raise
        del model, g
        log.info("bf16 weights: %d tensors, %d rounded", n, len(inexact))
        self.result = PrecisionResult("bfloat16", "float32", "bfloat16", io=io, converted=n, rounded=inexact)
        yield Candidate(dst)

    def record(self, kept, attempts, message) -> dict:
        return self.result.record()

    def failure(self, message: str, attempts: list[dict]) -> OnnxportError:
        return VerificationError(f"{self.label}bf16 weights drift past their tolerance: {message}",
                                 "export in float32; nothing was written")


def _to_bf16(t, bf16, inexact: list):
    def read():
        a = _released(t, lambda x: x.astype(np.float32))
        b = a.astype(bf16)
        if not np.array_equal(b.astype(np.float32), a, equal_nan=True):
            inexact.append(t.name)
        return b

    return read


