"""Time to first token with and without the sha256 check of a bundle's files at load (sealed
bundles): Generator construction + one greedy token, interleaved rounds, the hash cache cleared
before every checked round. Prints JSON.

    python bench/seal.py BUNDLE [BUNDLE ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def first_token_seconds(bundle: Path, check: bool) -> float:
    from onnxport.bundle import seal
    from onnxport.runtime import Generator

    seal._HASHED.clear()
    seal.trust_bundles(not check)
    t0 = time.perf_counter()
    gen = Generator(bundle)
    gen.generate_ids([[1, 2, 3, 4]], max_new_tokens=1, eos_token_id=None)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    out = []
    for b in map(Path, args.bundles):
        size = sum(f.stat().st_size for f in b.iterdir() if f.is_file())
        first_token_seconds(b, False)  # warm the page cache: both modes read from memory
        times = {"checked": [], "trusted": []}
        for _ in range(args.rounds):
            for mode in ("checked", "trusted"):
                times[mode].append(first_token_seconds(b, mode == "checked"))
        med = {k: statistics.median(v) for k, v in times.items()}
        out.append({"bundle": str(b), "bytes": size, "rounds": args.rounds,
                    "first_token_s": {k: round(v, 4) for k, v in med.items()},
                    "added_s": round(med["checked"] - med["trusted"], 4),
                    "added_fraction": round(med["checked"] / med["trusted"] - 1, 4)})
        print(json.dumps(out[-1]), flush=True)
    print(json.dumps({"results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
