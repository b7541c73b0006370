"""Precision benchmark: fp32 / fp16 / bf16 bundles of one checkpoint against the fp32 PyTorch model.

For each dtype: export (with verification), bundle bytes, the worst logits max|diff| / cosine of
the verification record, nodes kept in fp32 by the fp16 guard, greedy-token agreement with
transformers' fp32 `generate` over --new-tokens tokens on each prompt (tokens equal, and the
length of the equal prefix), and ORT decode tokens/s. Prints JSON.

    python bench/precision.py [CHECKPOINT] [--new-tokens 32] [--dtypes fp32,fp16,bf16]

CHECKPOINT defaults to the trained demo model shipped in the package.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The built-in function len() returns",
    "class Point:\n    def __init__(self",
    "A for loop iterates over",
    "Exceptions are raised when",
    "The with statement is used to",
]


def fp32_reference(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for p in prompts:  # one prompt at a time: no padding in the reference
            ids = torch.tensor([p])
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    equal = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r))
    total = sum(len(r) for r in ref)
    prefix = []
    for g, r in zip(got, ref):
        n = 0
        while n < min(len(g), len(r)) and g[n] == r[n]:
            n += 1
        prefix.append(n)
    return {"tokens_equal": equal, "tokens": total, "fraction": round(equal / total, 4), "equal_prefix": prefix}


def main() -> None:
    import onnxport

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default=str(Path(onnxport.__file__).parent / "demo_model"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    args = ap.parse_args()

    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.runtime import Generator

    ckpt = Path(args.checkpoint)
    results = {"checkpoint": str(ckpt), "new_tokens": args.new_tokens, "prompts": len(PROMPTS), "dtypes": {}}
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            out = Path(tmp) / dtype
            t0 = time.perf_counter()
            manifest = export(ckpt, out, ExportConfig(dtype=dtype))
            seconds = time.perf_counter() - t0
            gen = Generator(out)
            prompts = [gen.tokenizer.encode(p) for p in PROMPTS]
            if ref is None:
                ref = fp32_reference(ckpt, prompts, args.new_tokens)
            got, tps = [], []
            for p in prompts:
                res = gen.generate_ids([p], max_new_tokens=args.new_tokens, eos_token_id=None)
                got.append(list(res.tokens[0]))
                tps.append(res.decode_tokens_per_s)
            logits = [c["outputs"]["logits"] for c in manifest.verification["cases"]]
            graph = manifest.graph("decoder")
            kept = (graph.precision or {}).get("kept_float32", {})
            results["dtypes"][dtype] = {
                "export_s": round(seconds, 1),
                "bundle_bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data")),
                "logits_max_abs_diff": max(x["max_abs_diff"] for x in logits),
                "logits_min_cosine": min(x["cosine"] for x in logits),
                "tolerance": manifest.verification["tolerance"],
                "kept_float32": kept.get("count"),
                "kept_by_op": kept.get("by_op"),
                "greedy_vs_torch_fp32": agreement(got, ref),
                "decode_tokens_per_s_median": sorted(tps)[len(tps) // 2],
            }
            print(dtype, json.dumps(results["dtypes"][dtype]), file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
