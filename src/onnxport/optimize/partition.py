"""Cut a graph into consecutive graphs under a weight budget (`--max-graph-size` for encoder
and module graphs: a vision tower too large for one file or one device's memory).

The cut is runtime/segments.py's `plan_segments` (node order is topological, so consecutive
node ranges read only graph inputs and earlier parts' values); each part becomes a file
`<stem>.part<k>.onnx` with its own `<file>.data`, its inputs and outputs named by the values that
cross the cut. The runtime runs the parts one after another (EncoderRunner), and the chain is
verified against PyTorch end to end; the parts compute exactly the whole graph's nodes.
"""

from __future__ import annotations

from pathlib import Path


def cut_graph(src: Path, budget: int) -> list[dict]:
    """Replace the graph at `src` (and its `<file>.data`) by cut graphs of at most `budget`
    weight bytes each; returns the chain [{"file", "inputs", "outputs"}] (one entry: not cut)."""
    import onnx
    from onnx import external_data_helper

    from onnxport.runtime.segments import plan_segments

    structure = onnx.load(str(src), load_external_data=False)
    g = structure.graph
    outputs = [o.name for o in g.output]
    segments = plan_segments(structure, budget, outputs)
    if len(segments) < 2:
        return [{"file": src.name, "inputs": [i.name for i in g.input], "outputs": outputs}]
    try:
        inferred = onnx.shape_inference.infer_shapes(structure, strict_mode=False)
    except Exception:  # noqa: BLE001 - types are best effort; untyped values stay float
        inferred = structure
    infos = {v.name: v for v in [*inferred.graph.value_info, *g.input, *g.output]}
    chain, written = [], []
    for k, seg in enumerate(segments):
        nodes = g.node[seg.start:seg.stop]
        read = {n for node in nodes for n in node.input}
        part = onnx.GraphProto(name=f"{g.name}_part{k}")
        part.node.extend(nodes)
        for t in g.initializer:
            if t.name in read:
                c = onnx.TensorProto()
                c.CopyFrom(t)
                if c.external_data:  # read its bytes now: the part gets its own data file
                    external_data_helper.load_external_data_for_tensor(c, str(src.parent))
                    c.data_location = onnx.TensorProto.DEFAULT
                    del c.external_data[:]
                part.initializer.append(c)
        for names, target in ((seg.inputs, part.input), (seg.outputs, part.output)):
            for n in names:
                info = infos.get(n)
                if info is None:
                    info = onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                target.append(info)
        model = onnx.helper.make_model(part, opset_imports=structure.opset_import, ir_version=structure.ir_version)
        model.functions.extend(structure.functions)
        name = f"{src.stem}.part{k}.onnx"
        onnx.save(model, str(src.parent / name), save_as_external_data=True, location=name + ".data",
                  size_threshold=1024, all_tensors_to_one_file=True)
        written.append(name)
        chain.append({"file": name, "inputs": list(seg.inputs), "outputs": list(seg.outputs)})
        del model, part
    for f in (src, src.with_name(src.name + ".data")):
        f.unlink(missing_ok=True)
    return chain
