"""Graph scans the targets share: each returns findings naming the graph, node, op and module
(from the exporter's node metadata) of what a target's compiler rejects."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxport.targets import Finding

CONTROL_FLOW = {"If", "Loop", "Scan"}
#: output shapes that depend on values, not on input shapes
DATA_DEPENDENT = {"NonZero", "Unique", "NonMaxSuppression", "Compress", "TopK"}


def graphs(bundle: Path, manifest):
    """(manifest graph, onnx.ModelProto without weights) for every .onnx graph of the bundle."""
    import onnx

    from onnxport.bundle import resolve_inside

    for g in manifest.graphs:
        if g.file.endswith(".onnx"):
            yield g, onnx.load(str(resolve_inside(bundle, g.file)), load_external_data=False)


def _module(node) -> str | None:
    from onnxport.verify.bisect import checkpoint_path, scope_of

    return checkpoint_path(scope_of(node)) or None


def finding(severity: str, message: str, g, node=None) -> Finding:
    return Finding(severity, message, g.file, node.name if node is not None else None,
                   (f"{node.domain}.{node.op_type}" if node.domain else node.op_type) if node is not None else None,
                   _module(node) if node is not None else None)


def contrib_ops(g, model, severity: str, why: str, allowed: frozenset = frozenset()) -> list[Finding]:
    """Nodes outside the standard ONNX domain (com.microsoft: GroupQueryAttention, MatMulNBits,
    RotaryEmbedding, the fusions), one finding per op type, except the op types in `allowed`."""
    seen, out = set(), []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") and node.op_type not in allowed \
                and (node.domain, node.op_type) not in seen:
            seen.add((node.domain, node.op_type))
            count = sum(n.domain == node.domain and n.op_type == node.op_type for n in model.graph.node)
            out.append(finding(severity, f"{node.domain}.{node.op_type} x{count}: {why}", g, node))
    return out


def ops_named(g, model, ops: set[str], severity: str, why: str) -> list[Finding]:
    seen, out = set(), []
    for node in model.graph.node:
        if node.op_type in ops and node.domain in ("", "ai.onnx") and node.op_type not in seen:
            seen.add(node.op_type)
            out.append(finding(severity, f"{node.op_type}: {why}", g, node))
    return out


def dynamic_dims(g, severity: str) -> list[Finding]:
    """Inputs / outputs with a named (dynamic) dim."""
    out = []
    for t in [*g.inputs, *g.outputs]:
        named = [d for d in t.dims if isinstance(d, str)]
        if named:
            out.append(Finding(severity, f"{t.name} has dynamic dims {named}; the compiler needs every dim fixed "
                                         "(export with --static)", g.file))
    return out


def opset_above(g, model, limit: int, severity: str, who: str) -> list[Finding]:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is not None and version > limit:
        return [Finding(severity, f"opset {version} is above {limit}, the newest {who} reads (export with --opset "
                                  f"{limit})", g.file)]
    return []


def dtypes(g, names: set[str], severity: str, why: str) -> list[Finding]:
    return [Finding(severity, f"{t.name} is {t.dtype}: {why}", g.file) for t in [*g.inputs, *g.outputs]
            if t.dtype in names]


def sample_feeds(g, vocab_size: int | None, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Inputs for one run of the graph (named dims at small sizes); None when a dim is not known."""
    from onnxport.spec import feeds

    sizes = {"batch_size": 1, "batch": 1, "sequence_length": 4, "past_sequence_length": 3,
             "total_sequence_length": 7}
    names = {d for t in g.inputs for d in t.dims if isinstance(d, str)}
    if "past_sequence_length" not in names:  # a graph without a cache input: all positions are new
        sizes["total_sequence_length"] = sizes["sequence_length"]
    elif "sequence_length" not in names:  # one new token per call (split block_cache graphs)
        sizes["total_sequence_length"] = sizes["past_sequence_length"] + 1
    for d in names - sizes.keys():
        sizes[d] = 4
    try:
        return feeds(g.inputs, sizes, seed, vocab_size or 2)
    except Exception:  # noqa: BLE001 - a graph whose inputs this generic feed cannot make
        return None
