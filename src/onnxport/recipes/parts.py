"""What a recipe hands the export driver for an encoder / codec / submodule: `ModulePart` (the
module, its inputs as `spec.TensorSpec` with named dynamic dims, the sizes to verify at, and
optionally its own reference outputs), `NamedInputs` (a module called with named tensors,
returning a flat tuple), the `--input NAME:DTYPE[DIMS]` parser and the dotted-path resolver.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from onnxport.errors import InputError
from onnxport.spec import TensorSpec  # noqa: F401 - recipes import it from here

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
_SPEC = re.compile(r"^(?P<name>[A-Za-z_][\w.]*):(?P<dtype>\w+)\[(?P<dims>[^\]]*)\](?:=(?P<lo>-?\d+)\.\.(?P<hi>-?\d+))?$")
_DIM = re.compile(r"^(?:(?P<num>\d+)|(?P<name>[A-Za-z_]\w*)(?:=(?P<size>\d+))?)$")
#: example size of a named dim when the spec gives none
DEFAULT_SIZE = 4
DEFAULT_BATCH = 2


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def fmt_sizes(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def torch_dtype(dtype: str) -> torch.dtype:
    return TORCH_DTYPES[dtype]


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
        if (dm["num"] and int(dm["num"]) < 1) or (dm["size"] and int(dm["size"]) < 1):
            raise InputError(f"--input {m['name']}: dim {d!r} is empty", "give every dim a size of 1 or more")
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
        if torch_dtype(s.dtype).is_floating_point:
            out.append(torch.randn(shape, generator=g).to(torch_dtype(s.dtype)))
        elif torch_dtype(s.dtype) == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        elif "mask" in s.name and (s.low, s.high) == (0, 2) and len(shape) >= 2:
            # a padding mask: all ones, later rows padded at the end (as a processor makes them)
            t = torch.ones(shape, dtype=torch_dtype(s.dtype))
            for row in range(1, shape[0]):
                t[row, shape[1] - shape[1] * row // (2 * shape[0]):] = 0
            out.append(t)
        else:
            out.append(torch.randint(s.low, s.high, shape, generator=g, dtype=torch_dtype(s.dtype)))
    return out


def example_sizes(specs: list[TensorSpec]) -> dict:
    sizes = {}
    for s in specs:
        sizes.update(dict(s.sizes))
        for d in s.dims:
            if isinstance(d, str) and d not in sizes:
                sizes[d] = DEFAULT_BATCH if "batch" in d else DEFAULT_SIZE
    return sizes




def module_part(model: torch.nn.Module, module_path: str, inputs: list[str], outputs: list[str] | None,
                method: str = "forward", verify_dims: list[str] | None = None) -> ModulePart:
    """The ModulePart for `onnxport export-module`: the submodule at `module_path`, inputs from
    `NAME:DTYPE[DIMS]` specs, verified at the example sizes and at a second set (`verify_dims`,
    default: each named dim grown). PyTorch's own failures on those inputs are one-line errors."""
    import inspect

    specs = [parse_input_spec(s) for s in inputs]
    if not specs:
        raise InputError("no --input given", "describe each forward input: --input NAME:DTYPE[DIMS]")
    target = resolve_module(model, module_path)
    if not callable(getattr(target, method, None)):
        raise InputError(f"{module_path or type(model).__name__} has no method {method!r}",
                         "pass --method with one of its methods, e.g. forward")
    params = inspect.signature(getattr(target, method)).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [s.name for s in specs if s.name not in params]
        if unknown:
            raise InputError(f"{module_path or 'the model'}.{method} has no argument {unknown[0]!r}",
                             f"its arguments: {', '.join(params)}")
    base = example_sizes(specs)
    sizes = [base, _second_sizes(base, verify_dims)]
    module = NamedInputs(target, [s.name for s in specs], method=method, keep=outputs or None).eval()
    try:
        with torch.no_grad():
            names = module.output_names(*random_inputs(specs, base))
    except Exception as e:  # noqa: BLE001 - the model's own error on these inputs
        raise InputError(f"PyTorch itself fails on the example inputs: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:240]}",
                         "check --input names, dtypes and sizes against the module's forward") from e
    if outputs:
        missing = [o for o in outputs if o not in names]
        if missing:
            raise InputError(f"--output {missing[0]!r} is not an output of {module_path}", f"its outputs: {', '.join(names)}")
    try:
        with torch.no_grad():
            module(*random_inputs(specs, sizes[1]))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"PyTorch fails when the named dims change to {sizes[1]}: {str(e).strip().splitlines()[0][:200]}",
                         "fix that dim to a number in --input, or give other sizes with --verify-dims") from e
    return ModulePart((module_path or "model").replace(".", "_"), module, specs, names, sizes, role="module")


def _second_sizes(base: dict, overrides: list[str] | None) -> dict:
    sizes = {k: (v + 1 if "batch" in k else 2 * v) for k, v in base.items()}
    for item in overrides or []:
        k, _, v = item.partition("=")
        if k not in base or not v.isdigit():
            raise InputError(f"--verify-dims {item!r}: expected NAME=SIZE with a dim named in --input",
                             f"named dims: {', '.join(base) or 'none'}")
        sizes[k] = int(v)
    return sizes
