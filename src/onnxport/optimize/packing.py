"""Pack linear layers that read the same activation into one MatMul (`matmul_packing`).

q/k/v projections and an MLP's gate/up read one hidden state each: at decode (one token) each
is a matrix-vector product whose cost is reading its weight plus a kernel launch. One MatMul
over the weights concatenated along N, then a Split, reads the same bytes in one kernel; it is
how onnxruntime-genai's builder writes qkv_proj and gate_up. The concatenated weight is built
lazily when the graph is saved, one group at a time.
"""

from __future__ import annotations

import numpy as np


def _const(value):
    return value is not None and value.is_initializer() and value.const_value is not None


def pack_matmuls(graph, min_group: int = 2) -> int:
    """Rewrite every group of >= `min_group` MatMuls with the same activation input and 2-D
    constant weights of one dtype and K. Returns the number of groups packed."""
    import onnx_ir as ir

    groups: dict[int, list] = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        if x is None or not _const(w) or w.shape is None or len(w.shape) != 2 or w.is_graph_output():
            continue
        if len(w.uses()) != 1:  # a weight read elsewhere too (tied) stays as it is
            continue
        groups.setdefault(id(x), []).append(node)
    packed = 0
    for nodes in groups.values():
        by_kind: dict[tuple, list] = {}
        for n in nodes:
            w = n.inputs[1]
            by_kind.setdefault((w.dtype, int(w.shape[0])), []).append(n)
        for (dtype, k), members in by_kind.items():
            if len(members) < min_group:
                continue
            x = members[0].inputs[0]
            widths = [int(m.inputs[1].shape[1]) for m in members]
            sources = [m.inputs[1].const_value for m in members]
            names = [m.inputs[1].name for m in members]
            name = "+".join(names) if len("+".join(names)) < 200 else f"{names[0]}+{len(names) - 1}_packed"

            def concat(sources=sources, name=name):
                parts = []
                for src in sources:
                    parts.append(np.array(src.numpy()))
                    if hasattr(src, "release"):  # close an external tensor's memory map
                        src.release()
                return ir.Tensor(np.concatenate(parts, axis=1), name=name)

            shape = ir.Shape([k, sum(widths)])
            weight = ir.Value(name=name, type=ir.TensorType(dtype), shape=shape)
            weight.const_value = ir.LazyTensor(concat, dtype=dtype, shape=shape, name=name)
            graph.register_initializer(weight)
            first = min(members, key=lambda m: list(graph).index(m))
            matmul = ir.node("MatMul", [x, weight], name=f"{first.name or 'matmul'}/packed")
            split = ir.node("Split", [matmul.outputs[0], ir.Value(name=f"{name}/split_sizes",
                                                                  const_value=ir.tensor(np.array(widths, np.int64)))],
                            attributes={"axis": -1}, num_outputs=len(members), name=f"{first.name or 'matmul'}/split")
            split_sizes = split.inputs[1]
            graph.register_initializer(split_sizes)
            matmul.outputs[0].dtype = dtype
            graph.insert_before(first, [matmul, split])
            for m, out in zip(members, split.outputs):
                out.dtype, out.shape = m.outputs[0].dtype, m.outputs[0].shape
                out.name = m.outputs[0].name + "/packed"
                m.outputs[0].replace_all_uses_with(out)
                if m.outputs[0].is_graph_output():
                    raise ValueError("a packed MatMul's output is a graph output")
            for m in members:
                w = m.inputs[1]
                graph.remove(m, safe=True)
                graph.initializers.pop(w.name, None)
            packed += 1
    return packed
