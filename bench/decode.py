"""Decode benchmark: onnxport's ORT generator vs PyTorch eager and the onnxruntime-genai
builder on the same checkpoint, in one run.

Measures, batch 1, greedy: prefill latency for a PROMPT_LEN-token prompt and decode tokens/s
for NEW_TOKENS new tokens. Every runner is built first and warmed up, then measured in --runs
rounds of one run each (round-robin: the machine's speed drifts over minutes, and each round
exposes every runner to the same drift); medians, all in this one process, same thread count. Prints JSON: per runner the
numbers, the ratios against PyTorch and against genai's runner of the same precision, and how
many of the first 32 greedy tokens equal PyTorch fp32's.

Runners (`--runners`, comma separated; default: all that apply):
  pytorch            transformers eager, fp32
  onnxport           `onnxport export` default graph, fp32
  onnxport-fast      `--attention gqa --optimize` (GroupQueryAttention with the rotary and packed
                     q/k/v inside, ORT fusions, MatMul packing; the generator keeps one cache
                     buffer bound as past and present)
  onnxport-int4      onnxport-fast quantized: RTN int4 block 32, MatMulNBits accuracy_level 4
  onnxport-int4-awq  AWQ scales, int4 block --awq-block-size (128: AWQ's own group size)
  onnxport-int4-gptq GPTQ, asymmetric, block 32, the lm_head at int8 (int4_quality.py's best setting)
  onnxport-int4-lookup  the onnxport-int4 graph with prompt-lookup speculative decoding (8 drafted
                     tokens at most; same tokens as onnxport-int4)
  genai / genai-int4 onnxruntime-genai's model builder, fp32 / int4 CPU (its defaults: RTN block
                     32, accuracy_level 4), run by its own generator loop (skipped with a
                     message when onnxruntime-genai is absent)
  genai-int4-b128    the builder's int4 with block_size=128 (the same block as onnxport-int4-awq)
  split-static       the static split layout (max-len 512)
  openvino           the onnxport default bundle run by the same generator on OpenVINO's CPU
                     plugin at f32 (`generate --runtime openvino`; skipped without openvino)
  onnxport-genai     the onnxport default bundle, unchanged, in onnxruntime-genai's own loop
                     (its genai_config.json)

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


def ort_runner(bundle: Path, prompt: list[int], threads: int, runtime: str = "onnxruntime", speculative: int = 0):
    """once(n) -> (prefill ms, decode tok/s, tokens) with onnxport's Generator."""
    from onnxport.runtime import Generator

    gen = Generator(bundle, threads=threads, runtime=runtime)

    def once(n):
        r = gen.generate_ids([prompt], max_new_tokens=n, eos_token_id=None, speculative=speculative)
        return r.prefill_ms, r.decode_tokens_per_s, r.padded[0].tolist()

    return once


def torch_runner(ckpt: Path, prompt: list[int], threads: int):
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

    return once


RUNNERS = ("pytorch", "onnxport", "onnxport-fast", "onnxport-int4", "onnxport-int4-awq", "onnxport-int4-gptq",
           "onnxport-int4-lookup", "genai", "genai-int4", "genai-int4-b128", "split-static", "openvino", "onnxport-genai")
DEFAULT = tuple(r for r in RUNNERS if r not in ("split-static", "openvino", "onnxport-genai", "onnxport-int4-gptq",
                                                  "onnxport-int4-lookup"))


def genai_runner(ckpt: Path, out: Path, precision: str, prompt: list[int], threads: int,
                 block_size: int | None = None):
    """onnxruntime-genai: its builder's graph and its own generation loop (prefill = the first
    token's time; decode = the rest), its session pinned to `threads`. (once, build record)"""
    import contextlib
    import runpy


    t0 = time.perf_counter()
    argv = sys.argv
    sys.argv = ["builder", "-i", str(ckpt), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + ".cache"]
    if block_size:
        sys.argv += ["--extra_options", f"block_size={block_size}"]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the builder prints its progress to stdout
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    finally:
        sys.argv = argv
    build_s = time.perf_counter() - t0
    once = genai_loop(out, prompt, threads)
    return once, {"build_seconds": round(build_s, 1), **({"block_size": block_size or 32} if precision == "int4" else {}),
                  "graph_bytes": sum(f.stat().st_size for f in out.glob("model.onnx*"))}


def genai_loop(folder: Path, prompt: list[int], threads: int, copy: bool = False):
    """once(n) with onnxruntime-genai's own loop on a folder holding a genai_config.json, its
    session pinned to `threads` (`copy`: on hard links of the folder's files, so a sealed
    onnxport bundle is not edited)."""
    import os

    import onnxruntime_genai as og

    if copy:
        linked = folder.with_name(folder.name + "-genai")
        linked.mkdir()
        for f in folder.iterdir():
            os.link(f, linked / f.name) if f.name != "genai_config.json" else None
        (linked / "genai_config.json").write_text((folder / "genai_config.json").read_text())
        folder = linked
    cfg_file = folder / "genai_config.json"
    gcfg = json.loads(cfg_file.read_text())
    gcfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_file.write_text(json.dumps(gcfg))
    model = og.Model(str(folder))

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

    return once


def main() -> None:
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runners", default=",".join(DEFAULT), help=f"comma separated, of {', '.join(RUNNERS)}")
    ap.add_argument("--awq-block-size", type=int, default=128, help="onnxport-int4-awq's block size")
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

    runs: dict[str, object] = {}  # name -> once(n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in runners:  # build every runner first ...
            print(f"preparing {name} ...", file=sys.stderr)
            if name == "pytorch":
                runs[name], results[name] = torch_runner(ckpt, prompt, args.threads), {}
            elif name == "onnxport":
                _, s = timed_export(name, tmp / name, ExportConfig(verify=False))
                runs[name], results[name] = ort_runner(tmp / name, prompt, args.threads), {"export_seconds": s}
            elif name == "onnxport-fast" or (name.startswith("onnxport-int4") and not (tmp / "onnxport-fast").exists()):
                m, s = timed_export(name, tmp / "onnxport-fast",
                                    ExportConfig(verify=False, attention="gqa", optimize=True))
                if name == "onnxport-fast":
                    runs[name] = ort_runner(tmp / name, prompt, args.threads)
                    results[name] = {"export_seconds": s,
                                     "passes": {r["name"]: r["fused"] for r in m.graph("decoder").optimization
                                                if r["applied"]}}
            if name == "onnxport-int4-lookup":  # the int4 graph below, with prompt-lookup drafts
                if not (tmp / "onnxport-int4").exists():
                    quantize(tmp / "onnxport-fast", tmp / "onnxport-int4",
                             QuantConfig(block_size=32, accuracy_level=4, max_ppl_increase=1e9, escalate=False))
                runs[name], results[name] = ort_runner(tmp / "onnxport-int4", prompt, args.threads, speculative=8), {}
            elif name.startswith("onnxport-int4") and not (tmp / name).exists():
                method = name.rsplit("-", 1)[1] if name.endswith(("awq", "gptq")) else "rtn"
                block = args.awq_block_size if method == "awq" else 32
                t0 = time.perf_counter()
                # gptq: the best-quality setting of bench/int4_quality.py (asymmetric, int8 head)
                m = quantize(tmp / "onnxport-fast", tmp / name,
                             QuantConfig(method=method, block_size=block, accuracy_level=4, max_ppl_increase=1e9,
                                         escalate=False, symmetric=method != "gptq",
                                         head_bits=8 if method == "gptq" else None))
                q = m.graph("decoder").quantization
                runs[name] = ort_runner(tmp / name, prompt, args.threads)
                results[name] = {"quantize_seconds": round(time.perf_counter() - t0, 1), "block_size": block,
                                 "graph_bytes": sum(f.stat().st_size for f in (tmp / name).glob("model.onnx*")),
                                 "heldout_perplexity": q["perplexity"]}
            elif name.startswith("genai"):
                if importlib.util.find_spec("onnxruntime_genai") is None:
                    results[name] = {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
                    continue
                runs[name], results[name] = genai_runner(ckpt, tmp / name, "int4" if "int4" in name else "fp32",
                                                         prompt, args.threads, 128 if name.endswith("b128") else None)
            elif name in ("openvino", "onnxport-genai"):
                needs = "openvino" if name == "openvino" else "onnxruntime_genai"
                if importlib.util.find_spec(needs) is None:
                    results[name] = {"skipped": f"{needs} is not installed"}
                    continue
                if not (tmp / "onnxport").exists():
                    timed_export(name, tmp / "onnxport", ExportConfig(verify=False))
                runs[name] = (ort_runner(tmp / "onnxport", prompt, args.threads, "openvino") if name == "openvino"
                              else genai_loop(tmp / "onnxport", prompt, args.threads, copy=True))
                results[name] = {}
            elif name == "split-static":
                _, s = timed_export(name, tmp / name, ExportConfig(verify=False, kv_layout="bshd"),
                                    SplitConfig(static=True, max_len=512, prefill_len=args.prompt_len))
                runs[name], results[name] = ort_runner(tmp / name, prompt, args.threads), {"export_seconds": s}
        # ... then measure them in rounds, one run of each per round: this machine's speed drifts
        # by 10-50 % over minutes, which would otherwise land on whichever runner ran then
        for once in runs.values():
            once(4)  # warm-up
        measured = {name: ([], [], None) for name in runs}
        for r in range(args.runs):
            print(f"round {r + 1}/{args.runs} ...", file=sys.stderr)
            for name, once in runs.items():
                p, d, toks = once(args.new_tokens)
                measured[name][0].append(p)
                measured[name][1].append(d)
                measured[name] = (*measured[name][:2], toks)
        for name, (pre, dec, toks) in measured.items():
            results[name].update({"prefill_ms": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec),
                                  "prefill_ms_best": min(pre), "decode_tokens_per_s_best": max(dec),
                                  "decode_tokens_per_s_runs": [round(x, 2) for x in dec], "tokens": toks})
        runs.clear()
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
        for base in ("pytorch", "onnxport", "onnxport-int4", "genai", "genai-int4", "genai-int4-b128"):
            b = results.get(base, {})
            if base != name and "decode_tokens_per_s" in b:
                ratios[f"{name}/{base}"] = {
                    "decode": round(r["decode_tokens_per_s"] / b["decode_tokens_per_s"], 3),
                    "prefill_time": round(r["prefill_ms"] / b["prefill_ms"], 3),
                    # best of the rounds: noise on a shared machine only ever slows a run down
                    "decode_best": round(r["decode_tokens_per_s_best"] / b["decode_tokens_per_s_best"], 3),
                    "prefill_time_best": round(r["prefill_ms_best"] / b["prefill_ms_best"], 3)}
    result = {"checkpoint": str(ckpt), "model_type": cfg.get("model_type"), "batch": 1, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads, "runners": results,
              "ratios": ratios}
    text = json.dumps(result, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
