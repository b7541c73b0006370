"""int4 quality on trained weights: onnxport's RTN, AWQ and GPTQ (block 32 and 128, with the
output head at int4 or int8, with the embedding at int4) against the onnxruntime-genai builder's
int4 (RTN, its defaults, block 32 and 128), all from one checkpoint, measured the same way:
perplexity on held-out text; teacher-forced agreement with the float32 graph on that text (the
fraction of positions whose argmax agrees, mean KL, lowest logit cosine); and how many of the
float32 bundle's free-running greedy tokens each keeps (--new-tokens per prompt on 12 prompts,
and the mean equal prefix).

Calibration text: Python's documentation as it ships with every CPython (`pydoc_data.topics`);
held-out text and prompts: the Python tutorial from Debian's python3.11-doc (see `corpus`). The checkpoint
defaults to the demo model shipped in the package (trained: random weights carry no signal for
int4 to lose); SmolLM2-135M-Instruct: `python -m onnxport.testing.trained` prints its path. The
genai graphs run through onnxruntime directly with the same numpy scoring and greedy loop.
Prints JSON.

    python bench/int4_quality.py [CHECKPOINT] [--variants gptq-b32,genai-b32] [--save FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


class OrtGraph:
    """A decoder graph with the genai builder's I/O (input_ids, attention_mask, past_key_values.N.key/value
    -> logits, present.N.key/value) run by onnxruntime: `logits` and `generate_ids` as the
    Generator's, for verify/quality.py."""

    def __init__(self, path: Path, threads: int = 2):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        decoder = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        self.pasts = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, ids: list[int], past: dict | None, total: int) -> dict:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        for i in self.pasts:
            if past is None:
                feeds[i.name] = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
            else:
                feeds[i.name] = past[i.name.replace("past_key_values", "present")]
        return dict(zip(self.outputs, self.session.run(None, feeds)))

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._run(ids, None, len(ids))["logits"][0]

    def generate_ids(self, prompts, max_new_tokens: int, eos_token_id=None):
        (prompt,) = prompts
        out = self._run(list(prompt), None, len(prompt))
        toks = [int(out["logits"][0, -1].argmax())]
        while len(toks) < max_new_tokens:
            out = self._run([toks[-1]], out, len(prompt) + len(toks))
            toks.append(int(out["logits"][0, -1].argmax()))
        return SimpleNamespace(tokens=[toks])


def build_genai(ckpt: Path, out: Path, block: int) -> float:
    t0 = time.perf_counter()
    argv = sys.argv
    sys.argv = ["builder", "-i", str(ckpt), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out) + ".cache",
                "--extra_options", f"block_size={block}"]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    finally:
        sys.argv = argv
    return round(time.perf_counter() - t0, 1)


VARIANTS = ("rtn-b32", "awq-b32", "gptq-b32", "gptq-b32-asym", "rtn-b32-head8", "gptq-b32-asym-head8",
            "gptq-b128-asym-head8", "gptq-b32-asym-head8-emb", "gptq-b32-asym-head8-gate2", "genai-b32", "genai-b128")


TUTORIAL = Path("/usr/share/doc/python3.11/html/_sources/tutorial")


def corpus(tokenizer) -> tuple[list[int], list[list[int]], str]:
    """(held-out ids, prompts, where the held-out text is from).

    Calibration is quantize's default: the first --calib-tokens of Python's own documentation as
    it ships with the interpreter (`pydoc_data.topics`, the language reference topics `help()`
    shows; the gate's own held-out text is onnxport/data/calib.txt). Held-out text and prompts: the Python tutorial as Debian's python3.11-doc ships it
    (`apt install python3.11-doc`: reST sources under /usr/share/doc/python3.11/html/_sources/
    tutorial), text that neither the calibration nor the demo model's training (pydoc topics)
    saw; without that package, a later stretch of the pydoc topics."""
    import pydoc_data.topics

    if TUTORIAL.is_dir():
        held_ids = tokenizer.encode("\n\n".join(f.read_text(encoding="utf-8") for f in sorted(TUTORIAL.glob("*.rst.txt"))))
        source = "Python 3.11 tutorial (Debian python3.11-doc, _sources/tutorial/*.rst.txt)"
    else:
        text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        held_ids, source = tokenizer.encode(text)[40000:], "pydoc_data.topics, tokens 40000 on (python3.11-doc is not installed)"
    held = held_ids[:HELDOUT]
    step = max((len(held_ids) - HELDOUT - 24) // PROMPTS, 24)
    prompts = [held_ids[HELDOUT + i * step:HELDOUT + i * step + 24] for i in range(PROMPTS)]
    return held, prompts, source


HELDOUT, PROMPTS = 4096, 12


def main() -> None:
    import importlib.util

    import onnxport
    from onnxport.api import export, quantize
    from onnxport.bundle import read_manifest
    from onnxport.config import ExportConfig, QuantConfig
    from onnxport.runtime import Generator
    from onnxport.verify.quality import (
        greedy_agreement,
        greedy_tokens,
        logits_agreement,
        perplexity,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=str(Path(onnxport.__file__).parent / "demo_model"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma separated METHOD-bBLOCK[-asym][-head8][-emb][-gateP] (rtn, awq, gptq; gateP: the gate "
                         "moves the most sensitive layers to int8 until its held-out perplexity is within +P %%), "
                         "and genai-b32 / genai-b128")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level of onnxport's graphs "
                    "(4: int8 compute, genai's CPU default)")
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    results: dict[str, dict] = {}
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32"
        export(ckpt, fp32, ExportConfig(attention="gqa", optimize=True))
        ref = Generator(fp32)
        held, prompts, heldout_source = corpus(ref.tokenizer)
        ref_tokens = greedy_tokens(ref, prompts, args.new_tokens)
        ppl_fp = perplexity(ref, held)
        results["float32"] = {"perplexity": round(ppl_fp, 4), "graph_bytes": _bytes(fp32)}

        def measure(name, gen, path, **extra):
            t0 = time.perf_counter()
            agree = greedy_agreement(gen, ref_tokens, prompts, args.new_tokens)
            ppl = perplexity(gen, held)
            teacher = logits_agreement(gen, ref, held)
            results[name] = {**extra, "perplexity": round(ppl, 4), "ppl_increase": round(ppl / ppl_fp - 1, 4),
                             "top1_agreement": teacher["top1_agreement"], "kl_mean": teacher["kl_mean"],
                             "cosine_min": teacher["cosine_min"],
                             "greedy_equal_fp32": f"{agree['tokens_equal']}/{agree['tokens']}",
                             "greedy_equal_fraction": agree["fraction"],
                             "equal_prefix_mean": round(float(np.mean(agree["equal_prefix"])), 2),
                             "graph_bytes": _bytes(path),
                             "measure_seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name}: {results[name]}", file=sys.stderr)

        for v in variants:
            parts = v.split("-")
            block = int(parts[1][1:])
            out = tmp / v
            if parts[0] == "genai":
                if importlib.util.find_spec("onnxruntime_genai") is None:
                    results[v] = {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
                    continue
                seconds = build_genai(ckpt, out, block)
                measure(v, OrtGraph(out / "model.onnx"), out, block_size=block, method="rtn (genai builder defaults)",
                        build_seconds=seconds)
                continue
            gate = next((int(x[4:]) for x in parts if x.startswith("gate")), None)
            cfg = QuantConfig(method=parts[0], block_size=block, accuracy_level=args.accuracy_level,
                              calib_tokens=args.calib_tokens, symmetric="asym" not in parts,
                              max_ppl_increase=gate / 100 if gate else 1e9, escalate=gate is not None,
                              allow_fallback=True, head_bits=8 if "head8" in parts else None, embedding="emb" in parts)
            t0 = time.perf_counter()
            quantize(fp32, out, cfg)
            seconds = round(time.perf_counter() - t0, 1)
            q = read_manifest(out).graph("decoder").quantization
            measure(v, Generator(out), out, method=parts[0], block_size=block, symmetric=cfg.symmetric,
                    head_bits=cfg.head_bits or 4, embedding="int4" if cfg.embedding else "float32",
                    layers=q["layers"], gate_heldout_ppl_increase=round(q["perplexity"]["quantized"] /
                                                                        q["perplexity"]["source"] - 1, 4),
                    quantize_seconds=seconds)
    text = json.dumps({"checkpoint": str(ckpt), "calibration": "pydoc_data.topics (Python's documentation, shipped "
                       f"with the interpreter {sys.version.split()[0]})", "heldout": heldout_source,
                       "heldout_tokens": len(held), "prompts": len(prompts),
                       "new_tokens": args.new_tokens, "accuracy_level": args.accuracy_level,
                       "calibration_tokens": args.calib_tokens, "results": results},
                      indent=2)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))


if __name__ == "__main__":
    main()
