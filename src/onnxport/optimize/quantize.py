"""Weight-only int4 / int8 quantization (MatMulNBits) with a quality gate.

The packing is ONNX Runtime's `MatMulNBitsQuantizer` (RTN: round to nearest per block of
`block_size` input channels, symmetric or with zero points). What onnxport adds is the proof:

- **sensitivity**: the fp graph runs on calibration tokens with every quantizable MatMul's
  input exposed; each weight's quantized copy (the same RTN blocks, in numpy) gives that
  layer's relative output error ||X (W - Q(W))|| / ||X W||.
- **AWQ** (`awq_scales`, `apply_scales`): per input group, channel scales s = mean|X|^alpha
  searched to minimise the group's output error; the graph reads X / s through one Mul and
  packs W * s.
- **gate**: held-out perplexity and greedy-token agreement of the quantized graph against the
  fp graph, measured with ONNX Runtime. When the gate fails, the most sensitive layers move to
  int8 (10 %, 25 %, 50 %, then all); when even all-int8 fails, quantize fails with a hint.

`rtn` reproduces ONNX Runtime's block rounding exactly (tested against dequantized
MatMulNBits weights), so the errors measured here are those of the packed graph.

Everything here is onnxruntime + numpy: the quantized bundle and its gate need no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxport.optimize.probe import graph_structure, run_exposing

log = logging.getLogger(__name__)

#: fractions of the most sensitive layers moved to int8, in order, when the gate fails
ESCALATION = (0.0, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    #: MatMulNBits accuracy_level (0: unset; 4: int8 compute on CPU, faster, less exact)
    accuracy_level: int = 0


def quantizable(model) -> list[tuple[str, str, tuple[int, int], bool]]:
    """(node name, weight name, (K, N), transposed) of each MatMul whose B is a 2-D float
    initializer, or Transpose(perm=[1, 0]) of one: a tied lm_head reads the embedding table
    transposed (`transposed`: B = weight.T)."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    transposes = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])}
    out = []
    for n in model.graph.node:
        fused = _fused_transposed(n) and n.input[1] in inits
        if not fused and (n.op_type != "MatMul" or n.domain not in ("", "ai.onnx")):
            continue
        b = n.input[1]
        transposed = fused or (b not in inits and b in transposes)
        if fused:
            transposes[b] = b
        t = inits.get(transposes[b] if transposed else b)
        if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        k, m = (int(t.dims[1]), int(t.dims[0])) if transposed else (int(t.dims[0]), int(t.dims[1]))
        if k % 2 == 0:
            out.append((n.name, t.name, (k, m), transposed))
    return out


def _fused_transposed(node) -> bool:
    """com.microsoft.FusedMatMul(A, W) with W transposed and nothing else (ORT fusions turn a
    tied lm_head's MatMul(x, Transpose(embedding)) into it): a MatMul of A and W.T."""
    if node.op_type != "FusedMatMul" or node.domain != "com.microsoft" or len(node.input) != 2:
        return False
    a = {x.name: (x.i if x.type == x.INT else x.f) for x in node.attribute}
    return (a.get("transB", 0) == 1 and not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0
            and not a.get("transBatchA", 0) and not a.get("transBatchB", 0))


def untie_transposed(model) -> int:
    """Give each MatMul that reads Transpose(initializer) its own transposed initializer, so
    the quantizer (which wants B constant) packs it; unused Transposes are dropped."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    n = 0
    for name, wname, _, transposed in quantizable(model):
        if not transposed:
            continue
        node = by_name[name]
        w = numpy_helper.to_array(inits[wname])
        new = f"{wname}.T.{name}"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), new))
        node.input[1] = new
        if node.op_type == "FusedMatMul":  # now a plain MatMul of the transposed copy
            node.op_type, node.domain = "MatMul", ""
            del node.attribute[:]
        n += 1
    used = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    dead = [node for node in model.graph.node if node.op_type == "Transpose" and node.output[0] not in used]
    for node in dead:
        model.graph.node.remove(node)
    return n


def module_names(src: Path) -> dict[str, str]:
    """node name -> the torch module it came from (`model.layers.0.self_attn.v_proj`), read
    from the dynamo exporter's name scopes; nodes without them are left out."""
    import ast

    import onnx

    model = onnx.load(str(src), load_external_data=False)
    out = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    break
                if len(scopes) >= 2 and scopes[-2]:
                    # the first scope level is onnxport's wrapper (`model.`)
                    out[n.name] = scopes[-2].split(".", 1)[1] if scopes[-2].startswith("model.") else scopes[-2]
                break
    return out


def rtn(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """The dequantized RTN copy of `w` [K, N], blocks of `block` along K (as MatMulNBits)."""
    k, n = w.shape
    pad = (-k) % block
    wp = np.concatenate([w, np.zeros((pad, n), w.dtype)]) if pad else w
    b = wp.reshape(-1, block, n).astype(np.float64)
    qmax = 2 ** bits - 1
    if symmetric:
        # as ONNX Runtime (MLAS): the value of largest magnitude, with its sign, maps to
        # -2^(bits-1) exactly, so the full [-2^(b-1), 2^(b-1)-1] range is used
        idx = np.abs(b).argmax(axis=1)[:, None, :]
        signed_max = np.take_along_axis(b, idx, axis=1)
        scale = signed_max / -(2 ** (bits - 1))
        scale[scale == 0] = 1.0
        q = np.clip(np.round(b / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        deq = q * scale
    else:
        lo = np.minimum(b.min(axis=1, keepdims=True), 0)
        hi = np.maximum(b.max(axis=1, keepdims=True), 0)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1.0
        zp = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(b / scale) + zp, 0, qmax)
        deq = (q - zp) * scale
    return deq.reshape(-1, n)[:k].astype(np.float32)


def calibrate(src: Path, feeds: dict) -> dict[str, np.ndarray]:
    """The input activations of every quantizable MatMul on the calibration feeds, by value
    name (one ONNX Runtime run of `src` with those values exposed)."""
    structure = graph_structure(src)
    targets = {t[0] for t in quantizable(structure)}
    xs = sorted({n.input[0] for n in structure.graph.node if n.name in targets})
    return next(run_exposing(src, structure, xs, [feeds]))


def _layer_groups(src: Path, acts: dict):
    """Per activation read by quantizable MatMuls: (input value name, X [tokens, K],
    [(node name, W [K, N]), ...]). Weights are read one group at a time, so a large model's
    are never all in memory."""
    from onnx import numpy_helper

    structure = graph_structure(src)
    inits = {i.name: i for i in structure.graph.initializer}
    by_node = {n.name: n for n in structure.graph.node}
    groups: dict[str, list] = {}
    for name, wname, _, transposed in quantizable(structure):
        groups.setdefault(by_node[name].input[0], []).append((name, wname, transposed))
    for x_name, members in groups.items():
        ws = []
        for name, wname, transposed in members:
            w = numpy_helper.to_array(inits[wname], base_dir=str(src.parent)).astype(np.float32)
            ws.append((name, np.ascontiguousarray(w.T) if transposed else w))
        yield x_name, acts[x_name].reshape(-1, ws[0][1].shape[0]).astype(np.float32), ws


def sensitivity(src: Path, acts: dict, spec: QuantSpec, scales: dict | None = None) -> dict[str, float]:
    """node name -> relative output error ||X W - X Q(W)|| / ||X W|| of its spec.bits RTN
    weight on the calibration activations (with AWQ `scales`: X/s and Q(W s)), worst first."""
    err = {}
    for x_name, x, ws in _layer_groups(src, acts):
        s = (scales or {}).get(x_name)
        for name, w in ws:
            approx = (x / s) @ rtn(w * s[:, None], spec.bits, spec.block_size, spec.symmetric) if s is not None \
                else x @ rtn(w, spec.bits, spec.block_size, spec.symmetric)
            ref = x @ w
            err[name] = float(np.linalg.norm(ref - approx) / max(np.linalg.norm(ref), 1e-30))
    return dict(sorted(err.items(), key=lambda kv: -kv[1]))


def awq_scales(src: Path, acts: dict, spec: QuantSpec, grid: int = 20, max_tokens: int = 512) -> dict:
    """AWQ (Lin et al., 2023; the search of llm-awq / AutoAWQ): for each group of MatMuls that
    read the same activation X, per-input-channel scales s = mean|X|^alpha (normalised), alpha
    on a grid in [0, 1), minimising sum ||X W - (X / s) Q(W s)||^2 over the group. Returns
    {input value name: s} for the groups where some alpha > 0 beats plain RTN."""
    plan = {}
    for x_name, x, named in _layer_groups(src, acts):
        x, ws = x[:max_tokens], [w for _, w in named]
        refs = [x @ w for w in ws]
        mean = np.abs(x).mean(axis=0).astype(np.float64) + 1e-8
        best, best_s = None, None
        for alpha in np.arange(grid) / grid:
            s = mean ** alpha
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            e = sum(float(np.sum((r - (x / s) @ rtn(w * s[:, None], spec.bits, spec.block_size, spec.symmetric)) ** 2))
                    for r, w in zip(refs, ws))
            if best is None or e < best:
                best, best_s = e, (s if alpha > 0 else None)
        if best_s is not None:
            plan[x_name] = best_s
    return plan


def apply_scales(model, scales: dict) -> int:
    """Fold AWQ scales into the graph (ModelProto, weights loaded, ties undone): each MatMul
    reading X reads X * (1/s) through one Mul per group, its weight becomes W * s. Returns
    the number of weights scaled."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    by_node = {n.name: n for n in model.graph.node}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    n_scaled = 0
    for name, wname, _, transposed in quantizable(model):
        node = by_node[name]
        s = scales.get(node.input[0])
        if s is None or transposed:
            continue
        scaled_name = f"{node.input[0]}.awq"
        if scaled_name not in inits:
            inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{node.input[0]}.awq_inv_scale")
            model.graph.initializer.append(inv)
            inits[scaled_name] = inv
            mul = helper.make_node("Mul", [node.input[0], inv.name], [scaled_name], name=f"awq_scale/{node.input[0]}")
            idx = list(model.graph.node).index(node)
            model.graph.node.insert(idx, mul)
        w = numpy_helper.to_array(inits[wname]).astype(np.float32) * s[:, None]
        new_name = wname if uses.get(wname, 0) == 1 else f"{wname}.awq.{name}"
        t = numpy_helper.from_array(w, new_name)
        if new_name == wname:
            inits[wname].CopyFrom(t)
        else:
            model.graph.initializer.append(t)
        node.input[0], node.input[1] = scaled_name, new_name
        n_scaled += 1
    return n_scaled


def fold_bias_adds(model) -> int:
    """MatMulNBits followed by an Add of a constant [N] float bias that nothing else reads from
    the product (a packed q/k/v bias, a linear layer's bias): the bias becomes MatMulNBits'
    own `bias` input (input 5) and the Add goes, one node less per layer and step. Returns the
    number folded."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMulNBits" or (len(node.input) > 5 and node.input[5]):
            continue
        y = node.output[0]
        add = readers.get(y, [None])[0]
        if y in outputs or len(readers.get(y, [])) != 1 or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        bias = inits.get(add.input[1] if add.input[0] == y else add.input[0])
        n_out = next((a.i for a in node.attribute if a.name == "N"), None)
        if bias is None or list(bias.dims) != [n_out] or bias.data_type != TensorProto.FLOAT:
            continue
        node.input.extend([""] * (5 - len(node.input)))
        node.input.append(bias.name)
        node.output[0] = add.output[0]
        model.graph.node.remove(add)
        folded += 1
    return folded


def quantize_graph(src: Path, dst: Path, spec: QuantSpec, int8_nodes: list[str], external_threshold: int,
                   scales: dict | None = None, embedding: bool = False) -> int:
    """MatMulNBits at spec.bits for every quantizable MatMul, `int8_nodes` at 8 bits, after
    folding AWQ `scales` (if any) into activations and weights; with `embedding`, token
    embedding Gathers become GatherBlockQuantized (spec.bits, blocks along the hidden axis;
    ONNX Runtime's quantizer raises the opset to 21 for the int4 type). Constant bias Adds
    after MatMulNBits fold into it (`fold_bias_adds`); returns how many did."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnxport.bundle.weights import save_model

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    model = onnx.load(str(src))
    untie_transposed(model)
    if scales:
        apply_scales(model, scales)
    names = [t[0] for t in quantizable(model)]
    int8 = [n for n in names if n in set(int8_nodes)] if spec.bits != 8 else []
    rest = [n for n in names if n not in set(int8)]
    for bits, nodes in ((8, int8), (spec.bits, rest)):
        if not nodes:
            continue
        # nodes_to_include widens op_types_to_quantize rather than restricting it: exclude the rest
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                 accuracy_level=spec.accuracy_level or None,
                                 nodes_to_exclude=[n for n in names if n not in set(nodes)],
                                 op_types_to_quantize=("MatMul",))
        q.process()
        model = q.model.model
    if embedding:
        q = MatMulNBitsQuantizer(model, bits=spec.bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                 op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
        q.process()
        model = q.model.model
    folded = fold_bias_adds(model)
    save_model(ir.serde.deserialize_model(model), dst, external_threshold)
    return folded


