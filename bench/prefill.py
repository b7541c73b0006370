"""The default graph against the fast one (`export --attention gqa --optimize`) on both phases:
prefill ms at several prompt lengths and decode tokens/s, in one process, medians. Prints JSON
with the ratios (fast / default: < 1 prefill time, > 1 decode speed means the fast graph wins).

Rounds alternate the two graphs in blocks (`--block` calls each), and each block starts with a
call that is not counted: ONNX Runtime's worker threads spin for a while after a run, so the
first call after the other session's run competes with that session's spinning threads for
the cores. Alternating single calls measured exactly that (the demo model's fast prefill at
2.9x the default's at 16 tokens; in blocks it is 0.66x).

    python bench/prefill.py CHECKPOINT [--lengths 16,128,400] [--rounds 7] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.runtime import Generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--lengths", default="16,128,400")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=5, help="timed calls per graph per round")
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    out: dict = {"checkpoint": str(args.checkpoint), "rounds": args.rounds, "block": args.block,
                 "threads": args.threads, "lengths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export(args.checkpoint, tmp / "default", ExportConfig(verify=False))
        export(args.checkpoint, tmp / "fast", ExportConfig(verify=False, attention="gqa", optimize=True))
        gens = {name: Generator(tmp / name, threads=args.threads) for name in ("default", "fast")}
        vocab = min(g.vocab_size for g in gens.values())
        for length in (int(x) for x in args.lengths.split(",")):
            ids = [(i * 7919 + 13) % vocab for i in range(length)]
            for g in gens.values():
                g.generate_ids([ids], max_new_tokens=2, eos_token_id=None)  # warm-up
            pre: dict = {n: [] for n in gens}
            dec: dict = {n: [] for n in gens}
            for _ in range(args.rounds):
                for name, g in gens.items():
                    g.generate_ids([ids], max_new_tokens=args.new_tokens, eos_token_id=None)  # the other's spin tail
                    for _ in range(args.block):
                        r = g.generate_ids([ids], max_new_tokens=args.new_tokens, eos_token_id=None)
                        pre[name].append(r.prefill_ms)
                        dec[name].append(r.decode_tokens_per_s)
            row = {n: {"prefill_ms": round(statistics.median(pre[n]), 2),
                       "decode_tokens_per_s": round(statistics.median(dec[n]), 1)} for n in gens}
            row["fast/default"] = {"prefill_time": round(row["fast"]["prefill_ms"] / row["default"]["prefill_ms"], 3),
                                   "decode": round(row["fast"]["decode_tokens_per_s"] / row["default"]["decode_tokens_per_s"], 3)}
            out["lengths"][length] = row
    text = json.dumps(out, indent=1)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
