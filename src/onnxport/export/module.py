"""Export any torch module (an encoder, a codec, a submodule found by dotted path) as one graph.

A `ModulePart` says what to export: the module, its inputs (`TensorSpec`: name, dtype, dims where
a dim is a number or a name; named dims become dynamic), and the input sizes to verify at. The
driver (`export_part`) applies the rewrites, exports (dynamo first, TorchScript as fallback with
`exporter="auto"`), proves the rewrites kept the eager numerics, and checks ONNX Runtime against
the unpatched PyTorch module at every size.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from onnxport.errors import ExportError, InputError, VerificationError

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
_SPEC = re.compile(r"^(?P<name>[A-Za-z_][\w.]*):(?P<dtype>\w+)\[(?P<dims>[^\]]*)\](?:=(?P<lo>-?\d+)\.\.(?P<hi>-?\d+))?$")
_DIM = re.compile(r"^(?:(?P<num>\d+)|(?P<name>[A-Za-z_]\w*)(?:=(?P<size>\d+))?)$")
#: example size of a named dim when the spec gives none
DEFAULT_SIZE = 4
DEFAULT_BATCH = 2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple  # int (static) or str (dynamic, named)
    sizes: tuple = ()  # ((dim name, example size), ...)
    low: int = 0
    high: int = 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def io(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


def parse_input_spec(text: str) -> TensorSpec:
    """`NAME:DTYPE[DIMS]` with DIMS like `batch,3,height=224,width=224`; int inputs may add a
    value range `=LO..HI` (default 0..2, e.g. masks)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise InputError(
            f"malformed --input {text!r}",
            "write NAME:DTYPE[DIMS], e.g. pixel_values:float32[batch,3,224,224] or input_ids:int64[batch,seq=16]=0..1000",
        )
    dtype = m["dtype"]
    if dtype not in TORCH_DTYPES:
        raise InputError(f"--input {m['name']}: unknown dtype {dtype!r}", f"use one of: {', '.join(TORCH_DTYPES)}")
    dims, sizes = [], []
    for d in filter(None, (p.strip() for p in m["dims"].split(","))):
        dm = _DIM.match(d)
        if not dm:
            raise InputError(f"--input {m['name']}: malformed dim {d!r}", "a dim is a number, a name, or name=size")
        if dm["num"]:
            dims.append(int(dm["num"]))
        else:
            dims.append(dm["name"])
            if dm["size"]:
                sizes.append((dm["name"], int(dm["size"])))
    lo, hi = (int(m["lo"]), int(m["hi"])) if m["lo"] is not None else (0, 2)
    if hi <= lo:
        raise InputError(f"--input {m['name']}: empty value range {lo}..{hi}", "write =LO..HI with HI > LO")
    return TensorSpec(m["name"], dtype, tuple(dims), tuple(sizes), lo, hi)


def resolve_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted `path` ('' or '.' is the root); a wrong path names close ones."""
    if path in ("", "."):
        return root
    names = dict(root.named_modules())
    if path in names:
        return names[path]
    close = difflib.get_close_matches(path, [n for n in names if n], n=3, cutoff=0.5)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    children = [n for n, _ in (names[parent].named_children() if parent in names else root.named_children())]
    hint = f"did you mean {', '.join(close)}?" if close else f"children here: {', '.join(children[:12])}"
    raise InputError(f"module {path!r} not found in {type(root).__name__}", hint)


def flatten_outputs(out, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a module's output: ModelOutput/dict keys, tuple indices, nested."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    items = []
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        pairs = [(k, out[k]) for k in out.keys()]
    elif isinstance(out, (list, tuple)):
        pairs = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(out)]
    else:
        return []
    for k, v in pairs:
        if v is None:
            continue
        items.extend(flatten_outputs(v, f"{prefix}.{k}" if prefix else str(k)))
    return items


class NamedInputs(torch.nn.Module):
    """`forward(*tensors)` -> `target.<method>(**{name: tensor}, **fixed)` -> flat tuple of tensors."""

    def __init__(self, target: torch.nn.Module, names: list[str], fixed: dict | None = None,
                 method: str = "forward", keep: list[str] | None = None):
        super().__init__()
        self.target = target
        self.names = list(names)
        self.fixed = dict(fixed or {})
        self.method = method
        self.keep = keep

    def forward(self, *tensors):
        out = getattr(self.target, self.method)(**dict(zip(self.names, tensors)), **self.fixed)
        flat = flatten_outputs(out)
        if self.keep is not None:
            by = dict(flat)
            return tuple(by[k] for k in self.keep)
        return tuple(t for _, t in flat)

    def output_names(self, *tensors) -> list[str]:
        with torch.no_grad():
            out = getattr(self.target, self.method)(**dict(zip(self.names, tensors)), **self.fixed)
        names = [n for n, _ in flatten_outputs(out)]
        return self.keep if self.keep is not None else names


Case = Callable[[dict], "tuple[list[torch.Tensor], list[torch.Tensor] | None]"]


@dataclass
class ModulePart:
    """One graph to export. `make_case(sizes)` returns the graph inputs for those dim sizes and,
    optionally, the expected outputs computed another way (e.g. the original model on raw data,
    when the graph's inputs were preprocessed outside); otherwise the expected outputs are the
    unpatched module's."""

    name: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    output_names: list[str]
    sizes: list[dict]
    output_dims: dict[str, list] = field(default_factory=dict)
    make_case: Case | None = None
    preprocess: str | None = None
    #: extra manifest data (e.g. the constants a preprocessor needs)
    meta: dict = field(default_factory=dict)
    role: str = "encoder"

    def case(self, sizes: dict, seed: int = 0):
        if self.make_case is not None:
            return self.make_case(sizes)
        return random_inputs(self.inputs, sizes, seed), None


def random_inputs(specs: list[TensorSpec], sizes: dict, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        shape = [d if isinstance(d, int) else sizes[d] for d in s.dims]
        if s.torch_dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(s.torch_dtype))
        elif s.torch_dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        elif "mask" in s.name and (s.low, s.high) == (0, 2) and len(shape) >= 2:
            # a padding mask: all ones, later rows padded at the end (as a processor makes them)
            t = torch.ones(shape, dtype=s.torch_dtype)
            for row in range(1, shape[0]):
                t[row, shape[1] - shape[1] * row // (2 * shape[0]):] = 0
            out.append(t)
        else:
            out.append(torch.randint(s.low, s.high, shape, generator=g, dtype=s.torch_dtype))
    return out


def example_sizes(specs: list[TensorSpec]) -> dict:
    sizes = {}
    for s in specs:
        sizes.update(dict(s.sizes))
        for d in s.dims:
            if isinstance(d, str) and d not in sizes:
                sizes[d] = DEFAULT_BATCH if "batch" in d else DEFAULT_SIZE
    return sizes


def infer_output_dims(part: ModulePart) -> dict[str, list]:
    """Name the dims of each output: static when equal at every verification size; else the
    input dim with the same size at every size, or `<output>_dim<axis>`."""
    runs = []
    with torch.no_grad():
        for sizes in part.sizes[:2]:
            inputs, _ = part.case(sizes)
            runs.append((sizes, [t.shape for t in _as_tuple(part.module(*inputs))]))
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


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def export_part(part: ModulePart, folder: Path, exporters: list[str] | str, opset: int, atol: float, min_cosine: float,
                external_threshold: int = 1 << 30, skip_patches: tuple[str, ...] = ()) -> dict:
    """Export `part` to `folder/<name>.onnx`, check the rewrites and ORT at every size; return
    the manifest graph entry (with its verification record)."""
    from onnxport.export.graph import export_graph

    part.module.eval()
    out_dims = {n: part.output_dims[n] for n in part.output_names if n in part.output_dims}
    if len(out_dims) < len(part.output_names):
        out_dims = infer_output_dims(part)
    outputs = [{"name": n, "dtype": None, "dims": out_dims[n]} for n in part.output_names]
    inputs = [s.io() for s in part.inputs]
    # torch.export specializes a dim whose example size is 0 or 1: export at the size set whose
    # smallest named dim is largest.
    args, expected = part.case(max(part.sizes, key=_smallest_dim))
    if expected is None:
        with torch.no_grad():
            expected = _as_tuple(part.module(*args))
    for o, t in zip(outputs, expected):
        o["dtype"] = str(t.dtype).removeprefix("torch.")
    order = ["dynamo", "torchscript"] if exporters == "auto" else [exporters] if isinstance(exporters, str) else exporters
    out_file = folder / f"{part.name}.onnx"
    errors = []
    for exp in order:
        exp_opset = opset if exp == "dynamo" else min(opset, 20)
        try:
            used, applied = export_graph(part.module, tuple(args), inputs, outputs, out_file, exp, exp_opset,
                                         external_threshold, skip_patches=skip_patches)
            check_rewrites_eager(part, applied, exp, args, atol, skip_patches)
            record = verify_part(part, out_file, atol, min_cosine)
        except (ExportError, VerificationError) as e:
            errors.append((exp, e))
            log.info("%s: %s exporter failed: %s", part.name, exp, e.message)
            for f in (out_file, out_file.with_name(out_file.name + ".data")):
                f.unlink(missing_ok=True)
            continue
        if errors:
            log.warning("%s: %s exporter failed (%s); used %s", part.name, errors[0][0], errors[0][1].message[:160], exp)
        entry = {
            "role": part.role, "name": part.name, "file": out_file.name, "exporter": exp, "opset": exp_opset,
            "inputs": inputs, "outputs": outputs, "patches": applied, "preprocess": part.preprocess,
            "meta": part.meta, "verification": record,
            "external_data": [out_file.name + ".data"] if out_file.with_name(out_file.name + ".data").exists() else [],
        }
        if errors:
            entry["fallback_from"] = {errors[0][0]: errors[0][1].message[:300]}
        # Submodules legitimately leave weights unread (a pooling head the caller does not use);
        # list them so nothing is dropped silently.
        from onnxport.export.weights import unread_parameters

        unread = unread_parameters(part.module, used, out_file)
        entry["weights"] = {"in_graph": sum(1 for _ in part.module.parameters()) - len(unread), "not_read": unread}
        return entry
    exp, err = errors[-1]
    if len(errors) > 1:
        err.message = "; ".join(f"{e}: {x.message}" for e, x in errors)
    raise err


def check_rewrites_eager(part: ModulePart, applied: list[str], exporter: str, args, atol: float,
                         skip_patches: tuple[str, ...] = ()) -> None:
    """Proof 1 at export time: with the rewrites in place the module computes what it computed
    without them. A rewrite that changes numerics is named (each one is tried alone)."""
    from onnxport.patches import all_patches, apply_patches

    if not applied or part.make_case is not None:
        # parts with their own expected outputs are verified against the original model on
        # raw inputs, which is the stronger proof (their module may only run with the rewrites)
        return
    with torch.no_grad():
        ref = _as_tuple(part.module(*args))
        with apply_patches(part.module, exporter, skip_patches):
            got = _as_tuple(part.module(*args))
    bad = _first_mismatch(ref, got, atol)
    if bad is None:
        return
    culprits = []
    for name in applied:
        patch = all_patches()[name]()
        with torch.no_grad(), patch.patched(part.module):
            alone = _as_tuple(part.module(*args))
        if _first_mismatch(ref, alone, atol) is not None:
            culprits.append(name)
    raise VerificationError(
        f"rewrite {', '.join(culprits or applied)} changes {part.name}'s output {part.output_names[bad[0]]} "
        f"by {bad[1]:.3g} (> atol {atol}) in PyTorch itself",
        "report it; export without it with --no-rewrite NAME to see the exporter's own error",
    )


def _first_mismatch(ref, got, atol):
    for k, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            return k, float("inf")
        d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        if not d <= atol:
            return k, d
    return None


def verify_part(part: ModulePart, onnx_file: Path, atol: float, min_cosine: float) -> dict:
    """ONNX Runtime vs the unpatched PyTorch module (or the part's own expected outputs) at every
    size in `part.sizes`; raises VerificationError naming the output and the sizes."""
    import numpy as np

    from onnxport.runtime.session import make_session
    from onnxport.verify.compare import compare

    try:
        sess = make_session(onnx_file)
    except Exception as e:  # noqa: BLE001 - ORT rejects invalid graphs with several types
        raise VerificationError(f"ONNX Runtime cannot load {onnx_file.name}: {str(e).splitlines()[0][:300]}",
                                "the exporter produced an invalid graph; try --exporter torchscript") from e
    names = [i.name for i in sess.get_inputs()]
    rows = []
    for sizes in part.sizes:
        inputs, expected = part.case(sizes)
        if expected is None:
            with torch.no_grad():
                expected = list(_as_tuple(part.module(*inputs)))
        feeds = {s.name: t.numpy() for s, t in zip(part.inputs, inputs) if s.name in names}
        try:
            got = sess.run(part.output_names, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime's Fail/InvalidArgument
            raise VerificationError(f"{part.name}: ONNX Runtime failed at {_fmt(sizes)}: {str(e).splitlines()[0][-300:]}",
                                    "a dim was fixed during export; name it in the input spec, or try --exporter torchscript") from e
        for name, a, e in zip(part.output_names, got, expected):
            e = e.detach().float().numpy() if e.is_floating_point() else e.numpy()
            r = compare(np.asarray(a, dtype=e.dtype), e, atol, min_cosine)
            rows.append({"sizes": dict(sizes), "output": name, **r})
            if not r["ok"]:
                what = r.get("error") or f"max|diff| {r['max_abs_diff']:.3g} (atol {atol}), cosine {r['cosine']:.6f}"
                raise VerificationError(f"{part.name}: {name} at {_fmt(sizes)}: {what}",
                                        "ONNX Runtime disagrees with PyTorch; run with --debug, or try --exporter torchscript")
    return {"ok": True, "atol": atol, "min_cosine": min_cosine, "results": rows}


def _smallest_dim(sizes: dict) -> int:
    return min((v for v in sizes.values() if isinstance(v, int)), default=2)


def _fmt(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())
