"""onnxport's command line: parse, call the library, print, exit code. No logic here."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from onnxport.errors import OnnxportError

# rich_markup_mode=None: help text is printed as written ("[batch, seq, heads, head_dim]" stays)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Export Hugging Face models to ONNX that deploys, verify it, generate with ONNX Runtime.")
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
_state = {"debug": False}


def _os_error(e: OSError) -> OnnxportError:
    """A filesystem failure as one line with the cause users can act on."""
    import errno

    from onnxport.errors import BundleError

    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return BundleError(f"the disk is full{where}", "free space or write the bundle elsewhere with -o; nothing was kept")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BundleError(f"cannot write: {e.strerror}{where}", "choose a writable folder for -o")
    return BundleError(f"file system error: {e.strerror or e}{where}", "check the paths and free space")


def _report(e: OnnxportError) -> None:
    console.print(Text.assemble(("error:", "red"), " ", e.message))
    if e.hint:
        console.print(Text.assemble(("hint:", "yellow"), " ", e.hint))


def _guard(fn):
    """One line per error (`error: ...` / `hint: ...`), exit code from the error, no traceback
    unless --debug (which prints it and keeps the error's exit code)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                raise _os_error(e) from e
        except OnnxportError as e:
            if _state["debug"]:
                import traceback

                traceback.print_exc()
            _report(e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("interrupted: nothing was written", style="red")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")):
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)


@contextlib.contextmanager
def _working(label: str):
    """A spinner with `label`, and a bar per long phase the library reports (tracing, writing
    weights, running segments, verifying); all on stderr and gone when done."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from onnxport import progress

    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)
    tasks: dict[str, int] = {}
    main = bars.add_task(label, total=None)

    def on_progress(task: str, done: int, total: int | None) -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        bars.update(tasks[task], completed=done, total=total)
        bars.update(main, description=f"{label} ({task})")

    with bars, progress.listening(on_progress):
        yield


def _print_bundle(manifest, output: Path, verbose_modules: bool = True) -> None:
    """Verification tables of every part, then the one-line summary."""
    from onnxport.report.console import bundle_report

    for item in bundle_report(manifest, output, verbose_modules):
        out.print(item, soft_wrap=True, markup=False) if isinstance(item, str) else out.print(item)


@app.command("export")
@_guard
def export_cmd(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face checkpoint folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle folder to write."),
    opset: int = typer.Option(18, help="ONNX opset (dynamo: 18-23, torchscript: 13-20)."),
    exporter: str = typer.Option("auto", help="dynamo (torch.export), torchscript, or auto (dynamo for opset >= 18)."),
    kv_layout: Optional[str] = typer.Option(None, help="bhsd = [batch, heads, seq, head_dim] (default), bshd = [batch, seq, heads, head_dim] (default for --layout split)."),
    kv_naming: str = typer.Option("optimum", help="optimum: past_key_values.{i}.key -> present.{i}.key; seed: past_key_in{i} -> past_key{i}."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip ONNX Runtime vs PyTorch verification."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights. Only for trusted sources."),
    layout: str = typer.Option("monolithic", help="monolithic (one model.onnx) or split (embedding / block_i / block_cache_i / lm_head)."),
    pack: int = typer.Option(1, help="split: layers per block file (block_0-3.onnx)."),
    static: bool = typer.Option(False, "--static", help="split with fully static shapes (implies --layout split)."),
    max_len: int = typer.Option(512, "--max-len", help="static: KV cache capacity in tokens."),
    prefill_len: int = typer.Option(128, "--prefill-len", help="static: prompt length of the prefill graphs."),
    head: str = typer.Option("logits", help="split: lm_head output: logits, argmax or topk:K."),
    rope: str = typer.Option("inside", help="split: compute rotary cos/sin inside each block, or take them as inputs (outside)."),
    embedding_bin: bool = typer.Option(False, "--embedding-bin", help="split: also write the embedding table as raw embedding.bin (host-side gather)."),
    max_graph_size: Optional[str] = typer.Option(None, "--max-graph-size", "--max-part-size", help="Graphs under SIZE of weights each (e.g. 2GB, 500MiB): a decoder as the split layout with as many layers per block graph as fit; an encoder graph cut into consecutive graphs the runtime chains. (--max-part-size: the old name.)"),
    copy_weights: bool = typer.Option(False, "--copy-weights", help="split: every graph holds its own weights (default: one shared weights.data, each weight stored once)."),
    part: Optional[List[str]] = typer.Option(None, "--part", help="Export only this part (repeat for several; `onnxport recipes` lists the parts of each type)."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Trace the decoder without its weights (meta device) and stream them from the safetensors checkpoint into the graph one tensor at a time."),
    no_stamp: bool = typer.Option(False, "--no-stamp", help="Trace every decoder layer. By default a decoder whose layers are all alike is traced with two and the others are copies of the second, each reading its own weights (verified as always); split layouts trace two block graphs per role and copy the others."),
    no_template_cache: bool = typer.Option(False, "--no-template-cache", help="Trace the decoder's two layers even when an earlier export of the same architecture (same config, code and versions) kept that trace (in $ONNXPORT_TEMPLATES, else $ONNXPORT_CACHE/templates or ~/.cache/onnxport/templates; ONNXPORT_TEMPLATES=off disables it)."),
    optimize: bool = typer.Option(False, "--optimize", help="ONNX Runtime fusions (RMSNorm, skip + norm, rotary, attention where it matches), kept only when the fused graph verifies."),
    bf16_compute: bool = typer.Option(False, "--bf16-compute", help="With --dtype bf16: compute in bf16 too (GPU / TensorRT; verified on a CPU emulation twin, ONNX Runtime's CPU provider has no bf16 kernels)."),
    attention: str = typer.Option("default", help="default (the model's own attention ops) or gqa (one com.microsoft.GroupQueryAttention per layer, cache appended in place: the runtime then uses one cache buffer, no per-step copy)."),
    dtype: str = typer.Option("fp32", help="fp32; fp16 (fp16 compute and KV cache; nodes past fp16's range stay fp32, each candidate verified); bf16 (weights stored in bf16, fp32 compute)."),
    target: Optional[str] = typer.Option(None, "--target", help="cpu, cuda, tensorrt, openvino or npu: the options that target needs (printed and recorded; an option you pass yourself wins). onnxport check BUNDLE --target T lists what the target would reject."),
):
    """Export a model with a recipe and verify it: a decoder LM with a flat KV cache (or the split
    NPU layout), or an encoder's parts (vision tower, audio encoder, codec decoder)."""
    from onnxport.api import export
    from onnxport.config import ExportConfig, SplitConfig, parse_size
    from onnxport.errors import InputError

    chosen = {"attention": attention, "optimize": optimize, "dtype": dtype, "static": static, "layout": layout,
              "opset": opset, "head": head, "rope": rope}
    applied = {}
    if target:
        from onnxport.targets import apply_preset

        applied = apply_preset(target, chosen, _defaults(export_cmd))
        flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in applied.items())
        console.print(f"target {target}: {flags or 'the defaults'}", markup=False)
    attention, optimize, dtype, static, layout = (chosen[k] for k in ("attention", "optimize", "dtype", "static", "layout"))
    opset, head, rope = chosen["opset"], chosen["head"], chosen["rope"]

    if layout not in ("monolithic", "split"):
        raise InputError(f"unknown layout {layout!r}", "use --layout monolithic or --layout split")
    # --max-graph-size alone: decoders are cut by the split layout, encoder graphs into chains
    is_split = layout == "split" or static
    split_only = {"--pack": pack != 1, "--head": head != "logits", "--rope": rope != "inside",
                  "--embedding-bin": embedding_bin, "--copy-weights": copy_weights}
    given = [flag for flag, set_ in split_only.items() if set_]
    if given and not is_split:
        raise InputError(f"{given[0]} applies to the split layout only", f"add --layout split (or --static), or drop {given[0]}")
    cfg = ExportConfig(opset=opset, exporter=exporter, kv_layout=kv_layout or ("bshd" if is_split or max_graph_size else "bhsd"),
                       kv_naming=kv_naming, verify=not no_verify, force=force, allow_pickle=allow_pickle,
                       low_memory=low_memory, stamp=not no_stamp, template_cache=not no_template_cache, dtype=dtype, optimize=optimize, attention=attention,
                       bf16_compute=bf16_compute, max_graph_bytes=parse_size(max_graph_size) if max_graph_size else None,
                       target={"name": target, "flags": applied} if target else None)
    split = SplitConfig(pack=pack, static=static, max_len=max_len, prefill_len=prefill_len, head=head, rope=rope,
                        embedding_bin=embedding_bin, share_weights=not copy_weights,
                        max_graph_bytes=parse_size(max_graph_size) if max_graph_size else None) if is_split else None
    with _working(f"exporting {model_dir} with torch.onnx ({cfg.exporter})"):
        manifest = export(model_dir, output, cfg, split=split, parts=tuple(part) if part else None)
    _print_bundle(manifest, output)


def _defaults(command) -> dict:
    """A command's option defaults by parameter name."""
    import inspect

    return {k: p.default.default for k, p in inspect.signature(command).parameters.items()
            if hasattr(p.default, "default")}


@app.command("export-module")
@_guard
def export_module_cmd(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face checkpoint folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle folder to write."),
    module: str = typer.Option(..., "--module", "-m", help="Dotted path of the submodule, e.g. model.visual, vpm, resampler ('.' = the whole model)."),
    inputs: List[str] = typer.Option(..., "--input", "-i", help="NAME:DTYPE[DIMS], e.g. pixel_values:float32[batch,3,height=224,width=224]; named dims are dynamic; int inputs may end with =LO..HI."),
    outputs: Optional[List[str]] = typer.Option(None, "--output-name", help="Keep only these outputs (default: all tensors the module returns)."),
    method: str = typer.Option("forward", help="Method to export (e.g. get_image_features)."),
    verify_dims: Optional[List[str]] = typer.Option(None, "--verify-dims", help="NAME=SIZE for the second verification size (default: named dims doubled, batch + 1)."),
    opset: int = typer.Option(18, help="ONNX opset."),
    exporter: str = typer.Option("auto", help="auto (dynamo, TorchScript if dynamo fails), dynamo or torchscript."),
    no_rewrite: Optional[List[str]] = typer.Option(None, "--no-rewrite", help="Do not apply this rewrite (see onnxport patches)."),
    model_class: Optional[str] = typer.Option(None, "--model-class", help="transformers class to load with (default: the checkpoint's architecture)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the checkpoint's own Python code. Only for trusted sources."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights. Only for trusted sources."),
):
    """Export any submodule by dotted path with an input spec, applying the rewrites, and verify it."""
    from onnxport.api import export_module
    from onnxport.config import ExportConfig
    from onnxport.errors import InputError
    from onnxport.patches import all_patches

    unknown = [n for n in no_rewrite or [] if n not in all_patches()]
    if unknown:
        raise InputError(f"--no-rewrite {unknown[0]!r} is not a rewrite", f"rewrites: {', '.join(all_patches())}")
    cfg = ExportConfig(opset=opset, exporter=exporter, force=force, allow_pickle=allow_pickle,
                       skip_patches=tuple(no_rewrite or ()))
    with _working(f"exporting {module} of {model_dir}"):
        manifest = export_module(model_dir, output, module, inputs, cfg, outputs=outputs, method=method,
                                 verify_dims=verify_dims, model_class=model_class, trust_remote_code=trust_remote_code)
    _print_bundle(manifest, output)


@app.command("optimize")
@_guard
def optimize_cmd(
    bundle: Path = typer.Argument(..., help="Float32 decoder bundle written by `onnxport export`."),
    output: Path = typer.Option(..., "-o", "--output", help="Optimized bundle folder to write."),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to verify against (default: the export's source)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Apply the passes without checking them against PyTorch."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights. Only for trusted sources."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Graph passes for ONNX Runtime (what export --optimize runs), each verified against PyTorch and rolled back if it breaks parity."""
    from onnxport.api import optimize
    from onnxport.report.console import optimize_line

    with _working(f"optimizing {bundle}"):
        manifest = optimize(bundle, output, model, check=not no_verify, force=force, allow_pickle=allow_pickle)
    out.print(optimize_line(manifest, output), soft_wrap=True, markup=False)


@app.command("quantize")
@_guard
def quantize_cmd(
    bundle: Path = typer.Argument(..., help="Monolithic fp32 decoder bundle written by `onnxport export`."),
    output: Path = typer.Option(..., "-o", "--output", help="Quantized bundle folder to write."),
    bits: int = typer.Option(4, help="4 or 8 (weight-only MatMulNBits)."),
    block_size: int = typer.Option(32, "--block-size", help="Input channels per quantization block (16-256)."),
    method: str = typer.Option("rtn", help="rtn (round to nearest per block), awq (activation-aware channel scales searched on the calibration text, then RTN) or gptq (rounding errors compensated through the calibration activations' inverse Hessian; int4)."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="Per-block zero points (default: symmetric)."),
    accuracy_level: int = typer.Option(0, "--accuracy-level", help="MatMulNBits accuracy_level: 0 unset (fp32 compute), 4 = int8 compute (faster on CPU)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration / held-out text (default: Python's documentation as CPython ships it calibrates, text shipped with onnxport is held out)."),
    max_ppl_increase: float = typer.Option(0.10, "--max-ppl-increase", help="Gate: held-out perplexity at most (1 + this) x the source bundle's."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", "--target-agreement", help="Gate: fraction of greedy tokens equal to the source bundle's."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Layers whose relative output error on the calibration text exceeds this start at int8."),
    quantize_embedding: bool = typer.Option(False, "--quantize-embedding", help="Also quantize the token embedding table (GatherBlockQuantized)."),
    head_bits: Optional[int] = typer.Option(None, "--head-bits", help="int4: the output head (lm_head, tied or not) at these bits instead (8: as llama.cpp's Q4_K_M keeps its output layer wider)."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens (AWQ, GPTQ, per-layer errors): of Python's documentation by default, or the first of --calib's text (the gate holds out the 1024 after them)."),
    no_escalate: bool = typer.Option(False, "--no-escalate", help="int4: fail instead of moving the most sensitive layers to int8."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="int4: write the result even when the gate moved every layer to int8."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Weight-only int4/int8 quantization with a quality gate (perplexity, greedy agreement)."""
    from onnxport.api import quantize
    from onnxport.config import QuantConfig
    from onnxport.report.console import quantize_lines

    cfg = QuantConfig(bits=bits, block_size=block_size, method=method, symmetric=not asymmetric,
                      accuracy_level=accuracy_level, calib=str(calib) if calib else None,
                      max_ppl_increase=max_ppl_increase, min_agreement=min_agreement, max_error=max_error,
                      escalate=not no_escalate, embedding=quantize_embedding, allow_fallback=allow_fallback,
                      head_bits=head_bits, calib_tokens=calib_tokens, force=force)
    with _working(f"quantizing {bundle} to int{bits}"):
        manifest = quantize(bundle, output, cfg)
    for line in quantize_lines(manifest, output):
        out.print(line, soft_wrap=True, markup=False)


@app.command("verify")
@_guard
def verify_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `onnxport export`."),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to compare with (default: the export's source)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights. Only for trusted sources."),
):
    """Compare ONNX Runtime with PyTorch for every part; exit 4 on any mismatch."""
    from onnxport.api import verify

    with _working(f"verifying {bundle}"):
        manifest = verify(bundle, model, allow_pickle=allow_pickle)
    _print_bundle(manifest, bundle, verbose_modules=False)


@app.command("check")
@_guard
def check_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    target: str = typer.Option(..., "--target", help="cpu, cuda, tensorrt, openvino or npu."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON."),
):
    """What a target will reject before anyone compiles: ops outside its support, dynamic dims
    for static compilers, control flow, data-dependent shapes, dtypes, opset; each with the node
    and the PyTorch module it came from. Runs the real toolchain where it installs (ONNX Runtime,
    OpenVINO: compiled, run and compared) and a versioned table where not. Exit 4 on an error."""
    import json as _json

    from onnxport.targets import Finding, check_bundle

    with _working(f"checking {bundle} for {target}"):
        record = check_bundle(bundle, target)
    if as_json:
        out.print(_json.dumps(record, indent=1), markup=False)
    else:
        for f in record["findings"]:
            out.print(Finding(**f).line(), markup=False)
        out.print(f"{target}: {record['errors']} error(s), {record['warnings']} warning(s); checked with "
                  + "; ".join(record["checked_with"]), markup=False)
    if not record["ok"]:
        raise typer.Exit(4)


@app.command("inspect")
@_guard
def inspect_cmd(bundle: Path = typer.Argument(..., help="Bundle folder.")):
    """What a bundle holds, in the console: the facts of its report.html (parts, graphs, I/O with
    named dims, op histogram, sizes, verification per shape, precision / quantization records)."""
    from onnxport.bundle import read_manifest
    from onnxport.report.console import inspect_lines

    for line in inspect_lines(bundle, read_manifest(bundle)):
        out.print(line, markup=False)


@app.command("calib")
@_guard
def calib_cmd(
    bundle: Path = typer.Argument(..., help="A split (NPU) bundle, e.g. exported with --target npu."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the calibration set to."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (default: a few paragraphs of Python's documentation shipped with onnxport)."),
    chat: bool = typer.Option(False, "--chat", help="Render each prompt with the bundle's chat template."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", "-n", help="Tokens generated per prompt (the decode graphs' samples)."),
    force: bool = typer.Option(False, "--force", help="Replace a calibration set onnxport wrote before."),
):
    """Real input tensors for every graph of a split bundle, recorded while it generates from the
    prompts, in the layouts NPU quantizers read (npz for TPU-MLIR, npy per input for pulsar2,
    dataset.txt for RKNN, raw + input_list.txt for QNN), with the outputs they gave."""
    from onnxport.targets.calib import write_calibration

    lines = None
    if prompts is not None:
        try:
            lines = [line for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, OSError) as e:
            from onnxport.errors import InputError

            raise InputError(f"cannot read --prompts {prompts}: {e}", "give a UTF-8 text file, one prompt per line") from None
    if max_new_tokens < 1:
        from onnxport.errors import InputError

        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}", "pass -n 1 or more")
    with _working(f"recording calibration inputs from {bundle}"):
        summary = write_calibration(bundle, output, lines, chat, max_new_tokens, force=force)
    counts = ", ".join(f"{Path(f).stem} {g['samples']}" for f, g in summary["graphs"].items())
    out.print(f"wrote {output}/: samples per graph: {counts}", markup=False)


@app.command("bisect")
@_guard
def bisect_cmd(
    bundle: Path = typer.Argument(..., help="A monolithic decoder bundle."),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to compare with (default: the export's source)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Compare with this bundle of the same model instead (e.g. the fp32 export of an fp16 bundle), node by node."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights. Only for trusted sources."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write the per-module (or per-node) error table and plot to this HTML file."),
):
    """Find where a bundle first parts from PyTorch (module by module, through forward hooks and
    the exporter's node metadata) or from another bundle (node by node); exit 4 when it does."""
    from onnxport.api import bisect
    from onnxport.report.console import bisect_report

    with _working(f"bisecting {bundle}"):
        record = bisect(bundle, model, against, allow_pickle)
    lines = bisect_report(record)
    for line in lines:
        out.print(line, markup=False)
    if html_out is not None:
        from onnxport.bundle.report import bars_svg

        rows = record["rows"]
        svg = bars_svg([f"{r.get('module') or '-'} {r['op']}" for r in rows], [r["error"] for r in rows],
                       record["tolerance"], "relative error per " + ("module" if record["mode"] == "pytorch" else "node"))
        import html as _html

        html_out.write_text("<!doctype html><html><head><meta charset='utf-8'><title>onnxport bisect</title></head>"
                            f"<body><h1>onnxport bisect {_html.escape(str(bundle))}</h1><pre>"
                            + _html.escape("\n".join(lines)) + f"</pre>{svg}</body></html>", encoding="utf-8")
    if record["culprit"] is not None:
        raise typer.Exit(4)


def _trust(trust: bool) -> None:
    """--trust-bundle: no sha256 of the bundle's files at load for this process."""
    if trust:
        from onnxport.bundle.seal import trust_bundles

        trust_bundles()


def _write_text(text: str) -> None:
    """Streamed text, verbatim, as it arrives."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_reply(reply) -> None:
    """A task's reply: its lines on stdout (after what it streamed), its summary on stderr."""
    if reply.streamed:
        sys.stdout.write("\n")
    for line in reply.lines:
        sys.stdout.write(f"{line}\n")
    if reply.summary:
        console.print(reply.summary, soft_wrap=True, markup=False)


@app.command("generate")
@_guard
def generate_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text; repeat for a batch."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Default: 32; with --audio the model's own limit."),
    do_sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy."),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Stream tokens (single prompt)."),
    chat: bool = typer.Option(False, "--chat", help="Each -p is the user turn of its own conversation, rendered with the bundle's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message before each conversation (implies --chat)."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="JSON file: a conversation as a list of {role, content} messages, or a list of those (implies --chat; instead of -p)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Image file for an image-text or any-to-text bundle (repeat for several, in placeholder order); with --chat each -p gets the images before its text."),
    audio: Optional[List[Path]] = typer.Option(None, "--audio", help="WAV file (16 kHz mono) to transcribe with the bundle's speech-to-text pipeline (greedy; repeat for a batch), or, for an any-to-text bundle (Qwen2.5-Omni), to go with each -p in placeholder order (repeat for several)."),
    speak: Optional[Path] = typer.Option(None, "--speak", help="Any-to-any bundles (Qwen2.5-Omni with speech output): also speak the reply into this WAV file (one prompt; greedy talker, 24 kHz)."),
    language: Optional[str] = typer.Option(None, "--language", help="Speech-to-text: the spoken language (en, english or <|en|>); default: the model's own, else detected as transformers does."),
    task: Optional[str] = typer.Option(None, "--task", help="Speech-to-text: transcribe or translate (default: the model's own)."),
    trust_bundle: bool = typer.Option(False, "--trust-bundle", help="Skip the sha256 check of the bundle's files at load (sizes are still compared): for a large bundle you load often from a trusted place."),
    speculative: int = typer.Option(0, "--speculative", help="Prompt-lookup speculative decoding: draft up to K tokens from earlier text and verify them in one forward (greedy, same tokens as without; text generation on the default graph)."),
    draft: Optional[Path] = typer.Option(None, "--draft", help="Speculative decoding with a draft bundle (a smaller model with the same tokenizer, or this one quantized; default graph): its greedy tokens are the drafts, up to --speculative (default 4) per forward; same tokens as without."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime, or openvino (its CPU plugin at f32 precision; pip install openvino): the same generation loop on another engine."),
):
    """Generate with ONNX Runtime (no torch). The bundle's manifest decides the task: text
    generation, image/audio + text -> text, speech -> text (--audio), text -> text and speech
    (--speak); the flags are that task's inputs."""
    from onnxport.runtime.session import using_runtime
    from onnxport.runtime.tasks import open_task
    from onnxport.runtime.tasks.request import Request, Sampling, read_messages

    _trust(trust_bundle)
    request = Request(prompts=tuple(prompt or ()), messages=read_messages(messages) if messages is not None else None,
                      chat=chat, system=system, images=tuple(image or ()), audio=tuple(audio or ()), speak=speak,
                      overwrite=True, language=language, task=task, stream=stream,
                      sampling=Sampling(max_new_tokens, do_sample, temperature, top_k, top_p, seed, speculative,
                                        str(draft) if draft is not None else None))
    with using_runtime(runtime):
        runner = open_task(bundle)
        if speak is not None:
            with _working(f"speaking with {bundle}"):
                reply = runner.run(request)
        else:
            reply = runner.run(request, on_text=_write_text)
    _print_reply(reply)


@app.command("speak")
@_guard
def speak_cmd(
    bundle: Path = typer.Argument(..., help="Bundle with a text-to-speech pipeline (e.g. an exported chattts checkpoint), or an any-to-any one (Qwen2.5-Omni: it speaks its reply to the text)."),
    text: str = typer.Option(..., "--text", "-t", help="Text to speak (any-to-any: the user turn the model replies to)."),
    output: Path = typer.Option(..., "-o", "--output", help="WAV file to write (mono, 16-bit PCM)."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="Most audio-code frames (default: the model's max_new_token, within its positions)."),
    seed: Optional[int] = typer.Option(None, help="Sample the codes with this seed (the model's temperature / top-k / top-p); default: greedy."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Any-to-any bundles: most reply tokens (default 32)."),
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Any-to-any bundles: the voice (default: the bundle's, e.g. Chelsie)."),
    trust_bundle: bool = typer.Option(False, "--trust-bundle", help="Skip the sha256 check of the bundle's files at load."),
):
    """Speak text with ONNX Runtime (no torch): talker -> audio codes -> DVAE -> vocoder -> WAV;
    an any-to-any bundle replies to the text and speaks the reply (thinker -> talker -> token2wav)."""
    from onnxport.runtime.tasks import open_task
    from onnxport.runtime.tasks.request import Request, Sampling

    _trust(trust_bundle)
    request = Request(text=text, speak=output, overwrite=force, max_frames=max_frames, speaker=speaker,
                      sampling=Sampling(max_new_tokens=max_new_tokens, seed=seed))
    runner = open_task(bundle)
    with _working(f"speaking with {bundle}"):
        reply = runner.run(request)
    _print_reply(reply)


@app.command("seal")
@_guard
def seal_cmd(bundle: Path = typer.Argument(..., help="Bundle folder you edited on purpose.")):
    """Record the size and sha256 of every file of a bundle as it is now (after an edit made on
    purpose, e.g. a chat template added); every command checks them when it loads the bundle."""
    from onnxport.bundle.seal import reseal

    manifest = reseal(bundle)
    count = len(manifest.files or {}) + len({f for g in manifest.graphs for f in g.files or {}})
    out.print(f"sealed {bundle}/: {count} files recorded", soft_wrap=True, markup=False)


@app.command("triton")
@_guard
def triton_cmd(
    bundle: Path = typer.Argument(..., help="A text-generation bundle."),
    output: Path = typer.Option(..., "-o", "--output", help="Model repository folder to write."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the model type); the streaming model is NAME_stream."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Requests Triton may batch into one generation loop (0: no batching)."),
    instances: int = typer.Option(1, "--instances", help="Model instances (processes) per model."),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime threads per instance (0: its default)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="New tokens when a request sends no MAX_TOKENS."),
    backend: str = typer.Option("python", "--backend", help="python (onnxport's runtime in Triton's Python backend; runs with the server nvidia-pytriton ships) or onnxruntime (each graph file on Triton's onnxruntime backend, for NVIDIA's containers)."),
    force: bool = typer.Option(False, "--force", help="Replace a repository onnxport wrote before."),
):
    """Write a Triton Inference Server model repository for a bundle. A text-generation bundle:
    NAME (text in, text and token ids out, dynamic batching) and NAME_stream (decoupled: one
    response per new piece of text); other bundles: one model per graph. --backend python runs
    onnxport's torch-free runtime inside Triton."""
    from onnxport.serve.triton import write_repository

    record = write_repository(bundle, output, name=name, max_batch_size=max_batch_size, instances=instances,
                              threads=threads, max_tokens=max_tokens, backend=backend, force=force)
    where = f" (bundle in {record['bundle_path']})" if record["bundle_path"] else ""
    typer.echo(f"wrote {output}/: models {', '.join(record['models'])}{where}")


@app.command("serve")
@_guard
def serve_cmd(
    bundle: Path = typer.Argument(..., help="A text-generation bundle."),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Requests batched into one generation loop (0: none)."),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime threads per instance (0: its default)."),
):
    """Serve a bundle with Triton Inference Server on localhost (the server nvidia-pytriton
    ships) until Ctrl-C: HTTP and gRPC, text in / text out, and token streaming."""
    import signal
    import tempfile

    from onnxport.serve.triton import start_server, write_repository

    def terminate(*_):  # SIGTERM as Ctrl-C, from the start: no server is ever left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    with tempfile.TemporaryDirectory(prefix="onnxport-serve-") as work:
        record = write_repository(bundle, Path(work) / "repository", max_batch_size=max_batch_size, threads=threads)
        with _working("starting Triton"):
            server = start_server(Path(work) / "repository", work, http_port, grpc_port)
        try:
            model = next(iter(record["models"]))
            typer.echo(f"serving {bundle} at http://{server.http_url} and grpc {server.grpc_url} (Ctrl-C stops): "
                       f"models {', '.join(record['models'])}")
            if record["models"][model]["kind"] == "text-generation":
                typer.echo(f"  curl -s http://{server.http_url}/v2/models/{model}/generate "
                           f"-d '{{\"TEXT_INPUT\": \"Hello\", \"MAX_TOKENS\": 16}}'")
            server.wait_for_signal()
        finally:
            code = server.stop()  # also on Ctrl-C or an error: no server left running
        typer.echo(f"stopped (server exit code {code})")


@app.command("recipes")
@_guard
def recipes_cmd(all_types: bool = typer.Option(False, "--all", help="Also list every causal-LM type the generic decoder covers.")):
    """List model types and the parts onnxport exports for each (one checkpoint, several parts)."""
    from onnxport.recipes import causal_lm_types, parts_for, registered

    family = sorted({mt for mt, _ in registered()})
    for mt in family:
        parts = ", ".join(f"{p} ({cls.__name__})" for p, cls in parts_for(mt).items())
        out.print(f"{mt:28s} {parts}", soft_wrap=True, markup=False)
    lms = [t for t in causal_lm_types() if t not in family]
    out.print(f"decoder (GenericDecoder): {len(lms)} more transformers causal-LM types"
              + ("" if all_types else " (--all lists them)"), markup=False)
    if all_types:
        out.print(" ".join(lms), soft_wrap=True, markup=False)


@app.command("patches")
@_guard
def patches_cmd():
    """List the export-compat rewrites and the exporters they are applied for."""
    from onnxport.patches import all_patches

    for name, cls in all_patches().items():
        out.print(f"{name:26s} ({', '.join(cls.exporters)}) {cls.description}", soft_wrap=True)


@app.command("demo")
@_guard
def demo_cmd(
    prompt: str = typer.Option("The assert statement", "--prompt", "-p"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Keep the bundle here (default: a temp folder)."),
):
    """Export, verify and run the embedded demo model (a tiny Llama trained on Python's docs)."""
    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.runtime.tasks import open_task
    from onnxport.runtime.tasks.request import Request, Sampling

    src = Path(__file__).parent / "demo_model"
    with tempfile.TemporaryDirectory() as tmp:
        target = output or Path(tmp) / "demo_bundle"
        t0 = time.perf_counter()
        with _working("exporting the demo model"):
            manifest = export(src, target, ExportConfig(force=output is not None))
        t_export = time.perf_counter() - t0
        _print_bundle(manifest, target)
        reply = open_task(target).run(Request(prompts=(prompt,), sampling=Sampling(max_new_tokens)), on_text=_write_text)
        sys.stdout.write("\n")
        out.print(f"export+verify {t_export:.1f}s, {reply.summary}" + (f", bundle at {target}" if output else ""))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # during start-up imports, before a command's guard runs
        sys.stderr.write("interrupted\n")
        _exit_interrupted()
    except SystemExit as e:
        if e.code == 130:
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    """Exit 130 even when the interrupt landed in code run through PyRun_String (pybind11's
    py::exec inside torch): CPython then remembers an 'unhandled' KeyboardInterrupt and, after a
    normal sys.exit(130), kills itself with SIGINT (exit -2). Our guard has already cleaned up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    main()
