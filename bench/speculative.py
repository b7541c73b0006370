"""Speculative decoding against plain greedy decoding, same bundle, same process, interleaved
rounds: prompt-lookup drafts and, with --draft-bundle, a draft model's (a smaller model with the
same tokenizer, or the same model quantized). Decode tokens/s, tokens per forward, drafted /
accepted tokens, time spent drafting, and whether the tokens are identical (they must be).
Prompts: code that continues its own patterns and a summary-like prompt whose answer quotes its
context (input-grounded), plus a free-running one. Prints JSON.

    python bench/speculative.py BUNDLE [BUNDLE ...] [--new-tokens 128] [--rounds 3] [--draft 8]
        [--draft-bundle DRAFT --draft-model-k 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PROMPTS = {
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
            "def fibonacci_memo(n, memo={}):\n    if n < 2:\n        return n\n",
    "summary": "The os module provides a portable way of using operating system dependent functionality. If you just "
               "want to read or write a file see open(), if you want to manipulate paths, see the os.path module, and "
               "if you want to read all the lines in all the files on the command line see the fileinput module.\n\n"
               "Summary: The os module provides",
    "free": "import json\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-bundle", type=Path, help="also draft with this model (same tokenizer)")
    ap.add_argument("--draft-model-k", type=int, default=4, help="tokens the draft model proposes per forward, at most")
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    from onnxport.runtime import Generator

    out = {"new_tokens": args.new_tokens, "draft": args.draft, "rounds": args.rounds, "bundles": {}}
    # the model and its draft take turns: their thread pools must not busy-wait (as generate --draft)
    draft = Generator(args.draft_bundle, threads=args.threads, spinning=False) if args.draft_bundle else None
    if draft is not None:
        out["draft_bundle"], out["draft_model_k"] = str(args.draft_bundle), args.draft_model_k
    for bundle in args.bundles:
        gen = Generator(bundle, threads=args.threads)
        quiet = Generator(bundle, threads=args.threads, spinning=False) if draft is not None else None
        rows = {}
        for name, text in PROMPTS.items():
            ids = gen.tokenizer.encode(text)
            gen.generate_ids([ids], max_new_tokens=4, eos_token_id=None)  # warm-up
            plain_tps, spec_tps, model_tps = [], [], []
            for _ in range(args.rounds):
                p = gen.generate_ids([ids], max_new_tokens=args.new_tokens, eos_token_id=None)
                s = gen.generate_ids([ids], max_new_tokens=args.new_tokens, eos_token_id=None, speculative=args.draft)
                plain_tps.append(p.decode_tokens_per_s)
                spec_tps.append(s.decode_tokens_per_s)
                if draft is not None:
                    d = quiet.generate_ids([ids], max_new_tokens=args.new_tokens, eos_token_id=None,
                                           speculative=args.draft_model_k, draft=draft)
                    model_tps.append(d.decode_tokens_per_s)
            rows[name] = {"plain_tokens_per_s": round(statistics.median(plain_tps), 1),
                          "speculative_tokens_per_s": round(statistics.median(spec_tps), 1),
                          "speedup": round(statistics.median(spec_tps) / statistics.median(plain_tps), 3),
                          "tokens_per_forward": s.speculative["tokens_per_forward"],
                          "drafted": s.speculative["drafted"], "accepted": s.speculative["accepted"],
                          "identical_tokens": s.tokens == p.tokens}
            if draft is not None:
                rows[name]["draft_model"] = {
                    "tokens_per_s": round(statistics.median(model_tps), 1),
                    "speedup": round(statistics.median(model_tps) / statistics.median(plain_tps), 3),
                    "tokens_per_forward": d.speculative["tokens_per_forward"], "drafted": d.speculative["drafted"],
                    "accepted": d.speculative["accepted"], "draft_ms": round(d.speculative["draft_ms"], 1),
                    "decode_ms": round(d.decode_ms, 1), "identical_tokens": d.tokens == p.tokens}
        out["bundles"][str(bundle)] = rows
    text = json.dumps(out, indent=1)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
