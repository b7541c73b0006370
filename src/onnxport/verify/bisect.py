"""Where two runs of the same decoder part first part ways (`onnxport bisect`).

PyTorch against a bundle: every module's output is captured by a forward hook and compared with
the ONNX value that module produced, found through the node metadata torch.onnx's dynamo
exporter writes (`pkg.torch.onnx.name_scopes`: the module path of each node). Every ONNX value is
exposed on a scratch run (runtime/segments.run_feeds with `observe`: never in the bundle). The
modules are walked in the order their forward finished, so a wrong weight in one layer's
down_proj is found at that down_proj, before the layer, the model and the logits that it spoils.

Bundle against bundle (fp32 vs fp16, before vs after a rewrite, two exports): the values both
graphs name alike are compared in the first graph's node order; the first whose error jumps past
the tolerance names its node, op and module.

Errors are relative to the reference value's own scale (max|a - b| / max|b|), the tolerance per
dtype of the run under test (fp32 1e-3, fp16 3e-2, bf16 1e-1): the same scale-relative rule as
verification, made coarse enough that ordinary rounding never trips it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from onnxport.spec import ShapeCase, feeds

#: batch 1, a 5-token prompt continuing a 4-token cache the model wrote: every path of a decoder
#: layer (new tokens, the cache, the mask) without padding to mask out
CASE = ShapeCase(1, 5, 4)
TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}


def scope_of(node) -> str:
    """The module path a node came from inside the export wrapper, from the dynamo exporter's
    metadata (the last name scope is the aten op's own name, dropped); '' without metadata."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    try:
        path = ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        path = []
    return path[-2] if len(path) >= 2 else ""


def node_scopes(model) -> dict[str, tuple[str, str, str]]:
    """value name -> (module path inside the export wrapper, node name, op type) for every node
    output."""
    return {v: (scope_of(node), node.name, node.op_type) for node in model.graph.node for v in node.output if v}


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_boundaries(model, scopes: dict) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(outputs, inputs): module path -> the values it hands out (made inside the module or a
    submodule, read outside it or a graph output) and the values it reads from outside;
    `scopes` is node_scopes(model)."""
    graph_outputs = {o.name for o in model.graph.output}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        module = scopes[node.output[0]][0] if node.output and node.output[0] in scopes else ""
        for v in node.input:
            readers.setdefault(v, set()).add(module)
    outputs: dict[str, list[str]] = {}
    inputs: dict[str, list[str]] = {}
    for value, (module, _, _) in scopes.items():
        parts = module.split(".") if module else []
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if value in graph_outputs or any(not _inside(r, prefix) for r in readers.get(value, ())):
                outputs.setdefault(prefix, []).append(value)
    for value, mods in readers.items():
        made_in = scopes.get(value, ("",))[0]
        for module in mods:
            parts = module.split(".") if module else []
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if not _inside(made_in, prefix) and value not in inputs.get(prefix, []):
                    inputs.setdefault(prefix, []).append(value)
    return outputs, inputs


def _best(candidates: list[str], seen: dict, ref: np.ndarray) -> tuple[float, str] | None:
    best = None
    for v in candidates:
        a = seen.get(v)
        if a is None or a.size != ref.size or a.dtype.kind != "f":
            continue
        err = rel_error(a.reshape(ref.shape), ref)
        if best is None or err < best[0]:
            best = (err, v)
    return best


def checkpoint_path(scope: str) -> str:
    """A module path inside the export wrapper (FlatCacheDecoder.model) as the checkpoint names it."""
    return scope.removeprefix("model.") if scope.startswith("model.") else scope


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|, `b` the reference. Mask fills (the dtype's lowest value, -3.4e38 in
    fp32 and -65504 in fp16, or -inf) are the same thing in both and are left out; a value that is
    inf or nan in `a` where `b` is an ordinary number is an infinite error (an overflow)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    fill = (np.abs(b) >= 1e30) & ((np.abs(a) >= 6e4) | np.isinf(a)) & (np.sign(a) == np.sign(b))
    a, b = a[~fill], b[~fill]
    if not b.size:
        return 0.0
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _table(rows: list[dict], tolerance: float) -> dict:
    """The culprit: the first row whose output is off while what it read was not (a module fed
    a wrong value is that value's victim, not its cause)."""
    culprit = next((r for r in rows if r["error"] > tolerance and r.get("input_error", 0.0) <= tolerance), None)
    return {"tolerance": tolerance, "rows": rows, "culprit": culprit}


def bisect_pytorch(loaded, kv, manifest, folder: Path, dtype: str = "float32", seed: int = 0) -> dict:
    """Module by module, PyTorch's `loaded` model against the bundle's monolithic decoder graph."""
    import onnx
    import torch

    from onnxport.export.decoder import graph_wrapper, wrapper_args
    from onnxport.runtime.segments import run_feeds
    from onnxport.verify.decoder import model_made_past, with_io_dtypes

    graph = manifest.graph("decoder")
    if graph.chain or manifest.kv_cache.step_only:
        raise ValueError("bisect runs a monolithic graph that reads a whole prompt per call")
    path = Path(folder) / graph.file
    structure = onnx.load(str(path), load_external_data=False)
    scopes = node_scopes(structure)
    outputs, inputs = module_boundaries(structure, scopes)
    if not outputs:
        raise ValueError("the graph carries no module metadata (a TorchScript export or a rewritten graph); "
                         "bisect it against another bundle instead")
    g = with_io_dtypes(graph, path)
    wrapper = graph_wrapper(loaded.model, kv, graph, manifest.kv_cache.layout)
    x = feeds(g.inputs, CASE.sizes, seed, manifest.model.vocab_size)
    x.update(model_made_past(wrapper, g, CASE, seed, manifest.model.vocab_size))

    captured: list[tuple[str, np.ndarray]] = []  # (module, output) in the order forwards finish
    received: dict[str, np.ndarray] = {}  # module -> its first floating-point input

    def first_float(values):
        for t in values:
            t = t[0] if isinstance(t, (tuple, list)) and t else t
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.detach().float().numpy().copy()
        return None

    hooks = []
    for scope in outputs:
        try:
            module = wrapper.get_submodule(scope)
        except AttributeError:
            continue

        def pre(_m, args, kwargs, scope=scope):
            if scope not in received:
                t = first_float([*args, kwargs.get("hidden_states"), *kwargs.values()])
                if t is not None:
                    received[scope] = t

        def hook(_m, _inp, out, scope=scope):
            t = first_float([out])
            if t is not None and scope not in dict(captured):
                captured.append((scope, t))

        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(hook))
    try:
        t = {k: torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v) for k, v in x.items()}
        with torch.no_grad():
            wrapper(*wrapper_args(g.inputs, t))
    finally:
        for h in hooks:
            h.remove()
    wanted = {v for vs in [*outputs.values(), *inputs.values()] for v in vs} | set(x)
    seen: dict[str, np.ndarray] = dict(x)
    run_feeds(path, g.output_names, [x], observe=lambda n, a: seen.__setitem__(n, a) if n in wanted else None)
    tolerance = TOLERANCE.get(dtype, 1e-3)
    rows = []
    for scope, ref in captured:
        best = _best(outputs.get(scope, []), seen, ref)
        if best is None:
            continue
        _, node, op = scopes[best[1]]
        row = {"module": checkpoint_path(scope), "value": best[1], "node": node, "op": op,
               "shape": list(ref.shape), "error": best[0]}
        got_in = _best(inputs.get(scope, []), seen, received[scope]) if scope in received else None
        if got_in is not None:
            row["input_error"] = got_in[0]
        rows.append(row)
    record = _table(rows, tolerance)
    record.update(mode="pytorch", case=CASE.label, modules_compared=len(rows))
    return record


def bisect_bundles(first: Path, second: Path, seed: int = 0) -> dict:
    """Value by value, in the first graph's node order, two bundles of the same model."""
    import onnx

    from onnxport.bundle import read_manifest
    from onnxport.runtime.segments import run_feeds
    from onnxport.verify.decoder import with_io_dtypes

    runs = []
    for folder in (Path(first), Path(second)):
        m = read_manifest(folder)
        if m.is_split or m.kv_cache is None:
            raise ValueError(f"{folder} is not a monolithic decoder bundle")
        graph = m.graph("decoder")
        runs.append((m, folder / graph.file, with_io_dtypes(graph, folder / graph.file)))
    (m1, p1, g1), (m2, p2, g2) = runs
    base = feeds(g1.inputs, CASE.sizes, seed, m1.model.vocab_size)
    values = []
    for m, p, g in runs:
        dtypes = {t.name: np.dtype(t.dtype) for t in g.inputs}
        x = {k: v.astype(dtypes[k]) if k in dtypes else v for k, v in base.items()}
        seen: dict[str, np.ndarray] = {}
        run_feeds(p, g.output_names, [x], observe=lambda n, a, seen=seen: seen.__setitem__(n, a))
        values.append(seen)
    structure = onnx.load(str(p1), load_external_data=False)
    scopes = node_scopes(structure)
    dtype = (g2.precision or {}).get("compute") or m2.export.dtype or "float32"
    rows = []
    for node in structure.graph.node:
        for v in node.output:
            a, b = values[1].get(v), values[0].get(v)
            if a is None or b is None or a.shape != b.shape or b.dtype.kind != "f":
                continue
            rows.append({"value": v, "node": node.name, "op": node.op_type,
                         "module": checkpoint_path(scopes.get(v, ("",))[0]),
                         "shape": list(b.shape), "error": rel_error(a, b)})
    record = _table(rows, TOLERANCE.get(str(dtype), 1e-3))
    record.update(mode="bundles", case=CASE.label, values_compared=len(rows), against=str(second))
    return record


def bisect_bundle(bundle: str | Path, model_dir: str | Path | None = None, against: str | Path | None = None,
                  allow_pickle: bool = False) -> dict:
    """`onnxport bisect`: the bundle against its source checkpoint (or `model_dir`), or against
    another bundle of the same model."""
    from onnxport.bundle import read_manifest
    from onnxport.errors import InputError

    folder = Path(bundle)
    if against is not None:
        try:
            return bisect_bundles(Path(against), folder)
        except ValueError as e:
            raise InputError(str(e), "bisect compares monolithic decoder bundles") from None
    from onnxport.export.load import LoadedModel, load_model
    from onnxport.recipes import get_recipes
    from onnxport.recipes.base import DecoderLM
    from onnxport.verify.bundle import source_checkpoint

    manifest = read_manifest(folder)
    if manifest.kv_cache is None or manifest.is_split:
        raise InputError(f"{folder} is not a monolithic decoder bundle", "bisect a monolithic decoder export")
    ckpt = source_checkpoint(manifest, model_dir, allow_pickle)
    recipe = next((r for r in get_recipes(ckpt.model_type, None, ckpt.config).values() if isinstance(r, DecoderLM)),
                  None)
    if recipe is None:
        raise InputError(f"no decoder recipe for {ckpt.model_type}", "pass --model with the source checkpoint")
    loaded = LoadedModel(recipe, load_model(recipe, ckpt))
    try:
        return bisect_pytorch(loaded, recipe.kv_spec(loaded.model), manifest, folder,
                              dtype=manifest.export.dtype or "float32")
    except ValueError as e:
        raise InputError(str(e), "pass --against BUNDLE") from None


def describe_culprit(record: dict) -> str:
    """One line: where the first divergence is."""
    c = record["culprit"]
    if c is None:
        return f"none past {record['tolerance']:g} ({len(record['rows'])} compared)"
    where = f"module {c['module']}" if c.get("module") else "outside any module"
    inp = f", its input matched ({c['input_error']:.1e})" if "input_error" in c else ""
    return (f"{where}, node {c['node']} ({c['op']}): relative error {c['error']:.3g} "
            f"> {record['tolerance']:g}{inp}")
