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
    (`structure`: its graph_structure, not modified). ONNX Runtime runs the probe graph from
    memory, its external data read from `src`'s folder: nothing is written beside `src` (an
    input bundle stays as it was, read-only or not); graph optimizations are off, so the values
    are those of the graph as written."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(structure)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # errors only (an optional input's initializer is not one)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    for feeds in samples:
        yield dict(zip(names, sess.run(names, feeds)))
