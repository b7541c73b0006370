"""Load test of a bundle served by a real Triton Inference Server (`onnxport triton` repository,
nvidia-pytriton's server binary) on localhost: C concurrent tritonclient HTTP clients each send R
generate requests; for each --max-batch-size given, a fresh server. Prints JSON: requests/s,
new tokens/s, p50 / p99 latency, errors, lost requests (sent minus answered), and how many
requests Triton merged per execution (its own statistics), side by side.

    python bench/serve.py BUNDLE [--clients 16] [--requests 4] [--max-tokens 32] [--batch 0,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

PROMPTS = ["def fib(n):", "The os module provides", "Once upon a time", "import json\n"]


def one_setting(bundle: Path, batch: int, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    import tritonclient.http as th

    from onnxport.serve.triton import start_server, write_repository

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        record = write_repository(bundle, work / "repo", max_batch_size=batch, max_tokens=max_tokens)
        model = next(iter(record["models"]))
        t0 = time.perf_counter()
        server = start_server(work / "repo", work)
        startup = time.perf_counter() - t0
        latencies, errors, tokens = [], [], []
        lock = threading.Lock()

        def client(i: int) -> None:
            c = th.InferenceServerClient(server.http_url, connection_timeout=timeout, network_timeout=timeout)
            try:
                for k in range(requests):
                    prompt = PROMPTS[(i + k) % len(PROMPTS)]
                    a = th.InferInput("TEXT_INPUT", [1, 1], "BYTES")
                    a.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
                    t = time.perf_counter()
                    try:
                        r = c.infer(model, [a])
                        n = int((r.as_numpy("TOKEN_IDS") >= 0).sum())
                        with lock:
                            latencies.append(time.perf_counter() - t)
                            tokens.append(n)
                    except Exception as e:  # noqa: BLE001 - counted, not fatal
                        with lock:
                            errors.append(repr(e)[:200])
            finally:
                c.close()

        try:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=30) as r:
                stats = json.loads(r.read())["model_stats"][0]
        finally:
            code = server.stop()
        sent = clients * requests
        lat = sorted(latencies)
        return {"max_batch_size": batch, "clients": clients, "requests_sent": sent, "answered": len(lat),
                "lost": sent - len(lat) - len(errors), "errors": len(errors), "error_examples": errors[:3],
                "wall_seconds": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2),
                "new_tokens_per_s": round(sum(tokens) / wall, 1),
                "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
                "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
                "triton_inferences": int(stats["inference_count"]), "triton_executions": int(stats["execution_count"]),
                "requests_per_execution": round(int(stats["inference_count"]) / max(1, int(stats["execution_count"])), 2),
                "server_startup_s": round(startup, 2), "server_exit_code": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", default="0,8", help="--max-batch-size values to compare (0: no batching)")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    runs = []
    for b in [int(x) for x in args.batch.split(",")]:
        print(f"max_batch_size {b} ...", file=sys.stderr)
        runs.append(one_setting(args.bundle, b, args.clients, args.requests, args.max_tokens, args.timeout))
    out = {"bundle": str(args.bundle), "max_tokens": args.max_tokens, "runs": runs}
    if len(runs) > 1 and runs[0]["requests_per_s"]:
        out["throughput_ratio_last_vs_first"] = round(runs[-1]["requests_per_s"] / runs[0]["requests_per_s"], 2)
    text = json.dumps(out, indent=2)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
