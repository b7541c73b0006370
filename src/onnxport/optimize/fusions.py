"""Graph passes for ONNX Runtime on an exported decoder, each kept only when it re-verifies:

- `ort_fusions`: onnxscript's `ort_fusions` rewriter rules (RMSNorm -> SimplifiedLayerNormalization,
  residual + RMSNorm -> SkipSimplifiedLayerNormalization, RotaryEmbedding, cos/sin caches, SDPA /
  MultiHeadAttention / GroupQueryAttention where the pattern matches, Gelu), written for graphs
  of the torch.onnx dynamo exporter;
- `matmul_packing` (optimize/packing.py): linear layers that read the same activation (q/k/v,
  gate/up) become one MatMul over their concatenated weights and a Split, as onnxruntime-genai's
  builder writes them: one weight read and one kernel per group at decode;
- `reshape_chains`: Reshape(Reshape(x)) -> Reshape(x) (the views to heads and back);
- `gqa_rotary` (optimize/gqa_rotary.py, its own file): rotary and packed q/k/v inside
  GroupQueryAttention, seqlens from the mask once: the graph then takes right-padded batches
  (`padding: right`).

Each is an `IrRewrite` pass (optimize/passes.py): the rewritten graph is a candidate staged
beside the graph, kept only when `Verified`'s check (verify/ against PyTorch) passes; otherwise
the original stays and the record says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from onnxport.optimize.passes import Candidate, GraphFile, GraphPass, fusion_pass

log = logging.getLogger(__name__)


class IrRewrite(GraphPass):
    """A rewrite of the graph in memory (onnx-ir), saved as one candidate. Subclasses give
    `rewrite(model) -> (model, {what: count})` (empty counts: nothing matched)."""

    def __init__(self, external_threshold: int = 1 << 30):
        self.external_threshold = external_threshold

    def rewrite(self, model) -> tuple[object, dict]:
        raise NotImplementedError

    def candidate(self, graph: GraphFile, staged, fused: dict) -> Candidate:
        return Candidate(staged, {"fused": fused})

    def candidates(self, graph: GraphFile) -> Iterator[Candidate]:
        import onnx_ir as ir

        from onnxport.bundle.weights import discard_staged, save_model, stage_graph

        model = ir.load(str(graph.path))
        try:
            model, fused = self.rewrite(model)
        except Exception as e:  # noqa: BLE001 - a rewriter failure leaves the graph as it was
            log.warning("%s failed: %s", self.name, e)
            self.skipped = f"rewriter failed: {str(e)[:200]}"
            return
        if not fused:
            self.skipped = "no pattern matched"
            return
        dst = stage_graph(graph.path)
        try:
            save_model(model, dst, self.external_threshold)
        except BaseException:
            discard_staged(dst)
            raise
        del model
        yield self.candidate(graph, dst, fused)

    def record(self, kept, attempts, message):
        """{"name", "applied", "fused": {what: count}, "result"}."""
        fused = kept.details["fused"] if kept is not None else (attempts[-1]["fused"] if attempts else {})
        return {"name": self.name, "applied": kept is not None, "fused": fused, "result": message}


@fusion_pass(10)
class OrtFusions(IrRewrite):
    name = "ort_fusions"

    def rewrite(self, model):
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, counts = optimize_for_ort(model)
        return model, {k: v for k, v in counts.items() if v}


@fusion_pass(20)
class MatmulPacking(IrRewrite):
    name = "matmul_packing"

    def rewrite(self, model):
        from onnxport.optimize.packing import pack_matmuls

        n = pack_matmuls(model.graph)
        return model, ({"packed_matmul_groups": n} if n else {})


@fusion_pass(30)
class ReshapeChains(IrRewrite):
    """Reshape(Reshape(x, a), b) -> Reshape(x, b) when the inner one has no other reader: a
    view to heads and back (q / k / v around RotaryEmbedding and GroupQueryAttention) costs two
    nodes per tensor per layer otherwise. Reshape keeps element order, so only `b` matters
    when the outer Reshape has allowzero=1 (as the dynamo exporter writes it); otherwise a 0
    in `b` would copy a dim of the new input, so only constant `b`s without 0 are folded."""

    name = "reshape_chains"

    def rewrite(self, model):
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
