"""ONNX Runtime fusions for an exported graph: onnxscript's `ort_fusions` rewriter rules
(RMSNorm -> SimplifiedLayerNormalization, residual + RMSNorm -> SkipSimplifiedLayerNormalization,
RotaryEmbedding, cos/sin caches, SDPA / MultiHeadAttention / GroupQueryAttention where the
pattern matches, Gelu), written for graphs of the torch.onnx dynamo exporter.

The candidate is written beside the graph and replaces it only when the caller's check
(verify/ against PyTorch) passes; otherwise the original stays and the record says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def fuse_for_ort(src: Path, check: Callable[[Path], tuple[bool, str]] | None,
                 external_threshold: int = 1 << 30) -> dict:
    """Fuse `src` in place when `check(candidate)` passes. Returns the pass record:
    {"name", "applied", "fused": {fusion: count}, "result"}."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from onnxport.bundle.weights import commit_graph, discard_staged, save_model, stage_graph

    model = ir.load(str(src))
    try:
        model, counts = optimize_for_ort(model)
    except Exception as e:  # noqa: BLE001 - a rewriter failure leaves the graph as it was
        log.warning("ort fusions failed: %s", e)
        return {"name": "ort_fusions", "applied": False, "fused": {}, "result": f"rewriter failed: {str(e)[:200]}"}
    fused = {k: v for k, v in counts.items() if v}
    if not fused:
        return {"name": "ort_fusions", "applied": False, "fused": {}, "result": "no pattern matched"}
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
        log.warning("ort fusions broke parity, rolled back: %s", msg)
        return {"name": "ort_fusions", "applied": False, "fused": fused, "result": f"rolled back: {msg}"}
    commit_graph(dst, src)
    return {"name": "ort_fusions", "applied": True, "fused": fused, "result": msg}
