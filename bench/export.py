"""Export benchmark: wall time and peak RSS of exporting one checkpoint, side by side in one run.

Each mode runs in its own subprocess (peak RSS = that process's ru_maxrss), one after the other:

- `torch.onnx`   plain `torch.onnx.export(model, input_ids, dynamo=True)` of the loaded model (no
                  cache I/O): what a user writes by hand
- `genai`        onnxruntime-genai's model builder, fp32 CPU (skipped with a message when
                  onnxruntime-genai is not installed: `pip install onnxruntime-genai`)
- `onnxport`     `onnxport export --no-verify` (model loaded in float32, then traced: two decoder
                  layers, the others stamped from the second, export/stamp.py)
- `onnxport+trace-all`  the same with `--no-stamp`: every layer traced (the export before stamping)
- `onnxport+kept-template`  the same when an earlier export of this architecture kept its
                  two-layer trace (export/template.py): the template is loaded, not traced. A
                  priming export (untimed, `template_primed_seconds`) keeps it first; every other
                  mode runs with ONNXPORT_TEMPLATES=off, so it traces
- `onnxport+late-weights`  the same with the weights written when the graph is saved, not while
                  it is traced (ExportConfig(early_weights=False); bundle/weights.py EarlyWeights)
- `onnxport+verify`  the default `onnxport export`: the graph verified against PyTorch
- `onnxport+verify+segments`  the same with ONNX Runtime run in 1 GiB segments during verification
                  (as before segments.segment_budget: the model in memory now runs as one session
                  while its weights take under a quarter of the available memory)
- `low-memory`   `onnxport export --low-memory --no-verify` (meta-device trace, weights streamed
                  from the checkpoint one tensor at a time)
- `low-memory+verify`  the same with verification: ONNX Runtime runs the graph in segments of
                  at most 1 GiB of weights, the PyTorch reference reads each module's weights
                  when it runs (bounded memory end to end)
- `split`, `split+trace-all`, `split+verify`  `--layout split --pack N` (`--pack`, default 1)
                  without verification, the same with `--no-stamp` (every block graph traced),
                  and the default (verified) split export: block graphs after the first two of
                  each role stamped (export/stamp_blocks.py)
- `split-static13`, `split-static13+trace-all`  the static split for NPU toolchains
                  (`--static --opset 13 --head argmax`: the TorchScript exporter), no verification
- `low-memory+fp16`, `low-memory+fp16+verify`  --dtype fp16 (guarded; the fp32 graph is
                  written first and converted tensor by tensor)

RSS is reported as a multiple of the checkpoint's float32 weight bytes. With `--repeat N` the
modes run N times, interleaved, and each reports its median-time run (`runs_seconds`: all).
Prints JSON; `--save FILE` also writes it.

    python bench/make_checkpoint.py qwen2-0.5b /tmp/qwen2-0.5b-random --dtype fp32
    python bench/export.py /tmp/qwen2-0.5b-random [--modes onnxport,low-memory]
    python bench/make_checkpoint.py llama2-7b /tmp/llama2-7b-bf16 --dtype bf16
    python bench/export.py /tmp/llama2-7b-bf16 --modes low-memory+fp16+verify,low-memory+verify
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("torch.onnx", "genai", "onnxport", "onnxport+trace-all", "onnxport+verify", "low-memory", "low-memory+verify",
         "low-memory+fp16+verify")
#: modes run only when named (--modes)
EXTRA_MODES = ("onnxport+kept-template", "onnxport+late-weights", "onnxport+verify+segments", "split", "split+trace-all", "split+verify", "split-static13", "split-static13+trace-all")


def weight_bytes_fp32(ckpt: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += 4 * size
    return n


def run_one(mode: str, ckpt: Path, out: Path, pack: int = 1) -> None:
    """In the child: do one export, print {"seconds", "peak_rss_bytes", ...}."""
    t0 = time.perf_counter()
    extra: dict = {}
    if mode == "torch.onnx":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        model.config.use_cache = False
        ids = torch.ones(1, 8, dtype=torch.long)
        out.mkdir(parents=True)
        with torch.no_grad():
            prog = torch.onnx.export(model, (ids,), input_names=["input_ids"], dynamo=True, verbose=False,
                                     dynamic_shapes=({1: torch.export.Dim.DYNAMIC},))
        prog.save(str(out / "model.onnx"), external_data=True)
    elif mode.startswith("genai"):
        # the builder's command line, run in this process so ru_maxrss is its peak
        import runpy

        sys.argv = ["builder", "-i", str(ckpt), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c",
                    str(out.parent / "cache")]
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
        extra["graph_bytes"] = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    else:
        from onnxport.api import export
        from onnxport.config import ExportConfig, SplitConfig

        if "+segments" in mode:
            from onnxport.runtime import segments

            segments.WHOLE_SHARE = 0  # the configured 1 GiB segments, as before segment_budget
        static = mode.startswith("split-static13")
        split = SplitConfig(pack=pack, static=static, head="argmax" if static else "logits") \
            if mode.startswith("split") else None
        m = export(ckpt, out, ExportConfig(low_memory=mode.startswith("low-memory"), verify="+verify" in mode,
                                           dtype="float16" if "+fp16" in mode else "float32",
                                           stamp="+trace-all" not in mode,
                                           early_weights="+late-weights" not in mode,
                                           **({"opset": 13, "exporter": "torchscript"} if static else {})),
                   split=split)
        extra["phases"] = m.export.phases
        if split is None:
            extra["stamped"] = m.graph("decoder").stamped
        else:
            blocks = [g for g in m.graphs if g.role in ("block", "block_cache")]
            extra["block_graphs"] = {"pack": pack, "total": len(blocks),
                                     "stamped": sum(1 for g in blocks if (g.stamped or {}).get("from"))}
        extra["graph_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data"))
        if m.verification:
            extra["verified"] = m.verification.get("ok")
            extra["checks"] = m.verification.get("checks")
            extra["worst_logits_max_abs_diff"] = max(
                (c["outputs"]["logits"]["max_abs_diff"] for c in m.verification["cases"] if "logits" in c["outputs"]),
                default=None)
        if split is None and m.graph("decoder").precision:
            extra["fp16_kept_float32"] = m.graph("decoder").precision["kept_float32"]["count"]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_bytes": peak, **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--save", type=Path, help="also write the JSON here")
    ap.add_argument("--tmp", help="folder for the bundles (default: the system temp folder)")
    ap.add_argument("--pack", type=int, default=1, help="split modes: layers per block graph")
    ap.add_argument("--repeat", type=int, default=1, help="run the modes this many times, interleaved (median)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one, args.checkpoint, args.out, args.pack)
        return
    weights = weight_bytes_fp32(args.checkpoint)
    results = {"checkpoint": str(args.checkpoint), "fp32_weight_bytes": weights, "repeat": args.repeat, "modes": {}}
    runs: dict[str, list] = {}
    modes = args.modes.split(",")
    # the templates kept by `+kept-template` modes; every other mode traces (ONNXPORT_TEMPLATES=off)
    cache = Path(tempfile.mkdtemp(prefix="onnxport-bench-templates-", dir=args.tmp))
    if any("+kept-template" in m for m in modes):
        prime = next(m for m in modes if "+kept-template" in m)
        tmp = Path(tempfile.mkdtemp(prefix="onnxport-bench-export-", dir=args.tmp))
        p = subprocess.run([sys.executable, __file__, str(args.checkpoint), "--one", prime, "--out", str(tmp / "out")],
                           capture_output=True, text=True, env={**os.environ, "ONNXPORT_TEMPLATES": str(cache)})
        shutil.rmtree(tmp, ignore_errors=True)
        results["template_primed_seconds"] = json.loads(p.stdout.strip().splitlines()[-1])["seconds"] \
            if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1][:300]
    for mode in modes * args.repeat:
        if mode.startswith("genai") and importlib.util.find_spec("onnxruntime_genai") is None:
            results["modes"][mode] = {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
            print(json.dumps({mode: results["modes"][mode]}), file=sys.stderr)
            continue
        tmp = Path(tempfile.mkdtemp(prefix="onnxport-bench-export-", dir=args.tmp))
        # every mode starts with nothing left to write back: the disk takes ~0.5 GB/s once the page
        # cache's dirty limit (~2 GB here) is reached, so the previous mode's output would slow this one
        os.sync()
        try:
            env = {**os.environ, "ONNXPORT_TEMPLATES": str(cache) if "+kept-template" in mode else "off"}
            p = subprocess.run([sys.executable, __file__, str(args.checkpoint), "--one", mode, "--out",
                                str(tmp / "out"), "--pack", str(args.pack)], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                results["modes"][mode] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r["peak_rss_x_weights"] = round(r["peak_rss_bytes"] / weights, 2)
                runs.setdefault(mode, []).append(r)
                # the run of median time stands for the mode; every run's seconds are kept
                ordered = sorted(runs[mode], key=lambda x: x["seconds"])
                results["modes"][mode] = {**ordered[(len(ordered) - 1) // 2],
                                          "runs_seconds": [x["seconds"] for x in runs[mode]]}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({mode: runs.get(mode, [results["modes"][mode]])[-1]}), file=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)
    genai = results["modes"].get("genai", {})
    if "seconds" in genai:  # export time as a multiple of the genai builder's, same run
        results["x_genai_builder_time"] = {m: round(r["seconds"] / genai["seconds"], 2)
                                           for m, r in results["modes"].items() if "seconds" in r and m != "genai"}
    base = results["modes"].get("onnxport", {})
    low = results["modes"].get("low-memory", {})
    if "peak_rss_bytes" in base and "peak_rss_bytes" in low:
        results["low_memory_rss_ratio"] = round(low["peak_rss_bytes"] / base["peak_rss_bytes"], 3)
        results["low_memory_time_ratio"] = round(low["seconds"] / base["seconds"], 3)
    text = json.dumps(results, indent=1)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
