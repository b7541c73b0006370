"""The split layout's block graphs, traced twice per role and stamped for the others.

A split export (`--layout split`) writes one prefill graph (`block_a-b`) and one decode graph
(`block_cache_a-b`) per pack of layers, and each used to be traced: 20 traces for SmolLM2's
30 layers in packs of 3, 60 in packs of 1. When the decoder's layers are all alike (the
conditions of export/stamp.py: same modules, parameters, buffers and plain attributes but for
the layer index, one layer type, one cache shape), the graphs of one role differ only in the
layers they read. So the first two full packs of each role are traced, the second is checked
against the first node for node (same ops and attributes; inputs made by matching nodes, the
same graph input by position, each layer's own weight of the same name, read the same way,
or equal constants), and every later full pack is a copy of the second reading its own
layers' weights (bound by name, as export/stamp.py binds them: lazily from the model; read
transposed where the template reads its weight transposed), with its own cache inputs and
outputs and metadata scopes. A shorter last pack is traced. Any failure of the check traces
every block, and each graph is verified against PyTorch as every export is.

Both exporters: dynamo traces the templates with every weight bound by name (export/stream.py
Binder); TorchScript keeps parameter names when it does not fold constants, but stores equal
tensors once under one name (untrained all-ones norms), so a template that reads a layer
parameter under another's name is refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from onnxport.export.stamp import (
    SCOPES,
    StampError,
    _perm,
    _signature,
    bound_tensor,
    decoder_layers,
    same_op,
)

log = logging.getLogger(__name__)

ROLES = ("block", "block_cache")
#: graph I/O names that carry a layer index (the cache of that layer)
_LAYER_IO = re.compile(r"^(past_key_values|present)\.(\d+)\.")


def why_not(model, kv, cfg, split) -> tuple[str | None, str | None]:
    """(path of the decoder's layer list, why the blocks cannot be stamped)."""
    from onnxport.hf.compat import text_config

    if not cfg.stamp:
        return None, "--no-stamp"
    if len(set(kv.layers)) != 1:
        return None, "its layers' caches differ in shape"
    path = decoder_layers(model)
    if path is None:
        return None, "no single ModuleList of the decoder's layers"
    layers = model.get_submodule(path)
    sigs = [_signature(layer) for layer in layers]
    different = next((i for i, s in enumerate(sigs) if s != sigs[0]), None)
    if different is not None:
        return None, f"layer {different} is not built like layer 0"
    types = getattr(text_config(model.config), "layer_types", None)
    if types and len(set(types)) != 1:
        return None, f"its layers are of several types ({', '.join(sorted(set(map(str, types))))})"
    if kv.num_layers // split.pack < 3:
        return None, f"{kv.num_layers} layers make fewer than 3 full packs of {split.pack}"
    return path, None


@dataclass
class _Template:
    entry: object
    model: object = None
    #: the parameters the traced graph reads
    used: set = field(default_factory=set)
    why_not: str | None = None


@dataclass
class BlockStamper:
    """Decides which block graphs of a split plan are traced and stamps the others."""

    model: object
    path: str
    pack: int
    prefix: str = "model."
    templates: dict = field(default_factory=dict)
    #: role -> [entries traced for it] (the first two full packs)
    traced: dict = field(default_factory=dict)
    _binder: object = None

    def binder(self):
        """The weight binder for the traced blocks (dynamo) and the copies: every weight and
        layer buffer bound by name, read from the model when the graph is saved."""
        from onnxport.export.stream import Binder, ModuleWeights

        if self._binder is None:
            self._binder = Binder(ModuleWeights(self.model), self.prefix)
            self._binder.unbound_buffers = self.path + "."
        return self._binder

    def traces(self, entry) -> bool:
        """Whether `entry` is traced (a template, a non-block graph, or a shorter pack)."""
        if entry.role not in ROLES or len(entry.layers) != self.pack:
            return True
        if len(self.traced.get(entry.role, [])) < 2:
            return True
        t = self.templates.get(entry.role)
        return t is None or t.why_not is not None

    def keep(self, entry):
        """A callback for export_graph: keeps the saved onnx-ir model of a template block."""
        if entry.role not in ROLES or len(entry.layers) != self.pack or len(self.traced.get(entry.role, [])) >= 2:
            return None

        def kept(model, used: set[str]) -> None:
            done = self.traced.setdefault(entry.role, [])
            done.append(_Template(entry, model, used))
            if len(done) == 2:
                first, second = done
                try:
                    for t in done:
                        self._own_tensors(t)
                    self._check(first, second)
                except StampError as e:
                    second.why_not, second.model = str(e), None
                    log.info("%s graphs traced one by one (no stamping: %s)", entry.role, e)
                self.templates[entry.role] = second
                first.model = None  # only the template stays in memory

        return kept

    def why_not_for(self, role: str) -> str | None:
        t = self.templates.get(role)
        return t.why_not if t is not None else None

    # -- check ---------------------------------------------------------------------------
    def _own_tensors(self, t: _Template) -> None:
        """Every layer parameter the graph reads is an initializer of its own name, with its
        data in memory (TorchScript's exporter stores equal tensors once, under one of their
        names: two all-ones norms read as one, which a copy for layers with other norms must
        not inherit; and a weight file of the raw export is gone after saving)."""
        import onnx_ir as ir

        names = set(t.model.graph.initializers)
        merged = sorted(n for n in t.used if self._layer_of(n) is not None and n not in names)
        if merged:
            raise StampError(f"{t.entry.file} reads {merged[0]} under another weight's name (the exporter merged "
                             "equal tensors)")
        for name, v in t.model.graph.initializers.items():
            if self._layer_of(name) is None and isinstance(v.const_value, ir.ExternalTensor):
                raise StampError(f"{t.entry.file} keeps {name} in a file of the raw export")

    def _layer_of(self, name: str) -> tuple[int, str] | None:
        head = f"{self.path}."
        if not name.startswith(head):
            return None
        idx, _, rest = name[len(head):].partition(".")
        return (int(idx), rest) if idx.isdigit() and rest else None

    def _check(self, first: _Template, second: _Template) -> None:
        a, b = first.model.graph, second.model.graph
        na, nb = list(a), list(b)
        if len(na) != len(nb):
            raise StampError(f"{first.entry.file} has {len(na)} nodes, {second.entry.file} {len(nb)}")
        if [len(a.inputs), len(a.outputs)] != [len(b.inputs), len(b.outputs)]:
            raise StampError(f"{first.entry.file} and {second.entry.file} differ in their inputs or outputs")
        shift = second.entry.layers[0] - first.entry.layers[0]
        where_a = {o: (i, k) for i, n in enumerate(na) for k, o in enumerate(n.outputs)}
        where_b = {o: (i, k) for i, n in enumerate(nb) for k, o in enumerate(n.outputs)}
        ins_a = {v: i for i, v in enumerate(a.inputs)}
        ins_b = {v: i for i, v in enumerate(b.inputs)}

        def same(x, y) -> bool:
            if x is None or y is None:
                return x is None and y is None
            if x in where_a or y in where_b:
                return where_a.get(x) == where_b.get(y)
            if x in ins_a or y in ins_b:
                return ins_a.get(x) == ins_b.get(y)
            lx, ly = self._layer_of(x.name), self._layer_of(y.name)
            if lx is not None or ly is not None:
                return (lx is not None and ly is not None and (lx[0] + shift, lx[1]) == ly
                        and _perm(x) == _perm(y))
            tx, ty = x.const_value, y.const_value
            if tx is None or ty is None:
                return False
            return tx.dtype == ty.dtype and tuple(tx.shape) == tuple(ty.shape) and np.array_equal(tx.numpy(), ty.numpy())

        for x, y in zip(na, nb):
            if not same_op(x, y):
                raise StampError(f"{first.entry.file} and {second.entry.file} differ: {x.op_type} {x.name} vs "
                                 f"{y.op_type} {y.name}")
            for u, v in zip(x.inputs, y.inputs):
                if not same(u, v):
                    raise StampError(f"{first.entry.file} and {second.entry.file} differ in what {y.op_type} "
                                     f"{y.name} reads ({getattr(u, 'name', None)} vs {getattr(v, 'name', None)})")
        for u, v in zip(a.outputs, b.outputs):
            if where_a.get(u) != where_b.get(v) or (u in ins_a) != (v in ins_b):
                raise StampError(f"{first.entry.file} and {second.entry.file} differ in output {v.name}")

    # -- stamping ------------------------------------------------------------------------
    def stamp(self, entry):
        """(onnx-ir model of `entry` copied from its role's template, parameters it reads)."""
        t = self.templates[entry.role]
        shift = entry.layers[0] - t.entry.layers[0]
        model = t.model.clone()
        graph = model.graph
        weights = self.binder().weights
        used: set[str] = set()
        for name, value in list(graph.initializers.items()):
            at = self._layer_of(name)
            if at is None:
                continue
            new = f"{self.path}.{at[0] + shift}.{at[1]}"
            tensor = bound_tensor(weights, new, new, _perm(value))
            if tensor is None:
                raise StampError(f"layer {at[0] + shift} has no tensor {new}")
            if new in weights.params:
                used.add(new)
            if tuple(tensor.shape) != tuple(value.const_value.shape):
                raise StampError(f"{new} has shape {list(tensor.shape)}, the template's {list(value.const_value.shape)}")
            graph.initializers.pop(name)
            value.name, value.const_value = new, tensor
            graph.register_initializer(value)
        for value in list(graph.inputs) + list(graph.outputs):
            value.name = self._shifted_io(value.name, shift)
        for node in graph:
            for key in (SCOPES, "namespace"):
                if key in node.metadata_props:
                    node.metadata_props[key] = self._shifted_scopes(node.metadata_props[key], t.entry.layers, shift)
        expected = {i.name for i in entry.inputs} | {o.name for o in entry.outputs}
        got = {v.name for v in list(graph.inputs) + list(graph.outputs)}
        if got != expected:
            raise StampError(f"the copy of {t.entry.file} for {entry.file} has I/O {sorted(got ^ expected)}")
        return model, used

    @staticmethod
    def _shifted_io(name: str, shift: int) -> str:
        m = _LAYER_IO.match(name)
        return f"{m.group(1)}.{int(m.group(2)) + shift}.{name[m.end():]}" if m else name

    def _shifted_scopes(self, text: str, layers: list[int], shift: int) -> str:
        lo, hi = layers[0], layers[-1]

        def sub(m: re.Match) -> str:
            i = int(m.group(2))
            return f"{m.group(1)}{i + shift}" if lo <= i <= hi else m.group(0)

        return re.sub(rf"({re.escape(self.path)}\.)(\d+)(?!\d)", sub, text)

