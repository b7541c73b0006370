"""Breadth benchmark: does every transformers causal-LM type export, verify and generate the same
greedy tokens as transformers?

For each model_type in transformers' causal-LM mapping: a tiny random checkpoint from the type's
own default config, shrunk generically (hidden 64, 2 layers, 4/2 heads, vocab 1024, nested
sub-configs too) -> `onnxport.api.export` (verified on 3 shapes) -> greedy tokens from
onnxport's Generator vs transformers' `generate` on a left-padded batch of two prompts.
Each type runs in its own subprocess with a timeout and a memory cap, so a crash, a hang or a
memory blow-up is a recorded result, not the end of the run. Prints JSON counts at the end.

    python bench/breadth.py                              # every type -> bench/breadth_results.json
    python bench/breadth.py --types llama,gpt2 --no-verify
    python bench/breadth.py --layers 4 --out /tmp/breadth4.json   # stamped exports (export/stamp.py)
    python bench/breadth.py --no-run --readme --table SUPPORTED.md   # table from saved results

Results merge into --out by type, so re-running a few types after a fix updates the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "src" / "onnxport" / "demo_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 600, 23]]
MAX_NEW_TOKENS = 16

from onnxport.testing.tiny import hf_greedy, tiny_causal_lm  # noqa: E402 - shared with the tests


def make_checkpoint(model_type: str, out: Path):
    """Build (norms randomized, as the tests do), save with the demo tokenizer."""
    model = tiny_causal_lm(model_type)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / f, out / f)
    return model


def first_line(e: BaseException) -> str:
    """'Type: first line' (with the next line when the first only announces it, as
    huggingface_hub's validation errors do)."""
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    lines = [s.strip() for s in re.sub(r"\x1b\[[0-9;]*m", "", msg).splitlines() if s.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:
        line += " " + lines[1]
    return f"{type(e).__name__}: {line}"[:400]


def root_cause(e: BaseException) -> str | None:
    """First line of the innermost chained exception (torch.onnx wraps the real one twice)."""
    inner = e
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    if inner is e:
        return None
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(inner))
    keys = ("Error:", "aten::", "not supported", "Unsupported", "Could not guard", "data-dependent",
            "Constraints violated")
    lines = [s.strip() for s in msg.splitlines() if s.strip()]
    line = next((s for s in lines if any(k in s for k in keys)), lines[0] if lines else "")
    return f"{type(inner).__name__}: {line}"[:400]


def where(e: BaseException) -> str:
    """Innermost frame inside transformers/onnxport of the innermost chained exception, for
    grouping failures."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        if "/transformers/" in f.filename or "/onnxport/" in f.filename:
            return f"{f.filename.split('site-packages/')[-1].split('src/')[-1]}:{f.lineno} {f.name}"
    return f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else ""


def run_one(model_type: str, work: Path, verify: bool, progress: Path, stamp: bool = True) -> dict:
    """One type, start to end, in this process; every failure is caught and recorded."""
    import logging

    import numpy as np

    logging.disable(logging.WARNING)
    rec: dict = {"type": model_type, "verified": verify}
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        rec["stage"] = name
        progress.write_text(name)

    def fail(status: str, e: BaseException) -> dict:
        rec.update(status=status, reason=first_line(e), cause=root_cause(e), where=where(e),
                   seconds=round(time.perf_counter() - t0, 1))
        if os.environ.get("BREADTH_DEBUG"):
            traceback.print_exception(e)
        return rec

    stage("build")
    ckpt = work / "ckpt"
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        model = make_checkpoint(model_type, ckpt)
        rec["class"] = type(model).__name__
        rec["params"] = sum(p.numel() for p in model.parameters())
        del model
    except Exception as e:  # noqa: BLE001 - any failure to build is a result
        return fail("build_failed", e)
    # a tiny config that transformers itself cannot generate with is not a built model
    stage("reference")
    try:
        ref = hf_greedy(ckpt, PROMPTS, MAX_NEW_TOKENS)
    except Exception as e:  # noqa: BLE001
        return fail("build_failed", e)

    stage("export")
    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.errors import OnnxportError, UnsupportedModelError, VerificationError

    bundle = work / "bundle"
    try:
        # exporter="auto" as the CLI's default: dynamo, TorchScript when torch.export fails
        manifest = export(ckpt, bundle, ExportConfig(exporter="auto", verify=verify, stamp=stamp))
    except VerificationError as e:
        return fail("verify_failed", e)
    except UnsupportedModelError as e:
        return fail("unsupported", e)
    except (OnnxportError, Exception) as e:  # noqa: BLE001
        return fail("export_failed", e)
    rec["export_seconds"] = manifest.export.seconds
    rec["exporter"] = manifest.graphs[0].exporter
    rec["patches"] = manifest.graphs[0].patches
    rec["stamped"] = manifest.graphs[0].stamped
    if verify:
        rec["verify_max_abs_diff"] = max(r["max_abs_diff"] for c in manifest.verification["cases"]
                                         for r in c["outputs"].values())

    if manifest.kv_cache is not None and manifest.kv_cache.step_only:
        # recurrent state: onnxport runs each prompt alone; so must the reference
        stage("reference")
        ref = hf_greedy(ckpt, PROMPTS, MAX_NEW_TOKENS, per_row=True)
        rec["reference"] = "per prompt"
    stage("generate")
    try:
        from onnxport.runtime import Generator

        ours = Generator(bundle).generate_ids(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None).padded
    except Exception as e:  # noqa: BLE001
        return fail("generate_failed", e)
    equal = int((ours == ref).sum()) if ours.shape == ref.shape else 0
    rec["equal_tokens"], rec["total_tokens"] = equal, int(ref.size)
    if ours.shape == ref.shape and equal == ref.size:
        rec["status"] = "exact"
    else:
        rec["status"] = "mismatch"
        rec["reason"] = f"{equal}/{ref.size} tokens equal; first differences per row: " + ", ".join(
            str(int(np.argmax(a != b))) if (a != b).any() else "-" for a, b in zip(ours, ref))
        rec["ours"], rec["ref"] = ours.tolist(), ref.tolist()
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# --- the parent: one subprocess per type ------------------------------------------------------

def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_isolated(model_type: str, args) -> dict:
    """`run_one` in a child process group; timeout, memory cap and crashes become results."""
    with tempfile.TemporaryDirectory(prefix=f"breadth-{model_type}-") as tmp:
        tmp = Path(tmp)
        result, progress = tmp / "result.json", tmp / "stage"
        cmd = [sys.executable, __file__, "--one", model_type, "--workdir", str(tmp)]
        if not args.verify:
            cmd.append("--no-verify")
        if not args.stamp:
            cmd.append("--no-stamp")
        cmd += ["--layers", str(args.layers)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        with open(tmp / "log.txt", "w") as log:
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            killed = None
            while child.poll() is None:
                if time.perf_counter() - t0 > args.timeout:
                    killed = "timeout"
                elif _rss_bytes(child.pid) > args.max_rss_gb * (1 << 30):
                    killed = "memory"
                if killed:
                    os.killpg(child.pid, signal.SIGKILL)  # our own child's group only
                    child.wait()
                    break
                time.sleep(0.5)
        seconds = round(time.perf_counter() - t0, 1)
        stage = progress.read_text() if progress.exists() else "start"
        if killed:
            limit = f"{args.timeout}s" if killed == "timeout" else f"{args.max_rss_gb} GiB RSS"
            return {"type": model_type, "status": killed, "stage": stage, "reason": f"killed in {stage}: over {limit}",
                    "seconds": seconds}
        if result.exists():
            return json.loads(result.read_text())
        tail = [s for s in (tmp / "log.txt").read_text(errors="replace").splitlines() if s.strip()][-3:]
        return {"type": model_type, "status": "crashed", "stage": stage,
                "reason": f"exit code {child.returncode} in {stage}: {' | '.join(tail)[-300:]}", "seconds": seconds}


FAILED = ("build_failed", "export_failed", "unsupported", "verify_failed", "generate_failed", "reference_failed",
          "timeout", "memory", "crashed")


def summary(results: dict) -> dict:
    statuses = [r["status"] for r in results.values()]
    # built: transformers builds the tiny model and generates with it (bench reference)
    built = [r for r in results.values() if r["status"] != "build_failed" and r.get("stage") not in ("build", "reference")]
    exported = [r for r in results.values() if r["status"] in ("exact", "mismatch", "generate_failed",
                                                                "reference_failed")]
    return {
        "types": len(results),
        "built": len(built),
        "exported": len(exported),
        "token_exact": statuses.count("exact"),
        "token_exact_share_of_built": round(statuses.count("exact") / max(len(built), 1), 3),
        "token_mismatch": statuses.count("mismatch"),
        "failed": {s: statuses.count(s) for s in FAILED if s in statuses},
    }


def markdown_table(results: dict) -> str:
    rows = ["| model_type | status | reason |", "|---|---|---|"]
    for t in sorted(results):
        r = results[t]
        reason = (r.get("reason") or "").replace("|", "\\|")
        rows.append(f"| {t} | {r['status']} | {reason} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", help="comma-separated model_types (default: every causal-LM type)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "breadth_results.json"))
    p.add_argument("--timeout", type=int, default=300, help="seconds per type")
    p.add_argument("--max-rss-gb", type=float, default=12.0, help="memory cap per type")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="ExportConfig(verify=False)")
    p.add_argument("--layers", type=int, default=2,
                   help="decoder layers of each tiny model (4+: stamped exports, export/stamp.py, are exercised)")
    p.add_argument("--no-stamp", dest="stamp", action="store_false", help="ExportConfig(stamp=False)")
    p.add_argument("--no-run", action="store_true", help="only read --out (for --readme)")
    p.add_argument("--readme", action="store_true", help="print the 'Supported architectures' markdown table")
    p.add_argument("--table", help="write the table to this file instead of stdout")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child mode
        work = Path(args.workdir)
        from onnxport.testing import tiny

        tiny.LAYERS = args.layers
        rec = run_one(args.one, work, args.verify, work / "stage", args.stamp)
        (work / "result.json").write_text(json.dumps(rec))
        return 0

    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    if not args.no_run:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for rec in pool.map(lambda t: run_isolated(t, args), types):
                results[rec["type"]] = rec
                print(json.dumps({k: rec.get(k) for k in ("type", "status", "reason", "seconds")}), flush=True)
                out.write_text(json.dumps({"transformers": transformers.__version__, "verify": args.verify,
                                           "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS,
                                           "results": dict(sorted(results.items()))}, indent=1) + "\n")
    if args.readme:
        table = markdown_table(results)
        if args.table:
            Path(args.table).write_text(table)
        else:
            print(table)
    print(json.dumps(summary(results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
