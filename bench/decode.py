"""Decode benchmark: onnxport's ORT generator vs PyTorch eager on the same checkpoint.

Measures, batch 1, greedy: prefill latency for a PROMPT_LEN-token prompt and decode tokens/s
for NEW_TOKENS new tokens. Median of --runs runs each, both measured in this one process, one
after the other, with the same thread count. Prints JSON (and the ratio ORT / PyTorch).

    python bench/decode.py CHECKPOINT [--bundle OUT] [--runs 3] [--split-static] [--optimize] [--int4]
    python bench/decode.py --make-qwen2-0.5b /tmp/qwen2-0.5b-random   # build the shaped checkpoint
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_qwen2_05b(out: Path) -> None:
    """A random checkpoint shaped like Qwen2-0.5B (hidden 896, 24 layers, 14/2 heads, vocab 151936)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    # a tokenizer for the text side (quantize's calibration): the demo model's 1024-token BPE,
    # whose ids all lie inside this vocabulary
    import shutil

    import onnxport

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(onnxport.__file__).parent / "demo_model" / f, out / f)


def bench_ort(bundle: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    from onnxport.runtime import Generator

    gen = Generator(bundle, threads=threads)
    gen.generate_ids([prompt], max_new_tokens=4, eos_token_id=None)  # warm-up
    pre, dec, toks = [], [], None
    for _ in range(runs):
        r = gen.generate_ids([prompt], max_new_tokens=new_tokens, eos_token_id=None)
        pre.append(r.prefill_ms)
        dec.append(r.decode_tokens_per_s)
        toks = r.padded[0].tolist()
    return {"prefill_ms": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec), "tokens": toks}


def bench_torch(ckpt: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def once(n):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = DynamicCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            toks = [int(tok)]
            for _ in range(n - 1):
                out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(tok))
            t2 = time.perf_counter()
        return (t1 - t0) * 1000, (n - 1) / (t2 - t1), toks

    once(4)
    pre, dec, toks = [], [], None
    for _ in range(runs):
        p, d, toks = once(new_tokens)
        pre.append(p)
        dec.append(d)
    return {"prefill_ms": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec), "tokens": toks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--bundle", help="existing onnxport bundle of CHECKPOINT (default: export to a temp dir)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split-static", action="store_true",
                    help="also export the split static layout (max-len 512, prefill-len = prompt len) and time it")
    ap.add_argument("--int4", action="store_true",
                    help="also quantize the bundle (onnxport quantize, RTN block 32, gate reported not enforced) "
                         "and time it, with fp32 compute and with MatMulNBits accuracy_level 4 (int8 compute)")
    ap.add_argument("--optimize", action="store_true", help="also export with --optimize (ORT fusions) and time it")
    ap.add_argument("--make-qwen2-0.5b", dest="make", metavar="DIR")
    args = ap.parse_args()
    if args.make:
        make_qwen2_05b(Path(args.make))
        print(json.dumps({"wrote": args.make}))
        return
    if not args.checkpoint:
        ap.error("CHECKPOINT is required")
    ckpt = Path(args.checkpoint)
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = cfg.get("text_config", cfg)["vocab_size"]
    prompt = [(i * 7919 + 13) % vocab for i in range(args.prompt_len)]

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else Path(tmp) / "bundle"
        export_s = None
        if not args.bundle:
            from onnxport.api import export
            from onnxport.config import ExportConfig

            t0 = time.perf_counter()
            export(ckpt, bundle, ExportConfig(verify=False))
            export_s = time.perf_counter() - t0
        ort_res = bench_ort(bundle, prompt, args.new_tokens, args.runs, args.threads)
        split_res = None
        if args.split_static:
            from onnxport.api import export
            from onnxport.config import ExportConfig, SplitConfig

            sbundle = Path(tmp) / "split_static"
            t0 = time.perf_counter()
            export(ckpt, sbundle, ExportConfig(verify=False, kv_layout="bshd"),
                   split=SplitConfig(static=True, max_len=512, prefill_len=args.prompt_len))
            split_export_s = time.perf_counter() - t0
            split_res = bench_ort(sbundle, prompt, args.new_tokens, args.runs, args.threads)
            split_res["export_seconds"] = split_export_s
        quant_res = {}
        if args.optimize:
            from onnxport.api import export
            from onnxport.config import ExportConfig

            obundle = Path(tmp) / "optimized"
            t0 = time.perf_counter()
            m = export(ckpt, obundle, ExportConfig(verify=False, optimize=True))
            quant_res["fp32_optimized"] = bench_ort(obundle, prompt, args.new_tokens, args.runs, args.threads)
            quant_res["fp32_optimized"].update(export_seconds=time.perf_counter() - t0,
                                               fused=m.graph("decoder").optimization[0]["fused"])
        if args.int4:
            from onnxport.api import quantize
            from onnxport.config import QuantConfig

            for name, level in (("int4", 0), ("int4_acc4", 4)):
                qbundle = Path(tmp) / name
                t0 = time.perf_counter()
                m = quantize(bundle, qbundle, QuantConfig(accuracy_level=level, max_ppl_increase=1e9, escalate=False))
                q = m.graph("decoder").quantization
                quant_res[name] = bench_ort(qbundle, prompt, args.new_tokens, args.runs, args.threads)
                quant_res[name].update(quantize_seconds=time.perf_counter() - t0,
                                       graph_bytes=sum(f.stat().st_size for f in qbundle.glob("model.onnx*")),
                                       perplexity=q["perplexity"], greedy_agreement_vs_fp32_bundle=q["greedy_agreement"])
        torch_res = bench_torch(ckpt, prompt, args.new_tokens, args.runs, args.threads)
    torch_tokens = torch_res.pop("tokens")
    same = ort_res.pop("tokens") == torch_tokens
    result = {
        "checkpoint": str(ckpt),
        "model_type": cfg.get("model_type"),
        "batch": 1,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "threads": args.threads,
        "export_seconds": export_s,
        "onnxport_ort": ort_res,
        "pytorch_eager": torch_res,
        "ratio_ort_over_torch": {
            "prefill_speedup": torch_res["prefill_ms"] / ort_res["prefill_ms"],
            "decode_speedup": ort_res["decode_tokens_per_s"] / torch_res["decode_tokens_per_s"],
        },
        "greedy_tokens_identical": same,
    }
    if split_res is not None:
        result["greedy_tokens_identical_split_static"] = split_res.pop("tokens") == torch_tokens
        result["onnxport_ort_split_static"] = split_res
        result["ratio_ort_over_torch"]["split_static_decode_speedup"] = (
            split_res["decode_tokens_per_s"] / torch_res["decode_tokens_per_s"])
    for name, r in quant_res.items():
        result[f"greedy_tokens_identical_{name}"] = r.pop("tokens") == torch_tokens
        result[f"onnxport_ort_{name}"] = r
        result["ratio_ort_over_torch"][f"{name}_decode_speedup"] = r["decode_tokens_per_s"] / torch_res["decode_tokens_per_s"]
        result["ratio_ort_over_torch"][f"{name}_over_fp32_ort_decode"] = (
            r["decode_tokens_per_s"] / ort_res["decode_tokens_per_s"])
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
