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
        path, dtype = self.ckpt.path / info.file, self.dtype

        def load():
            # a plain read of the tensor's bytes (offsets from the header onnxport validated):
            # safetensors' own reader maps the whole file, and every page it touches stays
            # resident while the map lives, so streaming through it costs the whole file
            buf = bytearray(info.nbytes)
            with open(path, "rb") as f:
                f.seek(info.offset)
                got = f.readinto(buf)
            if got != info.nbytes:
                raise CheckpointError(f"{info.file} is truncated at tensor {src!r}", "fetch the file again")
            t = torch.frombuffer(buf, dtype=getattr(torch, info.dtype)).reshape(info.shape) if info.nbytes else \
                torch.empty(info.shape, dtype=getattr(torch, info.dtype))
            # onnx-ir writes an ndarray-backed tensor with ndarray.tofile: no second copy
            return ir.Tensor(np.ascontiguousarray(t.to(dtype).numpy()), name=name)

        return ir.LazyTensor(load, dtype=ir.DataType.from_numpy(np.dtype(str(dtype).removeprefix("torch."))),
                             shape=ir.Shape(list(shape)), name=name)


class Binder:
    """Gives every initializer of a meta-traced onnx-ir model its data, in two steps around the
    exporter's optimizer: before it, buffers get their (small, real) values and weights none
    (so constant folding, deduplication and CSE neither fold nor read, nor keep, them); after
    it, each remaining weight gets its lazy checkpoint tensor."""

    def __init__(self, weights: CheckpointWeights, prefix: str):
        self.weights, self.prefix = weights, prefix
        self.shapes: dict[str, tuple] = {}

    def _short(self, name: str) -> str:
        return name[len(self.prefix):] if name.startswith(self.prefix) else name

    def before_optimize(self, model) -> None:
        w = self.weights
        for name, value in model.graph.initializers.items():
            short = self._short(name)
            if short in w.buffers:
                value.const_value = w.lazy(short, tuple(w.buffers[short].shape))
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
        return n


def _is_meta(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.device.type == "meta"
