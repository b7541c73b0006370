"""Decode benchmark: onnxport's ORT generator vs PyTorch eager and the onnxruntime-genai
builder on the same checkpoint, in one run.

Measures, batch 1, greedy: prefill latency for a PROMPT_LEN-token prompt and decode tokens/s
for NEW_TOKENS new tokens. Median of --runs runs each after a warm-up, every runner measured in
this one process, one after the other, with the same thread count. Prints JSON: per runner the
numbers, the ratios against PyTorch and against genai's runner of the same precision, and how
many of the first 32 greedy tokens equal PyTorch fp32's.

Runners (`--runners`, comma separated; default: all that apply):
  pytorch            transformers eager, fp32
  onnxport           `onnxport export` default graph, fp32
  onnxport-fast      `--attention gqa --optimize` (GroupQueryAttention, ORT fusions, MatMul
                     packing; the generator keeps one cache buffer bound as past and present)
  onnxport-int4      onnxport-fast quantized: RTN int4 block 32, MatMulNBits accuracy_level 4
  onnxport-int4-awq  the same with AWQ scales
  genai / genai-int4 onnxruntime-genai's model builder, fp32 / int4 CPU, run by its own
                     generator loop (skipped with a message when onnxruntime-genai is absent)
  split-static       the static split layout (max-len 512)

    python bench/make_checkpoint.py qwen2-0.5b /tmp/qwen2-0.5b-random --dtype fp32
    python bench/decode.py /tmp/qwen2-0.5b-random [--runs 3] [--runners pytorch,onnxport-fast,genai]
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


RUNNERS = ("pytorch", "onnxport", "onnxport-fast", "onnxport-int4", "onnxport-int4-awq", "genai", "genai-int4",
           "split-static")
DEFAULT = tuple(r for r in RUNNERS if r != "split-static")


def bench_genai(ckpt: Path, out: Path, precision: str, prompt: list[int], new_tokens: int, runs: int,
                threads: int) -> dict:
    """onnxruntime-genai: its builder's graph and its own generation loop (prefill = the first
    token's time; decode = the rest), its session pinned to `threads`."""
    import runpy

    import onnxruntime_genai as og

    t0 = time.perf_counter()
    argv = sys.argv
    sys.argv = ["builder", "-i", str(ckpt), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + ".cache"]
    try:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the builder prints its progress to stdout
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    finally:
        sys.argv = argv
    build_s = time.perf_counter() - t0
    cfg_file = out / "genai_config.json"
    gcfg = json.loads(cfg_file.read_text())
    gcfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_file.write_text(json.dumps(gcfg))
    model = og.Model(str(out))
    total = len(prompt) + new_tokens

    def once(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens([prompt])
        gen.generate_next_token()
        t1 = time.perf_counter()
        k = 1
        while not gen.is_done() and k < n:
            gen.generate_next_token()
            k += 1
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (k - 1) / (t2 - t1), list(gen.get_sequence(0))[len(prompt):]

    once(4)
    pre, dec, toks = [], [], None
    for _ in range(runs):
        p, d, toks = once(new_tokens)
        pre.append(p)
        dec.append(d)
    del total
    return {"prefill_ms": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec), "tokens": toks,
            "build_seconds": round(build_s, 1),
            "graph_bytes": sum(f.stat().st_size for f in out.glob("model.onnx*"))}


def main() -> None:
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runners", default=",".join(DEFAULT), help=f"comma separated, of {', '.join(RUNNERS)}")
    ap.add_argument("--save", type=Path, help="also write the JSON here")
    ap.add_argument("--make-qwen2-0.5b", dest="make", metavar="DIR")
    args = ap.parse_args()
    if args.make:
        make_qwen2_05b(Path(args.make))
        print(json.dumps({"wrote": args.make}))
        return
    if not args.checkpoint:
        ap.error("CHECKPOINT is required")
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown:
        ap.error(f"unknown runner(s) {unknown}; choose from {RUNNERS}")
    ckpt = Path(args.checkpoint)
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = cfg.get("text_config", cfg)["vocab_size"]
    prompt = [(i * 7919 + 13) % vocab for i in range(args.prompt_len)]
    results: dict[str, dict] = {}

    from onnxport.api import export, quantize
    from onnxport.config import ExportConfig, QuantConfig, SplitConfig

    def timed_export(name, out, cfg, split=None):
        t0 = time.perf_counter()
        m = export(ckpt, out, cfg, split=split)
        return m, round(time.perf_counter() - t0, 1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in runners:
            print(f"running {name} ...", file=sys.stderr)
            if name == "pytorch":
                results[name] = bench_torch(ckpt, prompt, args.new_tokens, args.runs, args.threads)
            elif name == "onnxport":
                _, s = timed_export(name, tmp / name, ExportConfig(verify=False))
                results[name] = {**bench_ort(tmp / name, prompt, args.new_tokens, args.runs, args.threads),
                                 "export_seconds": s}
            elif name == "onnxport-fast" or (name.startswith("onnxport-int4") and not (tmp / "onnxport-fast").exists()):
                m, s = timed_export(name, tmp / "onnxport-fast",
                                    ExportConfig(verify=False, attention="gqa", optimize=True))
                if name == "onnxport-fast":
                    results[name] = {**bench_ort(tmp / name, prompt, args.new_tokens, args.runs, args.threads),
                                     "export_seconds": s,
                                     "passes": {r["name"]: r["fused"] for r in m.graph("decoder").optimization}}
            if name.startswith("onnxport-int4"):
                method = "awq" if name.endswith("awq") else "rtn"
                t0 = time.perf_counter()
                m = quantize(tmp / "onnxport-fast", tmp / name,
                             QuantConfig(method=method, accuracy_level=4, max_ppl_increase=1e9, escalate=False))
                q = m.graph("decoder").quantization
                results[name] = {**bench_ort(tmp / name, prompt, args.new_tokens, args.runs, args.threads),
                                 "quantize_seconds": round(time.perf_counter() - t0, 1),
                                 "graph_bytes": sum(f.stat().st_size for f in (tmp / name).glob("model.onnx*")),
                                 "heldout_perplexity": q["perplexity"]}
            elif name.startswith("genai"):
                if importlib.util.find_spec("onnxruntime_genai") is None:
                    results[name] = {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
                    continue
                results[name] = bench_genai(ckpt, tmp / name, "int4" if name.endswith("int4") else "fp32", prompt,
                                            args.new_tokens, args.runs, args.threads)
            elif name == "split-static":
                _, s = timed_export(name, tmp / name, ExportConfig(verify=False, kv_layout="bshd"),
                                    SplitConfig(static=True, max_len=512, prefill_len=args.prompt_len))
                results[name] = {**bench_ort(tmp / name, prompt, args.new_tokens, args.runs, args.threads),
                                 "export_seconds": s}
    reference = results.get("pytorch", {}).get("tokens")
    for name, r in results.items():
        toks = r.pop("tokens", None)
        if toks is not None and reference is not None:
            toks, ref = [int(t) for t in toks], [int(t) for t in reference]
            r["greedy_equal_pytorch_first_32"] = sum(a == b for a, b in zip(toks[:32], ref[:32]))
            r["greedy_identical_pytorch"] = toks == ref
    ratios = {}
    for name, r in results.items():
        if "decode_tokens_per_s" not in r:
            continue
        for base in ("pytorch", "genai", "genai-int4"):
            b = results.get(base, {})
            if base != name and "decode_tokens_per_s" in b:
                ratios[f"{name}/{base}"] = {"decode": round(r["decode_tokens_per_s"] / b["decode_tokens_per_s"], 3),
                                            "prefill_time": round(r["prefill_ms"] / b["prefill_ms"], 3)}
    result = {"checkpoint": str(ckpt), "model_type": cfg.get("model_type"), "batch": 1, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads, "runners": results,
              "ratios": ratios}
    text = json.dumps(result, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
