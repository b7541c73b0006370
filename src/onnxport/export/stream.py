"""Bounded-memory export (`--low-memory`): trace a model whose parameters live on the meta
device (no weight memory; buffers such as rotary tables are computed on the CPU as usual),
then bind every graph initializer to its checkpoint tensor lazily: each is read from its
safetensors file by offset when onnx-ir writes it to the external data file, cast to the
graph's dtype, and dropped before the next is read. Peak memory is the traced graph plus the largest single tensor, not
the model.

Every initializer is bound by name and checked by shape; a tied weight reads its owner's
tensor; a name that is neither a checkpoint tensor nor a buffer fails the export (nothing is
made up).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from onnxport.errors import CheckpointError, ExportError

log = logging.getLogger(__name__)

HINT = "export without --low-memory (the model is then loaded whole)"


@contextlib.contextmanager
def params_on_meta():
    """Modules built inside get their parameters on the meta device; buffers stay real (the
    approach of accelerate's init_empty_weights(include_buffers=False))."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton_model(recipe, ckpt, dtype: torch.dtype):
    """(model on the meta device, {buffer name: CPU tensor}) for `recipe` from the checkpoint's
    config; checkpoint names and shapes must match the model's own (no load-time renames)."""
    import transformers

    from onnxport.hf.compat import dtype_kwarg
    from onnxport.recipes.base import _has_experts

    config = transformers.AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)
    cls = recipe.model_cls()
    kwargs = {"attn_implementation": recipe.attn_implementation, **dtype_kwarg(dtype)}
    if _has_experts(ckpt.config):
        kwargs["experts_implementation"] = "batched_mm"
    with params_on_meta():
        try:
            model = cls.from_config(config, **kwargs)
        except (TypeError, ValueError):
            kwargs.pop("experts_implementation", None)
            model = cls.from_config(config, **kwargs)
    model.eval()
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to("meta")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(n for n in ckpt.tensors if n not in params and n not in buffers)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} checkpoint tensor(s) have no parameter of that name in {cls.__name__}: "
            f"{', '.join(unknown[:4])}", f"the checkpoint uses names transformers renames on load; {HINT}")
    model._onnxport_unused_checkpoint_keys = []
    return model, buffers


class CheckpointWeights:
    """Graph initializer name -> a lazy tensor read from the checkpoint when written."""

    def __init__(self, ckpt, model, buffers: dict, dtype: torch.dtype):
        self.ckpt, self.buffers, self.dtype = ckpt, buffers, dtype
        self.params = dict(model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}
        #: tied parameters read their first name's (the stored) tensor
        self.owner = {}
        for name, p in self.params.items():
            first.setdefault(id(p), name)
            self.owner[name] = first[id(p)]

    def source(self, name: str) -> str | None:
        """The checkpoint tensor a parameter reads (tied names resolve to a stored one)."""
        if name in self.ckpt.tensors:
            return name
        owner = self.owner.get(name)
        if owner in self.ckpt.tensors:
            return owner
        tied = [n for n, o in self.owner.items() if o == owner and n in self.ckpt.tensors]
        return tied[0] if tied else None

    def lazy(self, name: str, shape: tuple):
        import onnx_ir as ir

        if name in self.buffers and name not in self.ckpt.tensors:  # a saved buffer comes from the file
            return ir.Tensor(self.buffers[name].numpy(), name=name)
        src = self.source(name)
        if src is None:
            raise CheckpointError(f"weight {name!r} is not in the checkpoint",
                                  "onnxport never exports random weights; use the complete checkpoint")
        info = self.ckpt.tensors[src]
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"weight {src!r} has shape {list(info.shape)} in {info.file}, the graph needs "
                                  f"{list(shape)}", "config.json does not belong to these weights")
        path = self.ckpt.path / info.file
        # only floating tensors take the graph's dtype (an int buffer stays int)
        dtype = self.dtype if getattr(torch, info.dtype).is_floating_point else getattr(torch, info.dtype)
        return reader_tensor(CheckpointTensorReader(path, info, src, dtype), name)


class ModuleWeights(CheckpointWeights):
    """`CheckpointWeights` for a model in memory: an initializer is bound to the module's own
    parameter (written from it when the graph is saved, transposed there when the graph reads
    it transposed). Stamped decoder exports (export/stamp.py) bind an in-memory model's weights
    by name this way, as `--low-memory` binds a checkpoint's."""

    def __init__(self, model):
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.owner = {n: n for n in self.params}

    def source(self, name: str) -> str | None:
        return name if name in self.params else None

    def lazy(self, name: str, shape: tuple):
        import onnx_ir as ir

        if name not in self.params:
            if name in self.buffers:
                return ir.Tensor(self.buffers[name].numpy(), name=name)
            raise CheckpointError(f"weight {name!r} is not a parameter of the model", "report this onnxport bug")
        p = self.params[name]
        if tuple(p.shape) != tuple(shape):
            raise ExportError(f"weight {name!r} has shape {list(p.shape)}, the graph needs {list(shape)}")
        return reader_tensor(ModuleTensorReader(p, name), name)


class ModuleTensorReader:
    """A module's parameter behind `CheckpointTensorReader`'s interface (shape, dtype, perm,
    transposed, numpy, tofile), so onnx-ir writes it when the graph is saved."""

    def __init__(self, tensor: torch.Tensor, name: str, perm: tuple[int, ...] | None = None):
        self.tensor, self.name, self.dtype = tensor.detach(), name, tensor.dtype
        self.perm = tuple(perm) if perm is not None else None

    @property
    def shape(self) -> tuple:
        return tuple(self.tensor.permute(self.perm).shape) if self.perm else tuple(self.tensor.shape)

    def transposed(self, perm) -> ModuleTensorReader:
        assert self.perm is None
        return ModuleTensorReader(self.tensor, self.name, perm)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def key(self) -> tuple:
        """Equal for two readers that write the same bytes (the same tensor, the same layout)."""
        t = self.tensor
        return "module", t.data_ptr(), str(t.dtype), tuple(t.shape), tuple(t.stride()), self.perm

    def numpy(self) -> np.ndarray:
        t = self.tensor.permute(self.perm) if self.perm else self.tensor
        return np.ascontiguousarray(t.contiguous().numpy())

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def tobytes(self) -> bytes:
        return self.numpy().tobytes()

    def tofile(self, file) -> None:
        a = self.numpy()
        file.write(memoryview(a.reshape(-1).view(np.uint8)))


#: bytes of a checkpoint tensor read, cast and written at a time
CHUNK_BYTES = 16 << 20


def reader_tensor(reader: CheckpointTensorReader, name: str):
    """An onnx-ir lazy tensor that reads (and writes) itself through `reader`."""
    import onnx_ir as ir

    t = ir.LazyTensor(lambda: reader, dtype=ir.DataType.from_numpy(np.dtype(str(reader.dtype).removeprefix("torch."))),
                      shape=ir.Shape(list(reader.shape)), name=name)
    t.meta["onnxport_reader"] = reader
    return t


class CheckpointTensorReader:
    """One safetensors tensor, read by offset with plain file reads (safetensors' own reader
    maps the whole file, and every page it touches stays resident while the map lives) and
    cast to `dtype`. `tofile` (how onnx-ir writes external data) streams it in chunks of
    CHUNK_BYTES, so writing a 500 MB embedding table never holds it; `numpy()` reads it whole."""

    def __init__(self, path, info, name: str, dtype: torch.dtype, perm: tuple[int, ...] | None = None):
        self.path, self.info, self.name, self.dtype = path, info, name, dtype
        self.src_dtype = getattr(torch, info.dtype)
        #: read transposed (a folded Transpose of the weight): permuted in the stored dtype,
        #: before the cast, so a bf16 table is transposed at half the bytes
        self.perm = tuple(perm) if perm is not None else None

    @property
    def shape(self) -> tuple:
        return tuple(self.info.shape[p] for p in self.perm) if self.perm else tuple(self.info.shape)

    def transposed(self, perm) -> CheckpointTensorReader:
        assert self.perm is None
        return CheckpointTensorReader(self.path, self.info, self.name, self.dtype, perm)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.info.shape, dtype=np.int64)) * self.dtype.itemsize

    def key(self) -> tuple:
        """Equal for two readers that write the same bytes (the same stored tensor, dtype, layout)."""
        return "checkpoint", str(self.path), self.info.offset, str(self.dtype), self.perm

    def _stored(self) -> torch.Tensor:
        with open(self.path, "rb") as f:
            f.seek(self.info.offset)
            t = self._read(f, self.info.nbytes).reshape(self.info.shape)
        return t.permute(self.perm).contiguous() if self.perm else t

    def _read(self, f, nbytes: int) -> torch.Tensor:
        buf = bytearray(nbytes)
        if f.readinto(buf) != nbytes:
            raise CheckpointError(f"{self.info.file} is truncated at tensor {self.name!r}", "fetch the file again")
        return torch.frombuffer(buf, dtype=self.src_dtype) if nbytes else torch.empty(0, dtype=self.src_dtype)

    def numpy(self) -> np.ndarray:
        return np.ascontiguousarray(self._stored().to(self.dtype).numpy())

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def tobytes(self) -> bytes:
        return self.numpy().tobytes()

    def tofile(self, file) -> None:
        if self.perm:  # whole (stored dtype), permuted, then cast chunk by chunk
            flat = self._stored().reshape(-1)
            step = max(1, CHUNK_BYTES // self.src_dtype.itemsize)
            for i in range(0, flat.numel(), step):
                file.write(flat[i:i + step].to(self.dtype).numpy().tobytes())
            return
        item = self.src_dtype.itemsize
        step = max(item, CHUNK_BYTES // item * item)
        left = self.info.nbytes
        with open(self.path, "rb") as f:
            f.seek(self.info.offset)
            while left > 0:
                n = min(step, left)
                file.write(self._read(f, n).to(self.dtype).numpy().tobytes())
                left -= n


def predicted_readers(model, weights: CheckpointWeights, layers_path: str, embeds: bool = False) -> list:
    """The readers (`weights.lazy`) a stamped decoder graph will be bound to, in the layout the
    binding stores them, so they can be written while the graph is traced (bundle/weights.py
    `EarlyWeights`): the parameters of the text backbone (the module holding the decoder's
    layers at `layers_path`) and the output embedding, once each (a tied table under its first
    name), without the input embedding when the graph takes `inputs_embeds`. A linear layer's
    own weight is predicted transposed, as `fold_weight_transposes` and the exporter's constant
    folding store a MatMul weight; a tied one as it is (it is read by two nodes). A wrong
    prediction only costs the time: the graph's save then writes every weight itself."""
    root = layers_path.rpartition(".")[0]
    head = model.get_output_embeddings()
    input_embedding = model.get_input_embeddings() if embeds else None
    skip = {id(p) for p in input_embedding.parameters()} if input_embedding is not None else set()
    wanted = {id(p) for p in head.parameters()} if head is not None else set()
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    readers, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        under = not root or name.startswith(root + ".")
        if id(p) in seen or id(p) in skip or not (under or id(p) in wanted):
            continue
        seen.add(id(p))
        reader = weights.lazy(name, tuple(p.shape)).meta["onnxport_reader"]
        if id(p) in linear and p.ndim == 2 and uses[id(p)] == 1:
            reader = reader.transposed((1, 0))
        readers.append(reader)
    return readers


class Binder:
    """Gives every initializer of a meta-traced onnx-ir model its data, in two steps around the
    exporter's optimizer: before it, buffers get their (small, real) values and weights none
    (so constant folding, deduplication and CSE neither fold nor read, nor keep, them); after
    it, each remaining weight gets its lazy checkpoint tensor."""

    def __init__(self, weights: CheckpointWeights, prefix: str):
        self.weights, self.prefix = weights, prefix
        self.shapes: dict[str, tuple] = {}
        #: buffers under this name prefix stay unbound through the optimizer too, as weights do
        #: (a stamped export binds each layer's own buffers by name: none folded, none merged
        #: with another layer's equal one)
        self.unbound_buffers: str | None = None

    def _short(self, name: str) -> str:
        return name[len(self.prefix):] if name.startswith(self.prefix) else name

    def before_optimize(self, model) -> None:
        w = self.weights
        for name, value in model.graph.initializers.items():
            short = self._short(name)
            if short in w.buffers and not (self.unbound_buffers and short.startswith(self.unbound_buffers)):
                value.const_value = w.lazy(short, tuple(w.buffers[short].shape))
            elif short in w.buffers:
                self.shapes[name] = tuple(w.buffers[short].shape)
                value.const_value = None
            elif short in w.params:
                self.shapes[name] = tuple(int(d) for d in value.shape) if value.shape is not None else tuple(
                    w.params[short].shape)
                value.const_value = None
            elif value.const_value is None or _is_meta(value.const_value):
                raise ExportError(f"initializer {name!r} is neither a checkpoint weight nor a buffer",
                                  f"the model creates tensors in forward that a meta trace cannot fill; {HINT}")

    def after_optimize(self, model) -> int:
        n = 0
        for name, value in model.graph.initializers.items():
            if name in self.shapes and value.const_value is None:
                value.const_value = self.weights.lazy(self._short(name), self.shapes[name])
                n += 1
        missing = [name for name, v in model.graph.initializers.items() if v.const_value is None]
        if missing:
            raise ExportError(f"initializer {missing[0]!r} has no data after optimization", HINT)
        log.info("bound %d initializers lazily to the checkpoint", n)
        folded = fold_weight_transposes(model.graph, set(self.shapes))
        if folded:
            log.info("folded %d weight transposes lazily", folded)
        return n


def fold_weight_transposes(graph, weights: set[str]) -> int:
    """`Transpose(W)` of a streamed weight becomes a stored transposed initializer, as the
    exporter's constant folding does for an in-memory model (it could not fold these: their
    data was not bound yet). The transpose happens lazily when the tensor is written. Without
    this the graph would transpose every linear weight at run time (ORT folds it at load, at
    twice the memory), and quantizers would find no MatMul with a constant weight."""
    import onnx_ir as ir

    n = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        w = node.inputs[0]
        if w is None or w.name not in weights or w.const_value is None or node.outputs[0].is_graph_output():
            continue
        if len(w.uses()) != 1:  # a tied table (embedding and lm_head): stored once, as in-memory exports do
            continue
        perm = node.attributes.get("perm")
        perm = list(perm.as_ints()) if perm is not None else list(reversed(range(len(w.const_value.shape))))
        reader = w.const_value.meta.get("onnxport_reader")
        if reader is None or reader.perm is not None:
            continue
        name, transposed = w.name, reader.transposed(perm)
        value = ir.Value(name=name, type=ir.TensorType(w.const_value.dtype), shape=ir.Shape(list(transposed.shape)))
        value.const_value = reader_tensor(transposed, name)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(w.name)
        graph.register_initializer(value)
        n += 1
    return n


class StreamedForward:
    """Makes a meta-device model (a `skeleton_model`) runnable as a PyTorch reference in
    bounded memory: each module's own parameters are read from the checkpoint (cast to the
    trace dtype) just before it runs and dropped right after, so at most one module's weights
    are in memory (a linear layer, an embedding table, an expert bank), whatever the model's
    size. Buffers get their real values once. The outputs are the model's own, computed with
    the checkpoint's weights: the reference for verifying a `--low-memory` export.

    A model that reads a parameter outside its owner's forward (the tensor would still be on
    the meta device) fails with one line instead of computing with it."""

    def __init__(self, model, weights: CheckpointWeights):
        self.model, self.weights = model, weights
        self.handles = []
        #: module -> its meta parameters while it runs with the real ones
        self._meta: dict[int, dict] = {}
        self.loaded_bytes = 0
        self.peak_module_bytes = 0
        for name, buf in weights.buffers.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if leaf in module._buffers and module._buffers[leaf] is not None:
                saved = name in weights.ckpt.tensors  # a buffer the checkpoint stores is read from it
                module._buffers[leaf] = torch.from_numpy(weights.lazy(name, tuple(buf.shape)).numpy()) if saved \
                    else buf
        for prefix, module in model.named_modules():
            names = [n for n, p in module._parameters.items() if p is not None]
            if names:
                self.handles.append(module.register_forward_pre_hook(self._loader(module, prefix, names)))
                self.handles.append(module.register_forward_hook(self._unloader(module, names)))

    def _loader(self, module, prefix: str, names: list[str]):
        def hook(_module, _args):
            saved = {}
            total = 0
            for n in names:
                p = module._parameters[n]
                full = f"{prefix}.{n}" if prefix else n
                arr = self.weights.lazy(full, tuple(p.shape)).numpy()
                saved[n] = p
                module._parameters[n] = torch.nn.Parameter(torch.from_numpy(arr), requires_grad=False)
                total += arr.nbytes
            self._meta[id(module)] = saved
            self.loaded_bytes += total
            self.peak_module_bytes = max(self.peak_module_bytes, total)

        return hook

    def _unloader(self, module, names: list[str]):
        def hook(_module, _args, _out):
            for n, p in self._meta.pop(id(module), {}).items():
                module._parameters[n] = p

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def streamed_reference(model, ckpt, buffers: dict, dtype: torch.dtype) -> StreamedForward:
    """Install weight streaming on the `--low-memory` skeleton `model` (whose real `buffers`
    skeleton_model returned): from now on its forward reads each module's weights from `ckpt`
    when that module runs."""
    return StreamedForward(model, CheckpointWeights(ckpt, model, buffers, dtype))


def _is_meta(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.device.type == "meta"
