"""Nothing silently dropped: every checkpoint weight is in the graph or explicitly skipped.

Before loading, checkpoint shapes are compared with the shapes the config implies (a model
built on the meta device), so a mismatched config fails with one line instead of a 40-line
transformers traceback. After export, every model parameter is matched to a graph initializer
by name or, when the exporter folded it (transpose, renaming), by a content fingerprint.
"""

from __future__ import annotations

import numpy as np
import torch

from onnxport.errors import CheckpointError, ExportError


def check_checkpoint_shapes(ckpt, model_class_factory) -> None:
    """Compare safetensors header shapes with a meta-device model built from the config."""
    try:
        with torch.device("meta"):
            meta = model_class_factory()
    except Exception as e:  # noqa: BLE001 - a config transformers accepts but cannot build from
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"config.json describes a model that cannot be built: {line}",
                              "fix config.json against the model's documentation") from e
    expected = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
    for name, info in ckpt.tensors.items():
        if name not in expected:
            continue  # reported by account_weights after loading (may be a renamed key)
        if tuple(info.shape) != expected[name]:
            raise CheckpointError(
                f"weight {name!r} has shape {list(info.shape)} in {info.file} but config.json "
                f"implies {list(expected[name])}",
                "config.json does not belong to these weights; use the config saved with them",
            )


def _fingerprint(a: np.ndarray) -> tuple:
    a = a.astype(np.float64, copy=False)
    return (a.size, float(f"{a.sum():.6g}"), float(f"{np.square(a).sum():.6g}"))


def account_weights(
    model: torch.nn.Module, ckpt_names: set[str], graph_initializers, traced_used: set[str] | None = None,
    declared_skips=None,
) -> dict:
    """Return {"in_graph": n, "skipped": {name: reason}}; raise if anything is unaccounted.

    A parameter counts as in the graph when the traced program reads it (`traced_used`, from
    torch.export: exact even when the exporter folds it, e.g. Gemma's `1 + weight`), or when a
    graph initializer carries its name or its content fingerprint (TorchScript path).
    `graph_initializers` maps initializer/constant name -> numpy array, or is a callable that
    builds that map; it is only called when a parameter is missing from `traced_used`, so a
    normal export does not read every weight back from disk. `declared_skips(unread)` returns
    the unread parameters the recipe leaves out on purpose, with the reason."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unused = getattr(model, "_onnxport_unused_checkpoint_keys", None)
    if unused is None:  # a model not loaded through recipes.base.from_pretrained
        unused = sorted(n for n in ckpt_names if n not in params)
    if unused:
        raise ExportError(
            f"{len(unused)} checkpoint weight(s) are not used by the model: {', '.join(unused[:5])}",
            "the checkpoint does not match its config/model class; nothing is dropped silently",
        )
    def key(p):  # meta tensors (a bounded-memory trace) all have data_ptr 0: tie by identity
        return id(p) if p.device.type == "meta" else p.data_ptr()

    owner: dict[int, str] = {}
    aliases: dict[int, set[str]] = {}
    for name, p in model.named_parameters():  # first name of each storage
        owner.setdefault(key(p), name)
    for name, p in params.items():  # every name of a tied storage (torch.export keeps one)
        aliases.setdefault(key(p), set()).add(name)
    fingerprints = {}
    in_graph, skipped, unread = [], {}, []
    for name, p in params.items():
        first = owner[key(p)]
        if first != name:
            skipped[name] = f"tied to {first}"
            continue
        hit = traced_used is not None and bool(aliases[key(p)] & traced_used)
        if not hit and callable(graph_initializers):
            graph_initializers = graph_initializers()
        hit = hit or any(iname == name or iname.endswith("." + name) for iname in graph_initializers)
        if not hit and p.device.type != "meta":  # a meta trace has no content to compare
            if not fingerprints:
                fingerprints = {
                    _fingerprint(v) for v in graph_initializers.values() if v.dtype.kind == "f" and v.size > 1
                }
            hit = _fingerprint(p.detach().float().numpy()) in fingerprints
        if not hit:
            unread.append(name)
            continue
        in_graph.append(name)
    declared = declared_skips(set(unread)) if (unread and declared_skips) else {}
    missing = [n for n in unread if n not in declared]
    if missing:
        raise ExportError(
            f"weight {missing[0]!r} is not in the exported graph"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            "the export dropped a parameter (dead code path?); report it with --debug output",
        )
    skipped.update(declared)
    return {"in_graph": len(in_graph), "skipped": skipped}


def onnx_arrays(onnx_file) -> dict:
    """Initializers and Constant-node tensors of a saved graph, by name (numpy)."""
    import onnx_ir as ir

    model = ir.load(str(onnx_file))
    arrays = {name: v.const_value.numpy() for name, v in model.graph.initializers.items() if v.const_value is not None}
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            arrays[node.outputs[0].name] = node.attributes["value"].as_tensor().numpy()
    return arrays


def unread_parameters(module: torch.nn.Module, used: set[str], onnx_file) -> list[str]:
    """Parameters of `module` the exported graph does not read. Beyond the traced set, a
    parameter counts as read when an initializer has its content: the TorchScript exporter
    deduplicates equal tensors (zero biases, unit norms) under one name."""
    params = {n: p for n, p in module.named_parameters() if n not in used}
    if not params:
        return []
    prints = {_fingerprint(v) for v in onnx_arrays(onnx_file).values() if v.dtype.kind == "f" and v.size > 1}
    return sorted(n for n, p in params.items() if p.numel() <= 1 or _fingerprint(p.detach().float().numpy()) not in prints)
