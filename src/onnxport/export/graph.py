"""Export one torch module to one ONNX file with a declared I/O contract.

Every graph onnxport writes (a whole decoder, one embedding, a pack of layers, a head) goes
through `export_graph`: inputs and outputs are `spec.TensorSpec`s whose dims are ints (static)
or names (dynamic). After export the dims are renamed to those names,
exporter symbols are cleared, and the structural checks a target asks for are run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from onnxport.errors import ExportError
from onnxport.export.stamp import StampError
from onnxport.spec import TensorSpec

log = logging.getLogger(__name__)

#: ops NPU compilers reject in static graphs
CONTROL_FLOW_OPS = {"If", "Loop", "Scan", "SequenceConstruct", "SequenceAt", "SequenceInsert", "SplitToSequence",
                    "ConcatFromSequence", "SequenceEmpty"}


def dims_by_axis(dims) -> dict[int, str]:
    return {ax: d for ax, d in enumerate(dims) if isinstance(d, str)}


def export_graph(
    module: torch.nn.Module,
    args: tuple,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    out_file: Path,
    exporter: str,
    opset: int,
    external_threshold: int,
    param_prefix: str = "",
    static: bool = False,
    skip_patches: tuple[str, ...] = (),
    bind=None,
    translations: dict | None = None,
    expand=None,
    final_io: tuple[list[TensorSpec], list[TensorSpec]] | None = None,
    keep=None,
    early=None,
    template=None,
) -> tuple[set[str], list[str]]:
    """Export `module(*args)`; return the names of the parameters the exported graph reads and
    the rewrites (patches) that were applied. `bind` (an `export.stream.Binder`, dynamo only)
    gives the initializers of a module traced on the meta device their data. `expand(model)`
    (dynamo only) grows the traced onnx-ir model before it is saved (export/stamp.py) and returns
    the further parameters it reads; the saved graph then has the I/O of `final_io`. `keep(model,
    used)` receives the onnx-ir model as saved and the parameters it reads (export/stamp_blocks.py
    copies it). `early` (bundle.weights.EarlyWeights): the weights written while tracing, which
    the save adopts when they are exactly those the graph reads. `template`
    (export.template.TemplateCache; with `bind` and `expand`): the optimized short trace is
    loaded from it when kept by an earlier export with the same key, else traced and kept."""
    from onnxport import progress
    from onnxport.patches import apply_patches

    progress.update(f"tracing {out_file.name} ({exporter})", 0, None)
    tmp_file = out_file.with_name(out_file.stem + ".raw.onnx")
    input_names = [i.name for i in inputs]
    output_names = [o.name for o in outputs]
    try:
        with torch.no_grad(), warnings.catch_warnings(), apply_patches(module, exporter, skip_patches) as applied:
            if applied:
                log.info("%s: applied rewrites %s", out_file.name, applied)
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                # the onnx-ir model stays in memory (its tensors are the module's own, or lazy
                # checkpoint reads): finalized and written once, weights one at a time
                hit = None
                if template is not None and bind is not None and expand is not None and template.key(
                        module, args, inputs, output_names, opset, param_prefix, translations, applied, bind):
                    hit = template.load(bind)
                if hit is not None:
                    used, model = hit
                else:
                    used, model = _export_dynamo(module, args, inputs, input_names, output_names, opset,
                                                 param_prefix, bind, translations,
                                                 template.store if template is not None and template.digest else None)
                if expand is not None:
                    used = used | expand(model)
            elif bind is not None:
                raise ExportError("--low-memory traces with torch.export (the dynamo exporter)",
                                  "use --exporter dynamo, or drop --low-memory")
            else:
                used = _export_torchscript(module, args, inputs, outputs, input_names, output_names, opset, tmp_file,
                                           param_prefix)
                model = None
    except (ExportError, StampError, OSError):  # OSError: a full or read-only disk is not an exporter problem
        raise
    except Exception as e:  # the exporters raise many types; name the exporter and the op
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        first = lines[0] if lines else type(e).__name__
        raise ExportError(f"torch.onnx ({exporter}) failed on {out_file.name}: {_key_line(lines, first)[:300]}",
                          failure_hint(str(e), exporter)) from e
    if final_io is not None:
        inputs, outputs = final_io
    saved = finalize_graph(model if model is not None else tmp_file, out_file, inputs, outputs, external_threshold,
                           param_prefix, static, early)
    if keep is not None:
        keep(saved, used)
    return used, applied


def _key_line(lines: list[str], first: str) -> str:
    """The line that names the failing op or cause (dynamo's first line is a generic banner)."""
    for line in lines:
        if any(k in line for k in ("Error:", "aten::", "not supported", "Unsupported", "Could not guard",
                                   "data-dependent", "Constraints violated")):
            return line.strip()
    return first


def failure_hint(message: str, exporter: str) -> str:
    """What to do about an exporter failure: the rewrite or input change it calls for."""
    import re

    other = "torchscript" if exporter == "dynamo" else "dynamo"
    op = re.search(r"aten::(\w+)", message)
    if re.search(r"data.dependent|GuardOnDataDependent|\.item\(\)|tolist|Could not guard", message):
        return ("a Python int/bool depends on tensor values (.item(), .tolist(), a branch on a size): compute it "
                "outside the graph and pass it as an input, or add a rewrite in onnxport/patches/")
    if re.search(r"Constraints violated|specializ|not dynamic|Dim\.DYNAMIC", message):
        return "a dim named in --input is fixed by the model: give it a number, or name fewer dims"
    if "complex" in message.lower() or (op and op.group(1) in ("polar", "stft", "istft", "fft_irfft", "fft_rfft", "view_as_real")):
        return ("complex tensors: onnxport rewrites torch.stft/istft/polar/fft.rfft|irfft; another complex op "
                f"needs a rewrite in onnxport/patches/_dft.py (or try --exporter {other})")
    if op:
        return (f"aten::{op.group(1)} has no ONNX export here: add a rewrite file onnxport/patches/"
                f"{op.group(1)}_as_<strategy>.py, or try --exporter {other} / another --opset")
    return f"run with --debug for the full trace; try --exporter {other}"


def exact_no_op_rules() -> int:
    """onnxscript's no-op rules (`x + 0`, `x * 1`, ...) match their constants with
    math.isclose(abs_tol=1e-8, rel_tol=1e-5), so the `+ 1e-8` of an RMSNorm (helium's
    rms_norm_eps) is removed as `+ 0` and a zero row becomes 0 * inf = NaN. Make them exact.
    Returns how many constants were tightened (0 when onnxscript changed its layout)."""
    try:
        from onnxscript.rewriter import _pattern_ir
        from onnxscript.rewriter.rules.common import _no_op
    except ImportError:
        return 0
    n = 0
    for rule in getattr(_no_op.rules, "rules", []):
        for node in getattr(getattr(rule, "_target_pattern", None), "_nodes", []):
            for value in getattr(node, "inputs", []):
                if isinstance(value, _pattern_ir.Constant):
                    value._abs_tol, value._rel_tol = 0.0, 0.0
                    n += 1
    return n


#: onnxscript default rewrite rules skipped during the exporter's optimizer. SlicesSplit (a
#: pair of Slices of one tensor -> Split) changed no node of the decoders measured and took 18 of
#: 60 s of a 30-layer export (SmolLM2-135M shape) matching every node against its pattern.
SKIPPED_REWRITE_RULES = ("SlicesSplit",)


@contextlib.contextmanager
def _cheaper_default_rules():
    try:
        from onnxscript import rewriter
    except ImportError:
        yield
        return
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in SKIPPED_REWRITE_RULES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _export_dynamo(module, args, inputs, input_names, output_names, opset, prefix: str, bind=None,
                   translations: dict | None = None, optimized=None):
    """(parameters the program reads, the onnx-ir model). `optimized(model, used, shapes)`
    (with `bind`) receives the optimized model while its weights are still unbound."""
    from torch.export import Dim

    exact_no_op_rules()
    # torch.onnx warns about torchvision ops it cannot register; irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    flat_shapes = [{ax: Dim.DYNAMIC for ax in dims_by_axis(i.dims)} or None for i in inputs]
    dynamic = any(s for s in flat_shapes)
    nested = _nest_like(args, flat_shapes)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        nested = (nested,)  # torch.export sees forward(*inputs) as one argument
    with _cheaper_default_rules():
        prog = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=nested if dynamic else None,
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
            # a meta-device trace has no data to fold: bind the weights first, then optimize
            optimize=bind is None,
            # onnxport's custom ops (fused attention) -> their ONNX Runtime contrib ops
            custom_translation_table=translations,
        )
        used = used_parameters(prog.exported_program, prefix)
        if bind is not None:
            # the weights are unbound on purpose while the optimizer runs: its deduplication
            # pass would warn once per weight
            logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)
            bind.before_optimize(prog.model)
            prog.optimize()
            if optimized is not None:
                optimized(prog.model, used, bind.shapes)
            bind.after_optimize(prog.model)
    return used, prog.model


def _nest_like(args: tuple, flat: list):
    """Shape `flat` (one entry per tensor) like `args` (tensors and lists of tensors)."""
    it = iter(flat)
    return tuple([next(it) for _ in a] if isinstance(a, (list, tuple)) else next(it) for a in args)


def _export_torchscript(module, args, inputs, outputs, input_names, output_names, opset, path: Path,
                        prefix: str) -> set[str]:
    # No constant folding here: folded weights (transposed, Gemma's `1 + w`) lose their names,
    # and the names are how we prove each parameter is consumed. ONNX Runtime folds at load
    # time; static exports are folded by onnxslim afterwards.
    dynamic_axes = {io.name: dims_by_axis(io.dims) for io in inputs + outputs if dims_by_axis(io.dims)}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes or None,
        opset_version=opset,
        do_constant_folding=False,
        dynamo=False,
    )
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consumed = {name for node in m.graph.node for name in node.input}
    read = {i.name: i for i in m.graph.initializer if i.name in consumed}
    used = {n[len(prefix):] if n.startswith(prefix) else n for n in read}
    # The exporter keeps one initializer per distinct value (torch.onnx's initializer
    # deduplication): the second of two all-ones norms is read under the first one's name.
    # A parameter counts as read when a consumed initializer holds exactly its values.
    by_shape: dict[tuple, list] = {}
    for init in read.values():
        by_shape.setdefault(tuple(init.dims), []).append(init)
    for name, p in module.named_parameters():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short in used or tuple(p.shape) not in by_shape:
            continue
        value = p.detach().float().numpy()
        if any(np.array_equal(onnx.numpy_helper.to_array(i, base_dir=str(path.parent)).astype(np.float32), value)
               for i in by_shape[tuple(p.shape)]):
            used.add(short)
    return used


def used_parameters(ep, prefix: str = "") -> set[str]:
    """Parameters that at least one op of the exported program reads (names without `prefix`)."""
    to_param = ep.graph_signature.inputs_to_parameters
    used = set()
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in to_param and node.users:
            name = to_param[node.name]
            used.add(name[len(prefix):] if name.startswith(prefix) else name)
    return used


def finalize_graph(raw, out_file: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], external_threshold: int,
                   param_prefix: str = "", static: bool = False, early=None):
    """Give every dynamic dim its field name, drop the exporter's stale shape guesses, restore
    checkpoint names of initializers, check static graphs, and save (weights in one
    `<name>.data` file when the graph is large). `raw` is an onnx-ir model or a saved file.
    Returns the onnx-ir model as saved."""
    import onnx_ir as ir

    model = raw if isinstance(raw, ir.Model) else ir.load(str(raw))
    raw = None if isinstance(raw, ir.Model) else raw
    graph = model.graph
    by_name = {v.name: v for v in list(graph.inputs) + list(graph.outputs)}
    for io in inputs + outputs:
        v = by_name.get(io.name)
        if v is None:
            raise ExportError(
                f"{out_file.name}: exported graph has no {io.name!r}; it has {sorted(by_name)}",
                "this is an onnxport bug for this model family; please report it",
            )
        if v.shape is not None and len(v.shape) != len(io.dims):
            raise ExportError(f"{out_file.name}: {io.name} has rank {len(v.shape)}, expected {len(io.dims)}")
        if static and v.shape is not None:
            got = [d if isinstance(d, int) else None for d in v.shape]
            if got != list(io.dims):
                raise ExportError(f"{out_file.name}: {io.name} exported with shape {v.shape}, expected {list(io.dims)}")
        v.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in io.dims])
    if param_prefix:
        # Initializers traced through a wrapper are named `<prefix><hf name>`; restore the
        # checkpoint's names.
        for name, init in list(graph.initializers.items()):
            short = name[len(param_prefix):]
            if name.startswith(param_prefix) and short not in graph.initializers:
                graph.initializers.pop(name)
                init.name = short
                graph.initializers[short] = init
    # Intermediate value_info carries exporter symbols (s10, s43 + s53, unk__0). They are hints
    # only; clear them so no reader sees leftover names.
    io_values = set(by_name.values())
    bad_ops = set()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in CONTROL_FLOW_OPS and node.domain in ("", "ai.onnx"):
            bad_ops.add(node.op_type)
        for out in node.outputs:
            if out not in io_values and out.shape is not None and any(
                not isinstance(d, int) for d in out.shape
            ):
                out.shape = None
    if static and bad_ops:
        raise ExportError(
            f"{out_file.name}: static export contains control-flow/sequence ops {sorted(bad_ops)}",
            "NPU compilers reject these; report the model family so a rewrite can be added",
        )
    from onnxport.bundle.weights import save_model

    save_model(model, out_file, external_threshold, early)
    for f in (raw, raw.with_name(raw.name + ".data")) if raw is not None else ():
        if f.exists():
            f.unlink()
    return model


def slim_static(path: Path) -> None:
    """Fold shape computations with onnxslim. With every input shape fixed, the TorchScript
    exporter still leaves Shape->Gather->Expand chains (e.g. transformers' repeat_kv) that NPU
    compilers and the static check see as dynamic; constant folding removes them."""
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    slimmed = onnxslim.slim(model)
    large = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer) or (
        slimmed.ByteSize() > 1 << 30 if hasattr(slimmed, "ByteSize") else False
    )
    onnx.save(slimmed, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


def check_fully_static(path: Path) -> None:
    """Every tensor dim in the saved graph (inputs, outputs, inferred intermediates) is a number."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best-effort on exotic ops
        pass
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            for d in t.shape.dim:
                if not d.HasField("dim_value"):
                    raise ExportError(
                        f"{path.name}: {vi.name} has a dynamic dim {d.dim_param or '?'} in a --static export",
                        "report the model family; a static export must have no dynamic dims",
                    )
