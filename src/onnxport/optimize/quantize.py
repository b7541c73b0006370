"""Weight-only int4 / int8 quantization (MatMulNBits) with a quality gate.

The packing is ONNX Runtime's `MatMulNBitsQuantizer` (RTN: round to nearest per block of
`block_size` input channels, symmetric or with zero points). What onnxport adds is the proof:

- **sensitivity**: the fp graph runs on calibration tokens with every quantizable MatMul's
  input exposed; each weight's quantized copy (the same RTN blocks, in numpy) gives that
  layer's relative output error ||X (W - Q(W))|| / ||X W||.
- **gate**: held-out perplexity and greedy-token agreement of the quantized graph against the
  fp graph, measured with ONNX Runtime. When the gate fails, the most sensitive layers move to
  int8 (10 %, 25 %, 50 %, then all); when even all-int8 fails, quantize fails with a hint.

Everything here is onnxruntime + numpy: the quantized bundle and its gate need no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        b = n.input[1]
        transposed = b not in inits and b in transposes
        t = inits.get(transposes[b] if transposed else b)
        if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        k, m = (int(t.dims[1]), int(t.dims[0])) if transposed else (int(t.dims[0]), int(t.dims[1]))
        if k % 2 == 0:
            out.append((n.name, t.name, (k, m), transposed))
    return out


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
        amax = np.abs(b).max(axis=1, keepdims=True)
        scale = amax / (2 ** (bits - 1))  # ORT: scale = absmax / (2^(bits-1)), q in [-2^(b-1), 2^(b-1)-1]
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


def sensitivity(src: Path, feeds: dict, spec: QuantSpec) -> dict[str, float]:
    """node name -> relative output error of its int(spec.bits) RTN weight on the calibration
    activations (sorted, worst first)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    targets = quantizable(model)
    xs = sorted({model.graph.node[i].input[0] for i, n in enumerate(model.graph.node)
                 if n.name in {t[0] for t in targets}})
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=x) for x in xs if x not in known)
    probe = src.with_name(src.stem + ".calib.onnx")
    try:
        onnx.save(model, str(probe))
        sess = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        acts = dict(zip(xs, sess.run(xs, feeds)))
        del sess
    finally:
        probe.unlink(missing_ok=True)
    inits = {i.name: i for i in model.graph.initializer}
    by_node = {n.name: n for n in model.graph.node}
    err = {}
    for name, wname, _, transposed in targets:
        w = numpy_helper.to_array(inits[wname], base_dir=str(src.parent)).astype(np.float32)
        w = np.ascontiguousarray(w.T) if transposed else w
        x = acts[by_node[name].input[0]].reshape(-1, w.shape[0])
        ref = x @ w
        err[name] = float(np.linalg.norm(x @ (w - rtn(w, spec.bits, spec.block_size, spec.symmetric)))
                          / max(np.linalg.norm(ref), 1e-30))
    return dict(sorted(err.items(), key=lambda kv: -kv[1]))


def quantize_graph(src: Path, dst: Path, spec: QuantSpec, int8_nodes: list[str], external_threshold: int) -> None:
    """MatMulNBits at spec.bits for every quantizable MatMul, `int8_nodes` at 8 bits."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnxport.bundle.weights import save_model

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    model = onnx.load(str(src))
    untie_transposed(model)
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
    save_model(ir.serde.deserialize_model(model), dst, external_threshold)


