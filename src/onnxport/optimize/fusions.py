"""Graph passes for ONNX Runtime on an exported decoder, each kept only when it re-verifies:

- `ort_fusions`: onnxscript's `ort_fusions` rewriter rules (RMSNorm -> SimplifiedLayerNormalization,
  residual + RMSNorm -> SkipSimplifiedLayerNormalization, RotaryEmbedding, cos/sin caches, SDPA /
  MultiHeadAttention / GroupQueryAttention where the pattern matches, Gelu), written for graphs
  of the torch.onnx dynamo exporter;
- `matmul_packing` (optimize/packing.py): linear layers that read the same activation (q/k/v,
  gate/up) become one MatMul over their concatenated weights and a Split, as onnxruntime-genai's
  builder writes them: one weight read and one kernel per group at decode;
- `reshape_chains`: Reshape(Reshape(x)) -> Reshape(x) (the views to heads and back);
- `gqa_rotary` (optimize/gqa_rotary.py): rotary and packed q/k/v inside GroupQueryAttention,
  seqlens from the mask once: the graph then takes right-padded batches (`padding: right`).

Each candidate is written beside the graph and replaces it only when the caller's check
(verify/ against PyTorch) passes; otherwise the original stays and the record says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _ort_fusions(model):
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(model)
    return model, {k: v for k, v in counts.items() if v}


def _matmul_packing(model):
    from onnxport.optimize.packing import pack_matmuls

    n = pack_matmuls(model.graph)
    return model, ({"packed_matmul_groups": n} if n else {})


def _reshape_chains(model):
    """Reshape(Reshape(x, a), b) -> Reshape(x, b) when the inner one has no other reader: a
    view to heads and back (q / k / v around RotaryEmbedding and GroupQueryAttention) costs two
    nodes per tensor per layer otherwise. Reshape keeps element order, so only `b` matters
    when the outer Reshape has allowzero=1 (as the dynamo exporter writes it); otherwise a 0
    in `b` would copy a dim of the new input, so only constant `b`s without 0 are folded."""
    import numpy as np

    graph = model.graph
    n = 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        inner = node.inputs[0].producer() if node.inputs[0] is not None else None
        if inner is None or inner.op_type != "Reshape" or inner.domain not in ("", "ai.onnx"):
            continue
        if len(inner.outputs[0].uses()) != 1 or inner.outputs[0].is_graph_output():
            continue
        allowzero = node.attributes.get("allowzero")
        if not (allowzero is not None and allowzero.as_int()):  # 0s in `b` copy the input's dims
            shape = node.inputs[1].const_value if node.inputs[1] is not None else None
            if shape is None or (np.asarray(shape.numpy()) == 0).any():
                continue
        node.replace_input_with(0, inner.inputs[0])
        graph.remove(inner, safe=True)
        n += 1
    return model, ({"folded_reshapes": n} if n else {})


def _gqa_rotary(model):
    from onnxport.optimize.gqa_rotary import fuse_rotary_into_gqa

    return model, fuse_rotary_into_gqa(model)


PASSES: dict[str, Callable] = {"ort_fusions": _ort_fusions, "matmul_packing": _matmul_packing,
                               "reshape_chains": _reshape_chains, "gqa_rotary": _gqa_rotary}
#: passes that change the graph's padding contract: the verification checks their candidate
#: with right-padded inputs, and the manifest records the graph's `padding`
RIGHT_PADDING_PASSES = ("gqa_rotary",)


def run_pass(src: Path, name: str, check: Callable[[Path], tuple[bool, str]] | None,
             external_threshold: int = 1 << 30) -> dict:
    """Apply pass `name` to `src` in place when `check(candidate)` passes. Returns the pass
    record: {"name", "applied", "fused": {what: count}, "result"}."""
    import onnx_ir as ir

    from onnxport.bundle.weights import commit_graph, discard_staged, save_model, stage_graph

    model = ir.load(str(src))
    try:
        model, fused = PASSES[name](model)
    except Exception as e:  # noqa: BLE001 - a rewriter failure leaves the graph as it was
        log.warning("%s failed: %s", name, e)
        return {"name": name, "applied": False, "fused": {}, "result": f"rewriter failed: {str(e)[:200]}"}
    if not fused:
        return {"name": name, "applied": False, "fused": {}, "result": "no pattern matched"}
    dst = stage_graph(src)
    try:
        save_model(model, dst, external_threshold)
        del model
        ok, msg = check(dst) if check is not None else (True, "not checked (--no-verify)")
    except BaseException:
        discard_staged(dst)
        raise
    if not ok:
        discard_staged(dst)
        log.warning("%s broke parity, rolled back: %s", name, msg)
        return {"name": name, "applied": False, "fused": fused, "result": f"rolled back: {msg}"}
    commit_graph(dst, src)
    return {"name": name, "applied": True, "fused": fused, "result": msg}


def fuse_for_ort(src: Path, check: Callable[[Path], tuple[bool, str]] | None,
                 external_threshold: int = 1 << 30) -> dict:
    """The `ort_fusions` pass (see run_pass)."""
    return run_pass(src, "ort_fusions", check, external_threshold)
