"""int4 quality on trained weights: onnxport's RTN and AWQ at block 32 and 128 against the
onnxruntime-genai builder's int4 (RTN, block 32 and 128), all from one checkpoint, measured the
same way: held-out perplexity of the quantized graph, and how many of the float32 bundle's
greedy tokens it keeps (first 32 new tokens of each prompt, and the equal prefix).

The checkpoint defaults to the demo model shipped in the package (trained: random weights carry
no signal for int4 to lose). The genai graphs run through onnxruntime directly with the same
numpy scoring and greedy loop as onnxport's quality gate (`verify/quality.py`). Prints JSON.

    python bench/int4_quality.py [CHECKPOINT] [--save bench/results/int4_quality_demo.json]
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


def main() -> None:
    import importlib.util

    import onnxport
    from onnxport.api import export, quantize
    from onnxport.config import ExportConfig, QuantConfig
    from onnxport.optimize.gate import default_calibration_text as _default_calibration_text
    from onnxport.runtime import Generator
    from onnxport.verify.quality import calibration_split, greedy_agreement, perplexity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=str(Path(onnxport.__file__).parent / "demo_model"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32"
        export(ckpt, fp32, ExportConfig(attention="gqa", optimize=True))
        ref = Generator(fp32)
        _, held, prompts = calibration_split(_default_calibration_text(), ref.tokenizer)
        results["float32"] = {"perplexity": round(perplexity(ref, held), 4)}

        def measure(name, gen, **extra):
            agree = greedy_agreement(gen, ref, prompts, args.new_tokens)
            results[name] = {**extra, "perplexity": round(perplexity(gen, held), 4),
                             "greedy_equal_fp32": f"{agree['tokens_equal']}/{agree['tokens']}",
                             "equal_prefix": agree["equal_prefix"]}
            print(f"{name}: {results[name]}", file=sys.stderr)

        for method in ("rtn", "awq"):
            for block in (32, 128):
                out = tmp / f"{method}{block}"
                quantize(fp32, out, QuantConfig(method=method, block_size=block, accuracy_level=4,
                                                max_ppl_increase=1e9, escalate=False))
                measure(f"onnxport-{method}-b{block}", Generator(out), block_size=block)
        if importlib.util.find_spec("onnxruntime_genai") is None:
            results["genai-int4"] = {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
        else:
            for block in (32, 128):
                out = tmp / f"genai{block}"
                build_genai(ckpt, out, block)
                measure(f"genai-int4-b{block}", OrtGraph(out / "model.onnx"), block_size=block)
    held_tokens = len(held)
    text = json.dumps({"checkpoint": str(ckpt), "heldout_tokens": held_tokens, "prompts": len(prompts),
                       "new_tokens": args.new_tokens, "accuracy_level": 4, "results": results}, indent=2)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
