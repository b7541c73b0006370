"""A CPU twin of a bf16-compute graph, so ONNX Runtime's CPU kernels can check it."""

from __future__ import annotations

from pathlib import Path


def emulate_bf16(src: Path, dst: Path) -> None:
    """A twin of the bf16-compute graph at `src` that ONNX Runtime's CPU kernels run (they have
    no bf16 arithmetic): every node reading or writing bf16 computes in fp32 between a Cast of
    its bf16 inputs up and a Cast of its outputs down to bf16. Values are rounded to bf16 where
    the real graph stores them, which is what a bf16 GPU / TensorRT kernel does (fp32
    accumulation, bf16 results). Saved beside `src` so its external data resolves."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    b16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    try:  # value types: a Shape of a bf16 tensor is int64, an Equal bool, ...
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; the fallback below types the rest
        inferred = model
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*g.input, *g.output, *inferred.graph.value_info] if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = a.t.data_type
        elif node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    # values inference could not type (after contrib ops): a float op's outputs take its
    # first float input's type
    floats = (b16, f32, onnx.TensorProto.FLOAT16)
    for node in g.node:
        if node.op_type in ("Cast", "Constant"):
            continue
        known = [types[i] for i in node.input if types.get(i) in floats]
        for o in node.output:
            if o and o not in types and known:
                types[o] = known[0]
    nodes = []
    for i, node in enumerate(g.node):
        if node.op_type in ("Cast", "Constant") or not any(types.get(n) == b16 for n in [*node.input, *node.output]):
            nodes.append(node)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(node.input):
            if name and types.get(name) == b16:
                up = f"{name}__emu_f32_{i}_{k}"
                nodes.append(helper.make_node("Cast", [name], [up], to=f32, name=f"emu_up_{i}_{k}"))
                new.input[k] = up
        downs = []
        for k, name in enumerate(node.output):
            if name and types.get(name) == b16:
                wide = f"{name}__emu_wide"
                new.output[k] = wide
                downs.append(helper.make_node("Cast", [wide], [name], to=b16, name=f"emu_down_{i}_{k}"))
        nodes.append(new)
        nodes += downs
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.save(model, str(dst))
