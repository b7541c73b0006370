"""Rotary and packed q/k/v inside GroupQueryAttention (`gqa_rotary`), as onnxruntime-genai's
builder writes attention.

An `--attention gqa` export keeps the model's rotary as two com.microsoft.RotaryEmbedding nodes
per layer (fed the position_ids input), q/k/v as three Split outputs with their bias Adds and
views, and an additive attention bias built from the 2-D mask, with seqlens / total length
recomputed per layer. At decode each of those ~15 small nodes per layer costs more than its
arithmetic. This pass rewrites every layer to

    MatMul(x, W_qkv) [+ b_qkv] -> GroupQueryAttention(packed qkv, do_rotary=1, cos, sin)

with seqlens_k = ReduceSum(attention_mask) - 1 and total_sequence_length = the mask's width,
computed once. ONNX Runtime's kernel then takes each row's positions and cache slots from
seqlens_k: the graph's contract becomes *right* padding (a row's tokens in the first
sum(mask) slots, new tokens written at slot seqlens_k), which the manifest records as
`padding: right` and the generator follows. Applied only when every GroupQueryAttention node of
the graph matches (the convention is graph-wide), the attention bias is the causal + padding
mask alone (no sliding window), and nothing else reads the mask afterwards; verified again
with right-padded cases (verify/decoder.py) like every pass.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from onnxport.bundle import GQA_ATTENTION, RIGHT_PADDING
from onnxport.optimize.fusions import IrRewrite
from onnxport.optimize.passes import Candidate, GraphFile, fusion_pass, require

MSFT = "com.microsoft"
#: ops an attention bias made of the causal and padding masks alone is built from; a sliding
#: window adds a comparison (Less / Greater) of the distance, a bias from elsewhere other ops
_BIAS_OPS = {"Where", "And", "Unsqueeze", "Cast", "LessOrEqual", "Range", "Sub", "Shape", "Squeeze", "Constant",
             "Expand", "Reshape", "Slice", "Gather", "Concat", "Add", "ConstantOfShape", "Identity"}


def _attr(node, name, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _is(node, op, domain=""):
    return node is not None and node.op_type == op and node.domain in ((domain,) if domain else ("", "ai.onnx"))


def _plain_bias(value, mask) -> bool:
    """Whether `value` is computed from the 2-D mask (and shapes) with causal / padding ops
    only: exactly one LessOrEqual (causal), no window comparison, no other graph input but
    shape sources."""
    seen, stack, lesseq, reads_mask = set(), [value], 0, False
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v is mask:
            reads_mask = True
            continue
        node = v.producer()
        if node is None:
            continue  # a graph input read for its shape, or a constant
        if node.domain not in ("", "ai.onnx") or node.op_type not in _BIAS_OPS:
            return False
        lesseq += node.op_type == "LessOrEqual"
        if node.op_type == "Shape":
            continue  # only the shape of what it reads
        stack.extend(node.inputs)
    return reads_mask and lesseq == 1


def _rotary_source(value, positions):
    """(input, cos, sin) when `value` is a full-width, non-interleaved RotaryEmbedding of the
    position_ids input with constant caches; else None."""
    node = value.producer() if value is not None else None
    if not _is(node, "RotaryEmbedding", MSFT) or len(node.inputs) != 4:
        return None
    x, pos, cos, sin = node.inputs
    if pos is not positions or cos is None or sin is None or cos.const_value is None or sin.const_value is None:
        return None
    if _attr(node, "interleaved", 0) or _attr(node, "rotary_embedding_dim", 0) or _attr(node, "scale", 1.0) != 1.0:
        return None
    return x, cos, sin


def _through_view(value):
    """x when `value` is a Reshape of x that provably keeps its shape (both shapes known and
    equal); else `value`."""
    node = value.producer() if value is not None else None
    if _is(node, "Reshape") and node.inputs[0] is not None:
        a, b = node.inputs[0].shape, value.shape
        if a is not None and b is not None and len(a) == len(b) and all(
                str(x) == str(y) for x, y in zip(a, b)) and not any(str(x).startswith("unk") for x in a):
            return node.inputs[0]
    return value


def _split_part(value):
    """(split node, output index, bias constant or None) when `value` is a Split output,
    optionally plus a constant bias."""
    node = value.producer() if value is not None else None
    bias = None
    if _is(node, "Add"):
        a, b = node.inputs
        if b is not None and b.const_value is not None and a is not None:
            value, bias = a, b
        elif a is not None and a.const_value is not None and b is not None:
            value, bias = b, a
        else:
            return None
        if len(node.outputs[0].uses()) != 1:
            return None
        node = value.producer()
    if not _is(node, "Split") or len(value.uses()) != 1:
        return None
    return node, list(node.outputs).index(value), bias


def _packed_qkv(graph, q, k, v):
    """The packed projection output (+ one bias Add, created here) when q, k and v are the
    three outputs of one Split along the last axis of a MatMul, each used only here; else None."""
    import onnx_ir as ir

    parts = [_split_part(x) for x in (q, k, v)]
    if any(p is None for p in parts):
        return None
    split = parts[0][0]
    if any(p[0] is not split for p in parts) or [p[1] for p in parts] != [0, 1, 2] or len(split.outputs) != 3:
        return None
    axis = _attr(split, "axis", 0)
    shape = split.inputs[0].shape or split.outputs[0].shape
    rank = len(shape) if shape is not None else None
    if rank is None or axis not in (-1, rank - 1):
        return None
    packed = split.inputs[0]
    biases = [p[2] for p in parts]
    if all(b is None for b in biases):
        return packed
    sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is None:
        return None
    widths = [int(w) for w in np.asarray(sizes.numpy()).reshape(-1)]
    arrays = []
    for b, w in zip(biases, widths):
        arr = np.zeros(w, dtype=packed.dtype.numpy()) if b is None else np.asarray(b.const_value.numpy()).reshape(-1)
        if arr.shape != (w,):
            return None
        arrays.append(arr.astype(packed.dtype.numpy()))
    name = f"{packed.name}/bias"
    bias = ir.Value(name=name, const_value=ir.tensor(np.concatenate(arrays), name=name))
    graph.register_initializer(bias)
    add = ir.node("Add", [packed, bias], name=f"{split.name or 'qkv'}/bias_add")
    add.outputs[0].dtype, add.outputs[0].shape = packed.dtype, packed.shape
    add.outputs[0].name = f"{packed.name}/biased"
    graph.insert_after(split, [add])
    return add.outputs[0]


def _shape_pieces(value) -> list | None:
    """The entries of a 1-D shape tensor built by Concat from constants and slices of graph
    inputs' shapes: ints, or dim names of those inputs; None when anything else builds it."""
    node = value.producer() if value is not None else None
    if value is not None and value.const_value is not None:
        return [int(x) for x in np.asarray(value.const_value.numpy()).reshape(-1)]
    if _is(node, "Shape") and node.inputs[0] is not None and node.inputs[0].producer() is None:
        dims = node.inputs[0].shape
        if dims is None:
            return None
        names = [str(d) for d in dims]
        return names[_attr(node, "start", 0):_attr(node, "end", len(names))]
    if _is(node, "Concat"):
        parts = [_shape_pieces(x) for x in node.inputs]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    return None


def _drop_views_after(node) -> bool:
    """Drop the Reshape after a GroupQueryAttention node when it provably keeps the shape: GQA
    writes [batch, sequence, heads * head_dim], and the view's shape is [batch_size,
    sequence_length, -1] read from the graph inputs' named dims (or 0: copy, without
    allowzero)."""
    from onnxport.spec import BATCH, SEQ

    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or not _is(uses[0].node, "Reshape") or uses[0].idx != 0:
        return False
    view = uses[0].node
    pieces = _shape_pieces(view.inputs[1])
    copy = () if _attr(view, "allowzero", 0) else (0,)  # allowzero: a 0 is a 0, not "copy"
    if pieces is None or len(pieces) != 3 or pieces[0] not in (BATCH, *copy) or pieces[1] not in (SEQ, *copy) \
            or pieces[2] != -1:
        return False
    view.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    return True


def fuse_rotary_into_gqa(model) -> dict:
    """Rewrite `model` (onnx_ir) as the module docstring says. Returns {what: count}, empty
    (model unchanged) when any GroupQueryAttention node does not match."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    if mask is None or positions is None or mask.shape is None or len(mask.shape) != 2:
        return {}
    nodes = [n for n in graph if _is(n, "GroupQueryAttention", MSFT)]
    if not nodes:
        return {}
    plans = []
    for node in nodes:
        ins = list(node.inputs) + [None] * (11 - len(node.inputs))
        if any(ins[i] is not None for i in (7, 8, 9)) or _attr(node, "do_rotary", 0):
            return {}
        if _attr(node, "local_window_size", -1) not in (-1, None) or not _plain_bias(ins[10], mask):
            return {}
        rq, rk = _rotary_source(ins[0], positions), _rotary_source(ins[1], positions)
        if rq is None or rk is None or rq[1] is not rk[1] or rq[2] is not rk[2] or ins[2] is None:
            return {}
        plans.append((node, rq, rk, ins))
    # every layer matches: rewrite
    sum_axes = ir.Value(name="gqa_rotary/axes", const_value=ir.tensor(np.array([1], np.int64), name="gqa_rotary/axes"))
    one = ir.Value(name="gqa_rotary/one", const_value=ir.tensor(np.array(1, np.int64), name="gqa_rotary/one"))
    zero_axis = ir.Value(name="gqa_rotary/axis0", const_value=ir.tensor(np.array([0], np.int64),
                                                                          name="gqa_rotary/axis0"))
    for c in (sum_axes, one, zero_axis):
        graph.register_initializer(c)
    rows = ir.node("ReduceSum", [mask, sum_axes], attributes={"keepdims": 0}, name="gqa_rotary/row_lengths")
    last = ir.node("Sub", [rows.outputs[0], one], name="gqa_rotary/last_slot")
    seqlens = ir.node("Cast", [last.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa_rotary/seqlens_k")
    width = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="gqa_rotary/width")
    scalar = ir.node("Squeeze", [width.outputs[0], zero_axis], name="gqa_rotary/width_scalar")
    total = ir.node("Cast", [scalar.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa_rotary/total_length")
    seqlens.outputs[0].name, total.outputs[0].name = "gqa_rotary/seqlens_k", "gqa_rotary/total_sequence_length"
    graph.insert_before(next(iter(graph)), [rows, last, seqlens, width, scalar, total])
    packed_layers = views = 0
    for node, (qx, cos, sin), (kx, _, _), ins in plans:
        q, k, v = _through_view(qx), _through_view(kx), _through_view(ins[2])
        packed = _packed_qkv(graph, q, k, v)
        if packed is not None:
            q, k, v = packed, None, None
            packed_layers += 1
        new_inputs = [q, k, v, ins[3], ins[4], seqlens.outputs[0], total.outputs[0], cos, sin]
        attrs = {a.name: a for a in node.attributes.values()}
        attrs["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        attrs["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 0)
        fused = ir.Node(MSFT, "GroupQueryAttention", new_inputs, attributes=list(attrs.values()),
                        num_outputs=len(node.outputs), name=node.name)
        graph.insert_before(node, [fused])
        for old, new in zip(node.outputs, fused.outputs):
            new.dtype, new.shape = old.dtype, old.shape
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name = name
        graph.remove(node, safe=True)
        views += _drop_views_after(fused)
    RemoveUnusedNodesPass()(model)
    others = [u.node for u in mask.uses() if u.node is not rows and u.node is not width]
    if others:
        raise ValueError(f"attention_mask is still read by {[n.op_type for n in others]} after the rewrite: the "
                         "graph would mix left and right padding")
    return {"gqa_rotary_layers": len(plans), "packed_qkv_layers": packed_layers,
            **({"views_dropped": views} if views else {})}


@fusion_pass(40)
class GqaRotary(IrRewrite):
    """optimize/gqa_rotary.py: rotary and packed q/k/v inside GroupQueryAttention. The graph
    then takes right-padded batches: the candidate is checked with right-padded cases and,
    when kept, the manifest records `padding: right`."""

    name = "gqa_rotary"

    @classmethod
    def applies_to(cls, entry) -> bool:
        return entry.attention == GQA_ATTENTION and entry.padding is None

    def requires(self, graph: GraphFile) -> None:
        attention = graph.entry.attention or "the model's own attention"
        require(graph.entry.attention == GQA_ATTENTION,
                f"gqa_rotary runs on GroupQueryAttention graphs; {graph.entry.file} has {attention}",
                "export with --attention gqa")
        require(graph.entry.padding is None, f"{graph.entry.file} already takes right-padded batches",
                "optimize the bundle written by onnxport export")

    def ensures(self, graph: GraphFile) -> None:
        assert graph.entry.padding == RIGHT_PADDING

    def rewrite(self, model):
        return model, fuse_rotary_into_gqa(model)

    def candidate(self, graph: GraphFile, staged, fused: dict) -> Candidate:
        def right_padded(g: GraphFile) -> None:
            g.entry.padding = RIGHT_PADDING

        return Candidate(staged, {"fused": fused}, on_commit=right_padded,
                         check_as=replace(graph.entry, padding=RIGHT_PADDING))
