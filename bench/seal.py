"""Time to first token with and without the sha256 check of a bundle's files at load (sealed
bundles): Generator construction + one greedy token, interleaved rounds (the order alternating),
the hash cache cleared before every checked round; also the time the load waited for hashes
after ONNX Runtime's session was ready (the check's own latency) and the hash alone. Prints JSON.

    python bench/seal.py BUNDLE [BUNDLE ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
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
    seal.WAITED["seconds"] = 0.0
    t0 = time.perf_counter()
    gen = Generator(bundle)
    gen.generate_ids([[1, 2, 3, 4]], max_new_tokens=1, eos_token_id=None)
    seconds = time.perf_counter() - t0
    del gen
    gc.collect()  # the last round's sessions freed now: several 2 GB sessions alive slowed loads 2-4x
    return seconds, seal.WAITED["seconds"]


def _hash_seconds(bundle: Path) -> float:
    from onnxport.bundle import seal

    seal._HASHED.clear()
    t0 = time.perf_counter()
    for f in bundle.iterdir():
        if f.is_file():
            seal.sha256(f)
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
        waited = []
        for r in range(args.rounds):
            # alternate which mode runs first: a slow spell of the machine then hits both alike
            for mode in (("checked", "trusted") if r % 2 == 0 else ("trusted", "checked")):
                seconds, blocked = first_token_seconds(b, mode == "checked")
                times[mode].append(seconds)
                if mode == "checked":
                    waited.append(blocked)
        hash_s = _hash_seconds(b)
        med = {k: statistics.median(v) for k, v in times.items()}
        out.append({"bundle": str(b), "bytes": size, "rounds": args.rounds,
                    "first_token_s": {k: round(v, 4) for k, v in med.items()},
                    "first_token_s_runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
                    "added_s": round(med["checked"] - med["trusted"], 4),
                    "added_fraction": round(med["checked"] / med["trusted"] - 1, 4),
                    # the part of the check that did not overlap ONNX Runtime's session load
                    "waited_for_hash_s": round(statistics.median(waited), 4),
                    "waited_fraction_of_trusted": round(statistics.median(waited) / med["trusted"], 4),
                    "hash_alone_s": round(hash_s, 3), "hash_mb_per_s": round(size / hash_s / 1e6, 1)})
        print(json.dumps(out[-1]), flush=True)
    print(json.dumps({"results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
