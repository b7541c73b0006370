"""Trace two decoder layers, stamp the others: a decoder export in the time of a 2-layer one.

The layers of one decoder are one computation with other weights, yet torch.onnx traces each
of them, twice (torch.export's capture, then run_decompositions): about 75 % of a 30-layer
export. So a decoder whose layers are all alike is traced with its first two layers only;
layer 1's nodes are then copied for layers 2..N-1, each copy reading layer k's own weights and
cache tensors, its metadata saying `layers.k` (bisect, the quantizer's per-layer record and
GPTQ read it), and the last copy feeding the final norm.

Models whose first layers differ (DeepSeek's and GLM-4.5's dense layers before the MoE ones)
are traced up to the second of the alike layers, which is then the template.

What makes a copy the right graph, checked in this order (any failure: trace every layer):

1. every layer from the first alike one on is the same module: submodule types, parameter and
   buffer names and shapes, and plain attributes other than the layer index (a sliding-window,
   no-rope or MoE-every-k layer differs here), `layer_types` all one, and the cache one
   key/value pair per layer of one shape;
2. weights are bound by name: the copied nodes read layer 1's parameters and buffers (layer k's
   for copy k, read lazily from the model or the checkpoint as `export.stream` does) or values
   every layer shares (rotary tables, the mask, constants); a node reading another layer's
   tensor stops the stamping;
3. in the traced graph the template and the layer before it are the same computation, node
   for node (nodes the exporter's rewrites left without a scope belong to the layer that reads
   them): same ops and
   attributes, the same shared values and equal constants, weights of the same name within
   their layer (a constant that depends on the layer index fails here);
4. the stamped graph is verified against the PyTorch model, as every export is.

Values and nodes of copy k are named `layers.k/<traced name>`.
"""

from __future__ import annotations

import ast
import contextlib
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

#: layers traced when all are alike: layer 1 is the template, layer 0 the check that the
#: template is no special case
TRACED = 2
#: attributes that hold a layer's own index (differ between layers by design)
INDEX_ATTRS = {"layer_idx", "layer_index", "layer_id", "layer_number", "block_idx", "idx"}
SCOPES = "pkg.torch.onnx.name_scopes"


class StampError(Exception):
    """The traced graph cannot be stamped (the export then traces every layer)."""


def decoder_layers(model) -> str | None:
    """The module path (in the causal LM) of its decoder layers' ModuleList, or None."""
    from onnxport.hf.compat import text_config

    n = getattr(text_config(model.config), "num_hidden_layers", None)
    found = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and n and len(m) == n and name.rsplit(".", 1)[-1] in ("layers", "h",
                                                                                                     "blocks", "layer")]
    return found[0] if len(found) == 1 else None


def _signature(layer: torch.nn.Module, skip=INDEX_ATTRS) -> tuple:
    plain = (bool, int, float, str, type(None), tuple)
    mods = tuple((name, type(m).__name__, tuple(sorted(
        (k, repr(v)) for k, v in vars(m).items()
        if not k.startswith("_") and k not in skip and isinstance(v, plain))))
        for name, m in layer.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters(remove_duplicate=False))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers())
    return mods, params, buffers


def plan(model, kv, cfg) -> tuple[str, int] | str:
    """(path of the decoder's layers, index of the first of the alike layers) when the decoder
    can be stamped, else why not."""
    from onnxport.hf.compat import text_config

    if cfg.exporter != "dynamo":
        return "the TorchScript exporter keeps no module scopes"
    if kv.is_empty or kv.has_states or kv.has_indexer or kv.encoder_decoder or len(set(kv.layers)) != 1:
        return "its cache is not one key/value pair per layer of one shape"
    path = decoder_layers(model)
    if path is None:
        return "no single ModuleList of the decoder's layers"
    layers = model.get_submodule(path)
    sigs = [_signature(layer) for layer in layers]
    first = len(sigs) - 1
    while first > 0 and sigs[first - 1] == sigs[-1]:
        first -= 1
    if first + TRACED >= len(sigs):
        different = next((i for i in range(len(sigs) - 1, 0, -1) if sigs[i] != sigs[-1]), None)
        return (f"{len(sigs)} layers" if different is None or len(sigs) <= TRACED
                else f"layer {different} is not built like layer {len(sigs) - 1}")
    types = getattr(text_config(model.config), "layer_types", None)
    if types and len(set(types[first:])) != 1:
        return f"its layers are of several types ({', '.join(sorted(set(map(str, types))))})"
    return path, first


def why_not(model, kv, cfg) -> str | None:
    """Why the decoder cannot be stamped (None: it can)."""
    p = plan(model, kv, cfg)
    return p if isinstance(p, str) else None


@contextlib.contextmanager
def truncated(model, path: str, n: int = TRACED):
    """The model with its first `n` decoder layers only (config.num_hidden_layers too)."""
    from onnxport.hf.compat import text_config

    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    full = getattr(owner, attr)
    text = text_config(model.config)
    saved = {k: getattr(text, k) for k in ("num_hidden_layers", "layer_types") if getattr(text, k, None) is not None}
    setattr(owner, attr, torch.nn.ModuleList(list(full)[:n]))
    try:
        text.num_hidden_layers = n
        if "layer_types" in saved:
            text.layer_types = list(saved["layer_types"])[:n]
        yield
    finally:
        setattr(owner, attr, full)
        for k, v in saved.items():
            setattr(text, k, v)


class Stamp:
    """Expands the onnx-ir model of the first `traced` layers to all layers (`expand`)."""

    def __init__(self, path: str, first: int, kv, naming: str, prefix: str, bind):
        from onnxport.spec import cache_entries

        self.path, self.kv, self.prefix, self.bind = path, kv, prefix, bind
        #: the layer checked against the template, the template, the number of layers traced
        self.check, self.template = first, first + 1
        self.traced = first + TRACED
        #: (layer, what) -> (past name, present name)
        self.cache = {(e.layer, e.what): (e.past, e.present) for e in cache_entries(kv, naming)}
        self.num_layers = kv.num_layers
        #: (id, id) -> whether two values computed outside the layers' own nodes match
        self._memo: dict[tuple[int, int], bool] = {}

    # -- names ---------------------------------------------------------------------------
    def _layer_of(self, name: str) -> tuple[int, str] | None:
        """(layer, name within the layer) of an initializer that is a parameter or buffer of
        one of the decoder's layers (a constant the exporter lifted out of a layer's code is
        not: every layer reading it reads the same tensor)."""
        short = name[len(self.prefix):] if name.startswith(self.prefix) else name
        head = self.path + "."
        weights = self.bind.weights
        if not short.startswith(head) or (short not in weights.params and short not in weights.buffers):
            return None
        idx, _, rest = short[len(head):].partition(".")
        return (int(idx), rest) if idx.isdigit() and rest else None

    def _scope(self, i: int) -> str:
        return f"{self.prefix}{self.path}.{i}"

    def _in_layer(self, node, i: int) -> bool:
        scope = self._scope(i)
        raw = node.metadata_props.get(SCOPES)
        try:
            scopes = ast.literal_eval(raw) if raw else []
        except (ValueError, SyntaxError):
            return False
        return any(s == scope or s.startswith(scope + ".") for s in scopes)

    def _renamed_metadata(self, node, k: int) -> dict:
        old, new = self._scope(self.template), self._scope(k)
        out = {}
        for key, value in node.metadata_props.items():
            if key == SCOPES:
                scopes = ast.literal_eval(value)
                value = repr([new + s[len(old):] if s == old or s.startswith(old + ".") else s for s in scopes])
            elif key == "namespace":
                value = value.replace(old + ":", new + ":").replace(old + ".", new + ".")
            out[key] = value
        return out

    # -- analysis ------------------------------------------------------------------------
    def _stateful(self, graph) -> set:
        """Values that depend on a weight or a float graph input (not through Shape/Size):
        what a layer computes. The rest (mask, positions, rotary tables, shapes) every layer
        shares."""
        params = set(self.bind.weights.params)
        seeds = {v for name, v in graph.initializers.items()
                 if self._layer_of(name) is not None or (name[len(self.prefix):] if name.startswith(self.prefix)
                                                         else name) in params}
        seeds |= {v for v in graph.inputs if v.dtype is not None and v.dtype.is_floating_point()}
        stateful = set(seeds)
        for node in graph:
            if _shape_only(node):
                continue
            if any(v in stateful for v in node.inputs if v is not None):
                stateful.update(node.outputs)
        return stateful

    def _members(self, nodes: list, i: int, stateful: set) -> list:
        """Layer i's nodes that compute, in graph order: those of its module scope, and those
        the exporter's rewrites made without a scope (a Split of a fused projection) whose
        every reader is one of them."""
        mine = {n for n in nodes if self._in_layer(n, i) and any(o in stateful for o in n.outputs)}
        unscoped = [n for n in nodes if not n.metadata_props.get(SCOPES) and any(o in stateful for o in n.outputs)
                    and not any(o.is_graph_output() for o in n.outputs)]
        grew = True
        while grew:  # chains of unscoped nodes join one by one
            grew = False
            for n in unscoped:
                if n in mine:
                    continue
                users = [u for o in n.outputs for u, _ in o.uses() if not _shape_only(u)]
                if users and all(u in mine for u in users):
                    mine.add(n)
                    grew = True
        return [n for n in nodes if n in mine]

    def _layer(self, graph, nodes: list, i: int, stateful: set) -> dict:
        """Layer i's nodes that compute (in graph order), its one stateful input from outside
        (the residual stream) and its one stateful output read outside it."""
        mine = self._members(nodes, i, stateful)
        if not mine:
            raise StampError(f"no node of layer {i} carries the exporter's module scope")
        produced = {o for n in mine for o in n.outputs}
        for n in mine:
            for attr in n.attributes.values():
                if attr.type in (attr.type.GRAPH, attr.type.GRAPHS):
                    raise StampError(f"layer {i} has a subgraph ({n.op_type})")
        stream_in = set()
        for n in mine:
            for v in n.inputs:
                if v is None or v in produced or v not in stateful:
                    continue
                if v.is_initializer():
                    at = self._layer_of(v.name)
                    if at is not None and at[0] != i:
                        raise StampError(f"layer {i} reads {v.name}, a tensor of layer {at[0]}")
                elif v.is_graph_input():
                    if not self._is_own_cache(v.name, i) and i != 0:
                        raise StampError(f"layer {i} reads the graph input {v.name}")
                    if not self._is_own_cache(v.name, i):
                        stream_in.add(v)
                else:
                    stream_in.add(v)
        # a stateful value made outside the layer, not a weight: the residual stream
        if len(stream_in) != 1:
            raise StampError(f"layer {i} reads {len(stream_in)} computed values from outside it "
                             f"({', '.join(sorted(v.name for v in stream_in)[:4])})")
        members = set(mine)
        stream_out = set()
        for n in mine:
            for o in n.outputs:
                if o.is_graph_output():
                    if not self._is_own_cache(o.name, i, present=True):
                        raise StampError(f"layer {i} writes the graph output {o.name}")
                    continue
                # a Shape read outside (a cache length) takes no value from the layer
                if any(user not in members and not _shape_only(user) for user, _ in o.uses()):
                    stream_out.add(o)
        if len(stream_out) != 1:
            raise StampError(f"layer {i} hands {len(stream_out)} values to what follows it")
        return {"nodes": mine, "in": next(iter(stream_in)), "out": next(iter(stream_out)),
                "index": {o: (j, k) for j, n in enumerate(mine) for k, o in enumerate(n.outputs)}}

    def _is_own_cache(self, name: str, i: int, present: bool = False) -> bool:
        return any(names[1 if present else 0] == name for (layer, _), names in self.cache.items() if layer == i)

    def _cache_what(self, name: str, present: bool = False) -> tuple[int, str] | None:
        for (layer, what), names in self.cache.items():
            if names[1 if present else 0] == name:
                return layer, what
        return None

    def _same(self, a, b, zero: dict, one: dict) -> bool:
        """Input `a` of a node of the checked layer and `b` of the matching template node stand
        for the same thing in their layer."""
        if a is b:
            return True
        if a is None or b is None:
            return False
        if a in zero["index"] or b in one["index"]:
            return zero["index"].get(a) == one["index"].get(b)
        if a is zero["in"] or b is one["in"]:
            return a is zero["in"] and b is one["in"]
        if a.is_graph_input() or b.is_graph_input():
            ca, cb = self._cache_what(a.name), self._cache_what(b.name)
            return ca is not None and cb is not None and ca == (self.check, cb[1]) and cb[0] == self.template
        la, lb = self._layer_of(a.name), self._layer_of(b.name)
        if la is not None or lb is not None:
            return (la is not None and lb is not None and la == (self.check, lb[1]) and lb[0] == self.template
                    and _perm(a) == _perm(b))
        ta, tb = _constant(a), _constant(b)
        if ta is not None or tb is not None:
            return ta is not None and tb is not None and ta.dtype == tb.dtype and ta.shape == tb.shape and \
                np.array_equal(ta, tb)
        # values each layer computes for itself from shapes (a sequence length, a reshape
        # target): the same when made the same way from matching values
        key = (id(a), id(b))
        if key not in self._memo:
            pa, pb = a.producer(), b.producer()
            self._memo[key] = (pa is not None and pb is not None and same_op(pa, pb)
                               and a.index() == b.index()
                               and all(self._same(x, y, zero, one) for x, y in zip(pa.inputs, pb.inputs)))
        return self._memo[key]

    def _check_alike(self, zero: dict, one: dict) -> None:
        c, t = self.check, self.template
        if len(zero["nodes"]) != len(one["nodes"]):
            raise StampError(f"layer {c} has {len(zero['nodes'])} nodes, layer {t} {len(one['nodes'])}")
        for a, b in zip(zero["nodes"], one["nodes"]):
            if not same_op(a, b):
                raise StampError(f"layers {c} and {t} differ: {a.op_type} {a.name} vs {b.op_type} {b.name}")
            for x, y in zip(a.inputs, b.inputs):
                if not self._same(x, y, zero, one):
                    raise StampError(f"layers {c} and {t} differ in what {b.op_type} {b.name} reads "
                                     f"({getattr(x, 'name', None)} vs {getattr(y, 'name', None)})")

    # -- stamping ------------------------------------------------------------------------
    def expand(self, model) -> set[str]:
        """Stamp the layers after the traced ones into the traced model; return the parameters
        they read (names in the causal LM)."""
        import onnx_ir as ir

        graph = model.graph
        nodes = list(graph)
        stateful = self._stateful(graph)
        zero = self._layer(graph, nodes, self.check, stateful)
        one = self._layer(graph, nodes, self.template, stateful)
        if zero["out"] is not one["in"]:
            raise StampError(f"layer {self.template} does not read layer {self.check}'s output")
        self._check_alike(zero, one)
        template, h_out = one["nodes"], one["out"]
        if h_out.is_graph_output():
            raise StampError("the last layer's output is a graph output")
        after = [(user, idx) for user, idx in h_out.uses() if user not in set(template)]
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        used: set[str] = set()
        new_inits: dict[str, ir.Value] = {}
        anchor, prev = template[-1], h_out
        for k in range(self.traced, self.num_layers):
            mapping = {one["in"]: prev}
            copies = []
            for n in template:
                ins = []
                for v in n.inputs:
                    if v is None or v in mapping:
                        ins.append(mapping.get(v) if v is not None else None)
                    elif v.is_graph_input():
                        ins.append(self._past(v, k, inputs, graph) if self._cache_what(v.name) else v)
                    elif v.is_initializer() and self._layer_of(v.name) is not None:
                        ins.append(self._weight(v, k, new_inits, graph, used))
                    else:
                        ins.append(v)
                copy = ir.Node(n.domain, n.op_type, ins, attributes=list(n.attributes.values()), overload=n.overload,
                               num_outputs=len(n.outputs), name=f"layers.{k}/{n.name}",
                               metadata_props=self._renamed_metadata(n, k), version=n.version)
                for o, c in zip(n.outputs, copy.outputs):
                    present = self._cache_what(o.name, present=True) if o.is_graph_output() else None
                    c.name = self.cache[(k, present[1])][1] if present else f"layers.{k}/{o.name}"
                    c.type, c.shape = o.type, o.shape.copy() if o.shape is not None else None
                    mapping[o] = c
                    if present:
                        outputs[c.name] = c
                copies.append(copy)
            graph.insert_after(anchor, copies)
            anchor, prev = copies[-1], mapping[h_out]
        for user, idx in after:
            user.replace_input_with(idx, prev)
        self._reorder(graph, inputs, outputs)
        graph.sort()
        log.info("stamped layers %d-%d from traced layer %d (%d nodes each)", self.traced, self.num_layers - 1,
                 self.template, len(template))
        return used

    def _past(self, v, k: int, inputs: dict, graph):
        import onnx_ir as ir

        _, what = self._cache_what(v.name)
        name = self.cache[(k, what)][0]
        if name not in inputs:
            inputs[name] = ir.Value(name=name, type=v.type, shape=v.shape.copy() if v.shape is not None else None)
        return inputs[name]

    def _weight(self, v, k: int, made: dict, graph, used: set):
        import onnx_ir as ir

        _, rest = self._layer_of(v.name)
        short = f"{self.path}.{k}.{rest}"
        name = self.prefix + short
        if name in made:
            return made[name]
        tensor = bound_tensor(self.bind.weights, short, name, _perm(v))
        if tensor is None:
            raise StampError(f"layer {k} has no tensor {short}")
        if short in self.bind.weights.params:
            used.add(short)
        if tuple(tensor.shape) != tuple(v.const_value.shape):
            raise StampError(f"{short} has shape {list(tensor.shape)}, layer {self.template}'s "
                             f"{list(v.const_value.shape)}")
        value = ir.Value(name=name, type=v.type, shape=ir.Shape(list(tensor.shape)), const_value=tensor)
        graph.register_initializer(value)
        made[name] = value
        return value

    def _reorder(self, graph, inputs: dict, outputs: dict) -> None:
        """Graph inputs and outputs in the order of the full I/O contract: the leading inputs,
        then every layer's cache; logits (and the hidden state), then every layer's cache."""
        past = [p for p, _ in self.cache.values()]
        present = [q for _, q in self.cache.values()]
        lead_in = [v for v in graph.inputs if v.name not in set(past)]
        lead_out = [v for v in graph.outputs if v.name not in set(present)]
        graph.inputs.clear()
        graph.inputs.extend(lead_in + [inputs[p] for p in past])
        graph.outputs.clear()
        graph.outputs.extend(lead_out + [outputs[q] for q in present])


def bound_tensor(weights, short: str, name: str, perm: tuple | None):
    """Parameter or buffer `short` of the model (`export.stream` weights) as a lazy tensor named
    `name`, a parameter read transposed by `perm` as the template's is; None if it has none."""
    if short in weights.buffers and short not in weights.params:
        return weights.lazy(short, tuple(weights.buffers[short].shape))
    if short not in weights.params:
        return None
    tensor = weights.lazy(short, tuple(weights.params[short].shape))
    if perm is not None:
        from onnxport.export.stream import reader_tensor

        tensor = reader_tensor(tensor.meta["onnxport_reader"].transposed(perm), name)
    return tensor


def same_op(a, b) -> bool:
    """Two nodes run the same op with the same attributes and arity."""
    return (a.op_type, a.domain, a.overload, len(a.inputs), len(a.outputs)) == \
        (b.op_type, b.domain, b.overload, len(b.inputs), len(b.outputs)) and _attributes(a) == _attributes(b)


def _shape_only(node) -> bool:
    return node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx")


def _perm(v) -> tuple | None:
    reader = v.const_value.meta.get("onnxport_reader") if v.const_value is not None else None
    return getattr(reader, "perm", None)


def _constant(v) -> np.ndarray | None:
    """The value of a small constant (an initializer or a Constant node's output)."""
    if v.const_value is not None and v.const_value.size <= 1 << 16:
        return v.const_value.numpy()
    node = v.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _attributes(node) -> list:
    out = []
    for name, attr in sorted(node.attributes.items()):
        value = attr.value
        if hasattr(value, "numpy"):
            value = value.numpy().tobytes()
        out.append((name, repr(value)))
    return out
