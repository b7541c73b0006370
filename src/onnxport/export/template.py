"""Traced templates kept across exports: a stamped decoder's short trace, reused when the same
architecture is exported again.

A stamped decoder (export/stamp.py) is traced with two layers whose weights are unbound while
torch.onnx's optimizer runs (export/stream.py `Binder`): the optimized graph reads every
weight by name and holds no weight data. It is a function of the code and of the module's
structure, not of the weights. So it is saved here, without weights, under a key that covers
everything the trace reads, and the next export with the same key loads it instead of tracing
(qwen2-0.5B: ~5 s of torch.export, run_decompositions and translation); the weights are then
bound, the graph stamped, saved and verified exactly as after a trace.

The key (sha256) covers:
- the versions of Python, torch, transformers, onnxscript, onnx-ir and onnx, and the content
  of onnxport's own source files and of the source file of every module class in the traced
  module, and the names, sizes and times of transformers' other source files (remote code, or
  a source install of transformers whose code changed under one version, changes the key);
- the traced module tree: each submodule's type and plain attributes, the wrapper's own
  settings, every parameter's name, shape and dtype, every buffer's name, shape, dtype and
  values (a buffer may be folded into the graph), and the model's config (with the 2-layer
  truncation applied, so models differing only in depth share a template);
- the example inputs' shapes and dtypes, the graph's input and output names and dynamic dims,
  the opset, the custom translations, the rewrites applied, and how weights are bound.

A template is only a faster trace: an entry that cannot be read (or whose file does not hash
to what its record says) is dropped and the module traced; a full or read-only cache folder
costs the save only. The stamped graph is verified against PyTorch as after a trace.

The folder: $ONNXPORT_TEMPLATES, else $ONNXPORT_CACHE/templates, else
~/.cache/onnxport/templates; ONNXPORT_TEMPLATES=off (or `--no-template-cache`,
ExportConfig(template_cache=False)) disables it. At most MAX_ENTRIES are kept (oldest used
removed first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "ONNXPORT_TEMPLATES"
OFF = ("0", "off", "false", "no", "none")
#: bump when what an entry holds changes
FORMAT = 1
MAX_ENTRIES = 64
#: a template holding more (large non-weight constants) is not kept
MAX_BYTES = 64 << 20
#: the location the weights' placeholders name in a saved template (never read)
UNBOUND = "__onnxport_unbound__"
PACKAGES = ("torch", "transformers", "onnxscript", "onnx-ir", "onnx")

#: attributes that name the folder a model was read from (not part of its architecture)
PATH_ATTRS = frozenset({"name_or_path", "_name_or_path"})

_SOURCE_DIGESTS: dict[str, str] = {}


def cache_folder() -> Path | None:
    """Where templates are kept: $ONNXPORT_TEMPLATES (None when it says off), else the
    `templates` folder of onnxport's cache ($ONNXPORT_CACHE, else ~/.cache/onnxport, as the
    Triton environment's)."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("ONNXPORT_CACHE") or Path.home() / ".cache" / "onnxport").expanduser() / "templates"


def _file_digest(path: str) -> str:
    from onnxport.bundle.seal import sha256

    try:
        return sha256(Path(path))  # kept per (inode, size, mtime) for the process
    except OSError:
        return "unreadable"


def _package_digest() -> str:
    """sha256 over onnxport's own source files (names and contents)."""
    root = Path(__file__).resolve().parents[1]
    if str(root) not in _SOURCE_DIGESTS:
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(_file_digest(str(f)).encode())
        _SOURCE_DIGESTS[str(root)] = h.hexdigest()
    return _SOURCE_DIGESTS[str(root)]


def _transformers_files() -> str:
    """sha256 over the name, size and mtime of transformers' source files outside `models/`
    (the modeling files of the traced classes are hashed by content): a source install of
    transformers changes its code without changing its version."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.origin:
        return "none"
    root = os.path.dirname(spec.origin)
    if root not in _SOURCE_DIGESTS:
        h = hashlib.sha256()
        for folder, dirs, files in os.walk(root):
            if folder == root:
                dirs[:] = [d for d in dirs if d != "models"]
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    st = os.stat(path)
                    h.update(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns};".encode())
        _SOURCE_DIGESTS[root] = h.hexdigest()
    return _SOURCE_DIGESTS[root]


def _describe(v, depth: int = 0):
    """A JSON-able description of an attribute: tensors by digest, containers by content."""
    import dataclasses
    import re
    import types

    import torch

    if isinstance(v, types.ModuleType):
        return ["module", v.__name__]
    if callable(v) and not isinstance(v, torch.nn.Module):  # its code: the sources above
        return ["callable", getattr(v, "__module__", None), getattr(v, "__qualname__", type(v).__qualname__)]
    if isinstance(v, torch.Tensor):
        return ["tensor", str(v.dtype), list(v.shape), _tensor_digest(v)]
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    if depth > 4:
        return type(v).__qualname__
    if isinstance(v, (list, tuple)):
        return [_describe(x, depth + 1) for x in v]
    if isinstance(v, (set, frozenset)):  # in an order that does not depend on PYTHONHASHSEED
        return sorted((_describe(x, depth + 1) for x in v), key=repr)
    if isinstance(v, dict):
        return sorted(([repr(k), _describe(x, depth + 1)] for k, x in v.items()), key=repr)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return [type(v).__qualname__, {f.name: _describe(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v)}]
    if hasattr(v, "__dict__"):
        return [type(v).__qualname__, {k: _describe(x, depth + 1) for k, x in vars(v).items() if not k.startswith("_")}]
    return re.sub(r" at 0x[0-9a-f]+", "", repr(v))


def _versions() -> dict:
    from onnxport.bundle.assemble import versions

    return {"python": list(sys.version_info[:3]), **versions(PACKAGES)}


def _tensor_digest(t) -> str:
    import torch

    if t.device.type == "meta":
        return "meta"
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def _configs(module) -> list[str]:
    """Every distinct transformers config the module tree holds, as JSON (with the attention
    implementation, which the JSON leaves out)."""
    seen, out = set(), []
    for m in module.modules():
        config = getattr(m, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "to_json_string"):
            continue
        seen.add(id(config))
        out.append(json.dumps(_without_paths(config.to_dict()), sort_keys=True, default=_json_default))
        out.append(repr(getattr(config, "_attn_implementation", None)))
    return out


def _json_default(v):
    """What JSON cannot hold: sets sorted (their order changes with PYTHONHASHSEED), the rest
    by repr without addresses."""
    import re

    if isinstance(v, (set, frozenset)):
        return sorted(v, key=repr)
    return re.sub(r" at 0x[0-9a-f]+", "", repr(v))


def _without_paths(d):
    """A config dict without the folder it was read from (`_name_or_path`): the same
    architecture in another folder is the same trace."""
    if isinstance(d, dict):
        return {k: _without_paths(v) for k, v in d.items() if k not in PATH_ATTRS}
    if isinstance(d, list):
        return [_without_paths(v) for v in d]
    return d


def _module_tree(module) -> dict:
    from onnxport.export.stamp import _signature

    sources = sorted({_file_digest(sys.modules[type(m).__module__].__file__)
                      for m in module.modules()
                      if getattr(sys.modules.get(type(m).__module__), "__file__", None)})
    buffers = [(n, _tensor_digest(b)) for n, b in module.named_buffers()]
    # the wrapper's own settings (cache entries, layout, rotary tables of the GQA graph)
    attrs = {k: _describe(v) for k, v in vars(module).items() if not k.startswith("_") and k not in PATH_ATTRS}
    return {"signature": repr(_signature(module, skip=PATH_ATTRS)), "buffers": buffers, "sources": sources,
            "transformers": _transformers_files(), "configs": _configs(module), "attrs": attrs}


def _arg_shapes(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.append(_arg_shapes(a))
        elif hasattr(a, "shape"):
            out.append([str(a.dtype), list(a.shape)])
        else:
            out.append(repr(a))
    return out


class TemplateCache:
    """One export's lookup: `key(...)` for the trace about to run, then `load(bind)` (the
    template's (used parameters, onnx-ir model) or None) or, after a trace, `store(...)`.
    `outcome` says which happened, for the manifest."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.digest: str | None = None
        self.outcome: str | None = None
        #: why a kept entry was not used (it was then traced and kept again)
        self.dropped: str | None = None

    def key(self, module, args, inputs, output_names, opset: int, prefix: str, translations, applied,
            bind) -> str | None:
        """The key of this trace (None, and `outcome` says why, when one cannot be made)."""
        try:
            parts = {
                "format": FORMAT,
                "versions": _versions(),
                "onnxport": _package_digest(),
                "module": _module_tree(module),
                "args": _arg_shapes(args),
                "inputs": [(i.name, list(i.dims), str(i.dtype)) for i in inputs],
                "outputs": list(output_names),
                "opset": opset,
                "prefix": prefix,
                "translations": sorted(repr(k) for k in (translations or {})),
                "applied": list(applied),
                "bind": [type(bind.weights).__name__, bind.unbound_buffers],
            }
            blob = json.dumps(parts, sort_keys=True, default=_json_default)
        except Exception as e:  # a config or buffer this cannot describe: trace as always
            self.outcome = f"traced (no key: {type(e).__name__}: {e})"[:200]
            return None
        self.digest = hashlib.sha256(blob.encode()).hexdigest()
        return self.digest

    def _paths(self) -> tuple[Path, Path]:
        return self.folder / f"{self.digest}.onnx", self.folder / f"{self.digest}.json"

    def load(self, bind):
        """(parameters read, onnx-ir model with its weights bound) from the entry for `digest`,
        or None (traced then)."""
        import onnx
        import onnx_ir as ir

        if self.digest is None:
            return None
        graph_file, record_file = self._paths()
        if not record_file.is_file():
            self.outcome = "traced"
            return None
        try:
            record = json.loads(record_file.read_text())
            blob = graph_file.read_bytes()
            if record.get("format") != FORMAT or record.get("sha256") != hashlib.sha256(blob).hexdigest():
                raise ValueError("the graph file does not match its record")
            model = ir.serde.deserialize_model(onnx.load_from_string(blob))
            shapes = {name: tuple(shape) for name, shape in record["unbound"].items()}
            for name in shapes:
                model.graph.initializers[name].const_value = None
            used = set(record["used"])
        except Exception as e:
            log.info("template %s unreadable (%s): tracing", self.digest[:12], e)
            self.dropped = f"the kept one was unreadable: {type(e).__name__}"
            self.outcome = f"traced ({self.dropped})"
            for f in (graph_file, record_file):
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
            return None
        # the weights are bound as after a trace (a checkpoint problem fails here as it would there)
        bind.shapes.update(shapes)
        bind.after_optimize(model)
        with contextlib.suppress(OSError):  # the time orders entries for pruning; a read-only cache still reads
            os.utime(record_file)
        self.outcome = "reused"
        log.info("reused the traced template %s", self.digest[:12])
        return used, model

    def store(self, model, used: set[str], shapes: dict) -> None:
        """Keep `model` (optimized, its weights unbound: `shapes` names them) under `digest`."""
        if self.digest is None:
            return
        try:
            self._store(model, used, shapes)
        except Exception as e:  # keeping it only saves the next export time
            log.info("template not kept (%s)", e)
            self.outcome = f"traced (not kept: {type(e).__name__}: {e})"[:200]

    def _store(self, model, used: set[str], shapes: dict) -> None:
        import onnx_ir as ir

        unbound = {name: list(shapes[name]) for name, v in model.graph.initializers.items()
                   if v.const_value is None and name in shapes}
        try:
            for name in unbound:
                v = model.graph.initializers[name]
                v.const_value = ir.ExternalTensor(UNBOUND, 0, 0, v.dtype, shape=ir.Shape(unbound[name]), name=name)
            proto = ir.serde.serialize_model(model)
        finally:
            for name in unbound:
                model.graph.initializers[name].const_value = None
        blob = proto.SerializeToString()
        if len(blob) > MAX_BYTES:
            self.outcome = f"traced (not kept: {len(blob) >> 20} MiB of constants)"
            return
        record = {"format": FORMAT, "sha256": hashlib.sha256(blob).hexdigest(), "used": sorted(used),
                  "unbound": unbound}
        graph_file, record_file = self._paths()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path, data in ((graph_file, blob), (record_file, json.dumps(record).encode())):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            self._prune()
        except OSError as e:  # a full or read-only cache folder costs the next export its trace only
            log.info("template not kept (%s)", e)
            self.outcome = f"traced (not kept: {e.strerror or e})"
            return
        self.outcome = f"traced and kept ({self.dropped})" if self.dropped else "traced and kept"

    def _prune(self) -> None:
        """Drop the least recently used entries past MAX_ENTRIES (another process may be
        pruning too: a file already gone is skipped)."""
        dated = []
        for record in self.folder.glob("*.json"):
            with contextlib.suppress(OSError):
                dated.append((record.stat().st_mtime, record))
        dated.sort()
        for _, old in dated[:max(0, len(dated) - MAX_ENTRIES)]:
            for f in (old, old.with_suffix(".onnx")):
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
