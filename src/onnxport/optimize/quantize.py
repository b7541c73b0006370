"""Weight-only int4 / int8 quantization (MatMulNBits) with a quality gate.

The packing is ONNX Runtime's `MatMulNBitsQuantizer` (RTN: round to nearest per block of
`block_size` input channels, symmetric or with zero points). What onnxport adds is the proof:

- **sensitivity**: the fp graph runs on calibration tokens with every quantizable MatMul's
  input exposed; each weight's quantized copy (the same RTN blocks, in numpy) gives that
  layer's relative output error ||X (W - Q(W))|| / ||X W||.
- **AWQ** (`awq_scales`, `apply_scales`): per input group, channel scales s = mean|X|^alpha
  searched to minimise the group's output error; the graph reads X / s through one Mul and
  packs W * s.
- **GPTQ** (`gptq`): each weight's input channels are rounded in order and each rounding
  error is spread over the channels still to come through the inverse Hessian of the
  calibration activations; the codes are packed as ONNX Runtime packs its own (`pack`,
  byte-identical on RTN codes) and replace its RTN rounding (`write_codes`).
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


def head_node(src: Path, output: str = "logits") -> str | None:
    """The quantizable MatMul nearest the `logits` output walking back through the graph: the
    output head (lm_head, tied or not), or None."""
    structure = graph_structure(src)
    targets = {t[0] for t in quantizable(structure)}
    producer = {o: n for n in structure.graph.node for o in n.output}
    frontier, seen = [output], set()
    while frontier:
        nxt = []
        for v in frontier:
            n = producer.get(v)
            if n is None or n.name in seen:
                continue
            if n.name in targets:
                return n.name
            seen.add(n.name)
            nxt.extend(n.input)
        frontier = nxt
    return None


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


def grid(b: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of blocks `b` [..., block, N] (reduced along the block axis, kept as
    size 1), as ONNX Runtime (MLAS) sets them: symmetric, the value of largest magnitude maps,
    with its sign, to -2^(bits-1) exactly (zero point 2^(bits-1)); asymmetric, [min(., 0),
    max(., 0)] spans [0, 2^bits - 1]. Scales are float32 as stored; a code is q = clip(round(w /
    scale) + zp) and stands for (q - zp) x scale."""
    qmax = 2 ** bits - 1
    if symmetric:
        idx = np.abs(b).argmax(axis=-2)[..., None, :]
        scale = (np.take_along_axis(b, idx, axis=-2) / -(2 ** (bits - 1))).astype(np.float32)
        scale[scale == 0] = 1.0
        return scale, np.full(scale.shape, 2 ** (bits - 1), np.float32)
    lo = np.minimum(b.min(axis=-2, keepdims=True), 0).astype(np.float32)
    hi = np.maximum(b.max(axis=-2, keepdims=True), 0).astype(np.float32)
    scale = (hi - lo) / np.float32(qmax)
    scale[scale == 0] = 1.0
    return scale, np.clip(np.round(-lo / scale), 0, qmax).astype(np.float32)


def rtn(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """The dequantized RTN copy of `w` [K, N], blocks of `block` along K (as MatMulNBits)."""
    return rtn_codes(w, bits, block, symmetric).dequantize()


def rtn_codes(w: np.ndarray, bits: int, block: int, symmetric: bool) -> "Codes":
    """Round to nearest: the codes ONNX Runtime's quantizer packs for `w` [K, N]."""
    k, n = w.shape
    pad = (-k) % block
    wp = np.concatenate([w, np.zeros((pad, n), w.dtype)]) if pad else w
    b = wp.reshape(-1, block, n).astype(np.float64)
    scale, zp = grid(b, bits, symmetric)
    q = np.clip(np.round(b / scale) + zp, 0, 2 ** bits - 1)
    return Codes(q.reshape(-1, n).astype(np.uint8), scale[:, 0], zp[:, 0], k)


@dataclass
class Codes:
    """A weight [K, N] as MatMulNBits stores it: unsigned codes [K padded to the block, N],
    float32 scales and zero points [K / block, N] (dequantized: (q - zp) x scale)."""

    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    k: int

    def dequantize(self) -> np.ndarray:
        block = self.q.shape[0] // self.scale.shape[0]
        b = self.q.reshape(-1, block, self.q.shape[1]).astype(np.float32)
        return ((b - self.zp[:, None]) * self.scale[:, None]).reshape(self.q.shape)[: self.k]


def gptq(w: np.ndarray, x: np.ndarray | None, bits: int, block: int, symmetric: bool,
         damp: float = 0.01, lazy: int = 128, actorder: bool = False, hessian: np.ndarray | None = None) -> Codes:
    """GPTQ (Frantar et al., 2022; the algorithm of the reference code and AutoGPTQ): input
    channels are quantized one at a time, each one's rounding error spread over the channels not
    yet quantized through the inverse Hessian H = X^T X (+ `damp` x its mean diagonal) of the
    calibration activations `x` [tokens, K] (or `hessian` given). Blocks stay contiguous along K
    as MatMulNBits needs: in order, each block's scale and zero point are set (as `grid`) when
    the block is reached, from the weights as updated so far; with `actorder`, channels go in
    order of decreasing H diagonal and every block's scale is set first from the original
    weights (AutoGPTQ's static groups)."""
    k, n = w.shape
    kp = k + (-k) % block
    lazy = max(lazy - lazy % block, block)
    W = np.zeros((kp, n), np.float64)
    W[:k] = w
    H = np.zeros((kp, kp), np.float64)
    H[:k, :k] = hessian if hessian is not None else x.astype(np.float64).T @ x.astype(np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(kp)] += damp * np.mean(np.diag(H))
    qmax = 2 ** bits - 1
    S = np.zeros((kp // block, n), np.float32)
    Z = np.zeros((kp // block, n), np.float32)
    perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(kp)
    if actorder:
        scale, zp = grid(W.reshape(-1, block, n), bits, symmetric)
        S[:], Z[:] = scale[:, 0], zp[:, 0]
        W, H = W[perm], H[perm][:, perm]
    # U: the upper Cholesky factor of H^-1 (H^-1 = U^T U), as the reference implementation
    hinv = np.linalg.inv(H)
    U = np.linalg.cholesky((hinv + hinv.T) / 2).T
    Q = np.zeros((kp, n), np.uint8)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1, E1, U1 = W[i1:i2].copy(), np.zeros((i2 - i1, n)), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            g = perm[r] // block
            if not actorder and r % block == 0:
                scale, zp = grid(W1[i:i + block][None], bits, symmetric)
                S[g], Z[g] = scale[0, 0], zp[0, 0]
            scale, zp = S[g].astype(np.float64), Z[g].astype(np.float64)
            q = np.clip(np.round(W1[i] / scale) + zp, 0, qmax)
            Q[perm[r]] = q
            err = (W1[i] - (q - zp) * scale) / U1[i, i]
            W1[i:] -= U1[i, i:, None] * err[None, :]
            E1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ E1
    return Codes(Q, S, Z, k)


def pack(codes: Codes, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' initializers for `codes`: B uint8 [N, K / block, block x bits / 8] (4 bits:
    two codes a byte, the lower K index in the low nibble), scales float32 [N, K / block], zero
    points uint8 [N, ceil(K / block / 2)] (4 bits, packed the same way) or [N, K / block].
    Codes past K (the last block's padding) are written 0, a missing zero-point nibble 8, as
    ONNX Runtime writes them."""
    kp, n = codes.q.shape
    nb = codes.scale.shape[0]
    q = codes.q.copy()
    q[codes.k:] = 0  # as ONNX Runtime writes the padding past K
    q = q.T.reshape(n, nb, kp // nb)
    zp = codes.zp.T.astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
        if nb % 2:
            zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)  # as ONNX Runtime pads it
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
    return np.ascontiguousarray(q, np.uint8), np.ascontiguousarray(codes.scale.T), np.ascontiguousarray(zp)


def write_codes(model, codes: dict[str, Codes], bits: int) -> int:
    """Replace the packed weights of the MatMulNBits nodes made from the MatMuls named in
    `codes` (ONNX Runtime's quantizer names them `<name>_Q<bits>`) by those codes; a symmetric
    node without a zero-point input must hold the default zero point 2^(bits-1). Returns how
    many were replaced."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        c = codes.get(node.name[: -len(f"_Q{bits}")]) if node.name.endswith(f"_Q{bits}") else None
        if c is None or node.op_type != "MatMulNBits":
            continue
        b, scale, zp = pack(c, bits)
        has_zp = len(node.input) > 3 and node.input[3]
        if not has_zp and not np.all(c.zp == 2 ** (bits - 1)):
            raise ValueError(f"{node.name}: codes with zero points for a node without them")
        for idx, arr in ((1, b), (2, scale), (3, zp)):
            if idx == 3 and not has_zp:
                continue
            old = inits[node.input[idx]]
            if tuple(old.dims) != arr.shape and int(np.prod(old.dims)) == arr.size:
                arr = arr.reshape(tuple(old.dims))
            if tuple(old.dims) != arr.shape:
                raise ValueError(f"{node.name}: {node.input[idx]} is {tuple(old.dims)}, the codes give {arr.shape}")
            old.CopyFrom(numpy_helper.from_array(arr, old.name))
        done += 1
    return done


@dataclass
class Calibration:
    """What the calibration text tells about each activation X read by quantizable MatMuls (by
    value name): H = X^T X over every calibration token (float32; what GPTQ and the output errors
    need: ||X D||^2 = tr(D^T H D)), and the first `sample` tokens of X itself (AWQ's scale
    search)."""

    hessians: dict
    samples: dict


def calibrate(src: Path, feeds: dict | list[dict], sample: int = 512) -> Calibration:
    """Run `src` on the calibration feeds (one feed, or windows of a text longer than the
    model's positions) with the inputs of every quantizable MatMul exposed, one window at a time:
    memory is one window's activations plus a K x K matrix per activation, however long the text."""
    structure = graph_structure(src)
    targets = {t[0] for t in quantizable(structure)}
    xs = sorted({n.input[0] for n in structure.graph.node if n.name in targets})
    hessians: dict = {}
    samples: dict = {}
    for run in run_exposing(src, structure, xs, feeds if isinstance(feeds, list) else [feeds]):
        for x in xs:
            a = run[x].reshape(-1, run[x].shape[-1]).astype(np.float32)
            if x in hessians:
                hessians[x] += a.T @ a
            else:
                hessians[x] = a.T @ a
            have = samples.get(x)
            if have is None or len(have) < sample:
                samples[x] = a[:sample].copy() if have is None else np.concatenate([have, a[:sample - len(have)]])
    return Calibration(hessians, samples)


def _layer_groups(src: Path):
    """Per activation read by quantizable MatMuls: (input value name, [(node name, W [K, N]),
    ...]). Weights are read one group at a time, so a large model's are never all in memory."""
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
        yield x_name, ws


def _quadratic(h: np.ndarray, d: np.ndarray) -> float:
    """tr(D^T H D) = ||X D||^2 for H = X^T X."""
    return float(np.einsum("kn,kn->", h @ d, d))


def sensitivity(src: Path, calib: Calibration, spec: QuantSpec, scales: dict | None = None,
                codes: dict | None = None) -> dict[str, float]:
    """node name -> relative output error ||X W - X Q(W)|| / ||X W|| of its spec.bits weight
    over every calibration token: RTN, with AWQ `scales` X/s and Q(W s), or the given `codes`
    (GPTQ); worst first."""
    err = {}
    for x_name, ws in _layer_groups(src):
        h = calib.hessians[x_name]
        s = (scales or {}).get(x_name)
        for name, w in ws:
            w64 = w.astype(np.float64)
            if codes is not None and name in codes:
                d = w64 - codes[name].dequantize()
            elif s is not None:  # X W - (X / s) Q(W s) = (X / s) (W s - Q(W s))
                ws_ = w * s[:, None]
                d = (ws_ - rtn(ws_, spec.bits, spec.block_size, spec.symmetric)).astype(np.float64) / s[:, None]
            else:
                d = w64 - rtn(w, spec.bits, spec.block_size, spec.symmetric)
            err[name] = float(np.sqrt(max(_quadratic(h, d), 0.0) / max(_quadratic(h, w64), 1e-30)))
    return dict(sorted(err.items(), key=lambda kv: -kv[1]))


def gptq_codes(src: Path, calib: Calibration, spec: QuantSpec, actorder: bool = True,
               skip: set | None = None) -> dict[str, Codes]:
    """node name -> GPTQ codes of its weight, from the Hessian of the activations it reads
    (nodes in `skip`, as a head kept at int8, are left out)."""
    out = {}
    for x_name, ws in _layer_groups(src):
        for name, w in ws:
            if name in (skip or ()):
                continue
            out[name] = gptq(w, None, spec.bits, spec.block_size, spec.symmetric, actorder=actorder,
                             hessian=calib.hessians[x_name])
    return out


def awq_scales(src: Path, calib: Calibration, spec: QuantSpec, grid: int = 20) -> dict:
    """AWQ (Lin et al., 2023; the search of llm-awq / AutoAWQ): for each group of MatMuls that
    read the same activation X, per-input-channel scales s = mean|X|^alpha (normalised), alpha
    on a grid in [0, 1), minimising sum ||X W - (X / s) Q(W s)||^2 over the group (on the
    calibration sample). Returns {input value name: s} for the groups where some alpha > 0
    beats plain RTN."""
    plan = {}
    for x_name, named in _layer_groups(src):
        x, ws = calib.samples[x_name], [w for _, w in named]
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
                   scales: dict | None = None, embedding: bool = False, codes: dict | None = None) -> int:
    """MatMulNBits at spec.bits for every quantizable MatMul, `int8_nodes` at 8 bits, after
    folding AWQ `scales` (if any) into activations and weights; with `embedding`, token
    embedding Gathers become GatherBlockQuantized (spec.bits, blocks along the hidden axis;
    ONNX Runtime's quantizer raises the opset to 21 for the int4 type). Constant bias Adds
    after MatMulNBits fold into it (`fold_bias_adds`); returns how many did. `codes` (GPTQ)
    replace the rounding of the spec.bits nodes they name."""
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
        if codes and bits == spec.bits:
            write_codes(model, {n: codes[n] for n in nodes if n in codes}, bits)
    if embedding:
        q = MatMulNBitsQuantizer(model, bits=spec.bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                 op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
        q.process()
        model = q.model.model
    folded = fold_bias_adds(model)
    save_model(ir.serde.deserialize_model(model), dst, external_threshold)
    return folded


