"""Run a graph with some of its intermediate values exposed as outputs: the fp16 guard reads
every value's range, quantization reads each MatMul's input activations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def graph_structure(src: Path):
    """The graph at `src` as a ModelProto without external weight bytes, every node named
    (unnamed or duplicate names get `<op>_<index>`): the names passes and records use."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def run_exposing(src: Path, structure, names: list[str], samples: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    """{name: array} for each sample feed, `names` being values of the graph at `src`
    (`structure`: its graph_structure, not modified). ONNX Runtime runs a probe copy written
    beside `src`, so relative external-data locations resolve; graph optimizations are off,
    so the values are those of the graph as written."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(structure)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    probe = src.with_name(src.stem + ".probe.onnx")
    try:
        onnx.save(model, str(probe))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3  # errors only (an optional input's initializer is not one)
        sess = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
        for feeds in samples:
            yield dict(zip(names, sess.run(names, feeds)))
    finally:
        probe.unlink(missing_ok=True)
