"""Export a transformers causal LM as one ONNX graph with a flat, well-named KV cache.

The graph contract (names follow optimum / onnxruntime-genai):

    inputs   input_ids        int64 [batch_size, sequence_length]
             attention_mask   int64 [batch_size, total_sequence_length]
             position_ids     int64 [batch_size, sequence_length]
             past_key_values.{i}.key / .value   [batch_size, kv_heads, past_sequence_length, head_dim]
    outputs  logits           float [batch_size, sequence_length, vocab_size]
             present.{i}.key / .value           [batch_size, kv_heads, total_sequence_length, head_dim]

`kv_layout="bshd"` swaps the heads and sequence axes of every cache tensor; `kv_naming="seed"`
uses past_key_in{i} / past_value_in{i} -> past_key{i} / past_value{i}.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from onnxport.config import ExportConfig
from onnxport.errors import ExportError
from onnxport.export.compat import build_dynamic_cache, cache_pairs, text_config
from onnxport.recipes.base import KVSpec
from onnxport.verify.inputs import ShapeCase, decoder_feeds

log = logging.getLogger(__name__)

# Example sizes for tracing: all distinct and > 1 so that no dynamic dim is specialised or
# unified with another by the exporter (torch.export specialises sizes 0 and 1).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
WRAPPER_PREFIX = "model."  # FlatCacheDecoder.model


def kv_names(num_layers: int, naming: str) -> tuple[list[str], list[str]]:
    """Flat past (input) and present (output) names, key before value, layer by layer."""
    past, present = [], []
    for i in range(num_layers):
        if naming == "seed":
            past += [f"past_key_in{i}", f"past_value_in{i}"]
            present += [f"past_key{i}", f"past_value{i}"]
        else:
            past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            present += [f"present.{i}.key", f"present.{i}.value"]
    return past, present


def kv_dims(kv: KVSpec, layout: str, seq_dim: str) -> list:
    if layout == "bshd":
        return ["batch_size", seq_dim, kv.num_kv_heads, kv.head_dim]
    return ["batch_size", kv.num_kv_heads, seq_dim, kv.head_dim]


def io_spec(kv: KVSpec, vocab_size: int, cfg: ExportConfig) -> dict:
    """The manifest's description of the graph's inputs and outputs."""
    past, present = kv_names(kv.num_layers, cfg.kv_naming)
    inputs = [
        {"name": "input_ids", "dtype": "int64", "dims": ["batch_size", "sequence_length"]},
        {"name": "attention_mask", "dtype": "int64", "dims": ["batch_size", "total_sequence_length"]},
        {"name": "position_ids", "dtype": "int64", "dims": ["batch_size", "sequence_length"]},
    ] + [
        {"name": n, "dtype": cfg.dtype, "dims": kv_dims(kv, cfg.kv_layout, "past_sequence_length")}
        for n in past
    ]
    outputs = [
        {"name": "logits", "dtype": cfg.dtype, "dims": ["batch_size", "sequence_length", vocab_size]}
    ] + [
        {"name": n, "dtype": cfg.dtype, "dims": kv_dims(kv, cfg.kv_layout, "total_sequence_length")}
        for n in present
    ]
    return {"inputs": inputs, "outputs": outputs}


class FlatCacheDecoder(torch.nn.Module):
    """Wraps a causal LM so its cache crosses the graph boundary as flat tensors."""

    def __init__(self, model: torch.nn.Module, num_layers: int, kv_layout: str = "bhsd"):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.bshd = kv_layout == "bshd"

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        pairs = []
        for i in range(self.num_layers):
            k, v = past_key_values[2 * i], past_key_values[2 * i + 1]
            if self.bshd:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            pairs.append((k, v))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=build_dynamic_cache(pairs),
            use_cache=True,
            return_dict=True,
        )
        flat = [out.logits]
        for k, v in cache_pairs(out.past_key_values):
            if self.bshd:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            flat += [k, v]
        return tuple(flat)


def export_decoder(model, kv: KVSpec, cfg: ExportConfig, out_file: Path) -> tuple[dict, set[str] | None]:
    """Export `model` to `out_file` (+ `model.onnx.data` when large).

    Returns the I/O spec and, for the dynamo exporter, the names of the model parameters the
    traced program consumes (None for TorchScript, whose trace does not say)."""
    vocab = text_config(model.config).vocab_size
    spec = io_spec(kv, vocab, cfg)
    wrapper = FlatCacheDecoder(model, kv.num_layers, cfg.kv_layout).eval()
    feeds = decoder_feeds(spec, ShapeCase(EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST), vocab)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    past_names = [i["name"] for i in spec["inputs"][3:]]
    args = (
        tensors["input_ids"],
        tensors["attention_mask"],
        tensors["position_ids"],
        [tensors[n] for n in past_names],
    )
    input_names = [i["name"] for i in spec["inputs"]]
    output_names = [o["name"] for o in spec["outputs"]]
    tmp_file = out_file.with_suffix(".raw.onnx")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cfg.exporter == "dynamo":
                used = _export_dynamo(wrapper, args, spec, input_names, output_names, cfg.opset, tmp_file)
            else:
                _export_torchscript(wrapper, args, spec, input_names, output_names, cfg.opset, tmp_file)
                used = None
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types; name the exporter and the op
        msg = str(e).strip().splitlines()
        first = next((line for line in msg if line.strip()), type(e).__name__)
        raise ExportError(
            f"torch.onnx ({cfg.exporter}) failed: {first[:300]}",
            "run with --debug for the full trace; try --exporter "
            + ("torchscript" if cfg.exporter == "dynamo" else "dynamo"),
        ) from e
    finalize_graph(tmp_file, out_file, spec, cfg.external_data_threshold_bytes)
    return spec, used


def _dims_by_axis(dims: list) -> dict[int, str]:
    return {ax: d for ax, d in enumerate(dims) if isinstance(d, str)}


def _export_dynamo(wrapper, args, spec, input_names, output_names, opset, path: Path) -> set[str]:
    from torch.export import Dim

    # torch.onnx warns about torchvision ops it cannot register; irrelevant for LLMs.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    def dyn(dims):
        return {ax: Dim.DYNAMIC for ax in _dims_by_axis(dims)}

    ins = spec["inputs"]
    dynamic_shapes = (dyn(ins[0]["dims"]), dyn(ins[1]["dims"]), dyn(ins[2]["dims"]), [dyn(i["dims"]) for i in ins[3:]])
    prog = torch.onnx.export(
        wrapper,
        args,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        dynamo=True,
        external_data=True,
        verbose=False,
    )
    prog.save(str(path), external_data=True)
    return used_parameters(prog.exported_program, prefix=WRAPPER_PREFIX)


def used_parameters(ep, prefix: str = "") -> set[str]:
    """Parameters that at least one op of the exported program reads (names without `prefix`)."""
    to_param = ep.graph_signature.inputs_to_parameters
    used = set()
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in to_param and node.users:
            name = to_param[node.name]
            used.add(name[len(prefix):] if name.startswith(prefix) else name)
    return used


def _export_torchscript(wrapper, args, spec, input_names, output_names, opset, path: Path) -> None:
    dynamic_axes = {io["name"]: _dims_by_axis(io["dims"]) for io in spec["inputs"] + spec["outputs"]}
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def finalize_graph(raw: Path, out_file: Path, spec: dict, external_threshold: int) -> None:
    """Give every dynamic dim its field name, drop the exporter's stale shape guesses, and save
    with all weights in one `<name>.data` file when the model is large."""
    import onnx_ir as ir

    model = ir.load(str(raw))
    graph = model.graph
    by_name = {v.name: v for v in list(graph.inputs) + list(graph.outputs)}
    for io in spec["inputs"] + spec["outputs"]:
        v = by_name.get(io["name"])
        if v is None:
            raise ExportError(
                f"exported graph has no {io['name']!r}; it has {sorted(by_name)}",
                "this is an onnxport bug for this model family; please report it",
            )
        old = v.shape
        if old is not None and len(old) != len(io["dims"]):
            raise ExportError(f"{io['name']}: exported rank {len(old)} != expected {len(io['dims'])}")
        v.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in io["dims"]])
    # Intermediate value_info carries exporter symbols (s10, s43 + s53...). They are hints
    # only; clear them so no reader sees leftover names.
    # Initializers traced through FlatCacheDecoder are named `model.<hf name>`; give them back
    # the checkpoint's names.
    for name, init in list(graph.initializers.items()):
        if name.startswith(WRAPPER_PREFIX) and name[len(WRAPPER_PREFIX):] not in graph.initializers:
            graph.initializers.pop(name)
            init.name = name[len(WRAPPER_PREFIX):]
            graph.initializers[init.name] = init
    io_values = set(by_name.values())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for out in node.outputs:
            if out not in io_values and out.shape is not None and any(
                isinstance(d, ir.SymbolicDim) for d in out.shape
            ):
                out.shape = None
    nbytes = sum(
        (t.const_value.nbytes if t.const_value is not None else 0) for t in graph.initializers.values()
    )
    data_name = out_file.name + ".data"
    # Load every external tensor into memory before the raw files are removed.
    for init in graph.initializers.values():
        if init.const_value is not None and isinstance(init.const_value, ir.ExternalTensor):
            init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
    if nbytes > external_threshold:
        ir.save(model, str(out_file), external_data=data_name)
    else:
        ir.save(model, str(out_file))
    for f in (raw, raw.with_name(raw.name + ".data")):
        if f.exists():
            f.unlink()
