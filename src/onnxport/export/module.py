"""Export any torch module (an encoder, a codec, a submodule found by dotted path) as one graph.

A `ModulePart` (onnxport.recipes.parts) says what to export. The driver (`export_part`) applies
the rewrites and exports (dynamo first, TorchScript as fallback with `exporter="auto"`); the
caller's `check` (verify/) proves each candidate graph before it is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from onnxport.bundle import Graph
from onnxport.errors import ExportError, VerificationError
from onnxport.recipes.parts import ModulePart, as_tuple
from onnxport.spec import TensorSpec

log = logging.getLogger(__name__)

Check = Callable[..., dict]


def infer_output_dims(part: ModulePart) -> dict[str, list]:
    """Name the dims of each output: static when equal at every verification size; else the
    input dim with the same size at every size, or `<output>_dim<axis>`."""
    runs = []
    with torch.no_grad():
        for sizes in part.sizes[:2]:
            inputs, _ = part.case(sizes)
            runs.append((sizes, [t.shape for t in as_tuple(part.module(*inputs))]))
    dims = {}
    for k, name in enumerate(part.output_names):
        if name in part.output_dims:
            dims[name] = part.output_dims[name]
            continue
        shapes = [r[1][k] for r in runs]
        out = []
        for ax, n in enumerate(shapes[0]):
            if all(s[ax] == n for s in shapes) and len(runs) > 1:
                out.append(int(n))
                continue
            out.append(_relate(runs, shapes, ax) or f"{name}_dim{ax}")
        dims[name] = out
    return dims


def _relate(runs, shapes, ax) -> str | None:
    """A name for output axis `ax` from the input dims: equal (`num_patches`), an integer
    fraction (`num_patches_div4`) or multiple (`num_codes_x320`) at every verified size."""
    named = [d for d, v in runs[0][0].items() if isinstance(v, int)]
    pairs = [(r[0], s[ax]) for r, s in zip(runs, shapes)]
    for d in named:
        if all(sz.get(d) == n for sz, n in pairs):
            return d
    for d in named:
        vals = [(sz.get(d), n) for sz, n in pairs]
        if any(v is None or n == 0 or v == 0 for v, n in vals) or len({v for v, _ in vals}) < 2:
            continue
        if all(v % n == 0 for v, n in vals) and len({v // n for v, n in vals}) == 1:
            return f"{d}_div{vals[0][0] // vals[0][1]}"
        if all(n % v == 0 for v, n in vals) and len({n // v for v, n in vals}) == 1:
            return f"{d}_x{vals[0][1] // vals[0][0]}"
    return None


def export_part(part: ModulePart, folder: Path, exporters: list[str] | str, opset: int, check: Check | None = None,
                external_threshold: int = 1 << 30, skip_patches: tuple[str, ...] = (), part_name: str | None = None
                ) -> Graph:
    """Export `part` to `folder/<name>.onnx`; return the manifest graph entry (`part_name`: the
    checkpoint part it belongs to, e.g. vision).

    `check(part, onnx_file, applied_rewrites, exporter, example_args)` proves the graph (see
    `onnxport.verify.module.part_check`) and returns its verification record; a VerificationError
    from it makes the next exporter of `exporters` try (a dynamo graph ORT cannot load, say)."""
    from onnxport.export.graph import export_graph

    part.module.eval()
    out_dims = {n: part.output_dims[n] for n in part.output_names if n in part.output_dims}
    if len(out_dims) < len(part.output_names):
        out_dims = infer_output_dims(part)
    inputs = list(part.inputs)
    # torch.export specializes a dim whose example size is 0 or 1: export at the size set whose
    # smallest named dim is largest.
    args, expected = part.case(max(part.sizes, key=_smallest_dim))
    if expected is None:
        with torch.no_grad():
            expected = as_tuple(part.module(*args))
    outputs = [TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(out_dims[n]))
               for n, t in zip(part.output_names, expected)]
    order = ["dynamo", "torchscript"] if exporters == "auto" else [exporters] if isinstance(exporters, str) else exporters
    out_file = folder / f"{part.name}.onnx"
    errors = []
    for exp in order:
        exp_opset = opset if exp == "dynamo" else min(opset, 20)
        try:
            used, applied = export_graph(part.module, tuple(args), inputs, outputs, out_file, exp, exp_opset,
                                         external_threshold, skip_patches=skip_patches)
            record = check(part, out_file, applied, exp, tuple(args)) if check else None
        except (ExportError, VerificationError) as e:
            errors.append((exp, e))
            log.info("%s: %s exporter failed: %s", part.name, exp, e.message)
            for f in (out_file, out_file.with_name(out_file.name + ".data")):
                f.unlink(missing_ok=True)
            continue
        if errors:
            log.warning("%s: %s exporter failed (%s); used %s", part.name, errors[0][0], errors[0][1].message[:160], exp)
        data = out_file.with_name(out_file.name + ".data")
        entry = Graph(part.role, out_file.name, inputs, outputs, part=part_name or part.name, name=part.name, exporter=exp,
                      opset=exp_opset, patches=applied, preprocess=part.preprocess, meta=part.meta,
                      external_data=[data.name] if data.exists() else [], verification=record)
        if errors:
            entry.fallback_from = {errors[0][0]: errors[0][1].message[:300]}
        # Submodules legitimately leave weights unread (a pooling head the caller does not use);
        # list them so nothing is dropped silently.
        from onnxport.export.weights import unread_parameters

        unread = unread_parameters(part.module, used, out_file)
        entry.weights = {"in_graph": sum(1 for _ in part.module.parameters()) - len(unread), "not_read": unread}
        return entry
    exp, err = errors[-1]
    if len(errors) > 1:
        err.message = "; ".join(f"{e}: {x.message}" for e, x in errors)
    raise err


def _smallest_dim(sizes: dict) -> int:
    return min((v for v in sizes.values() if isinstance(v, int)), default=2)
