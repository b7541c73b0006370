"""Which calls go up the layering while `onnxport.api.export` runs (a measurement for the
architecture notes, not a test): every call from an onnxport function into one of a higher
layer (a callback the lower layer was handed), and every re-entry into api.py.

    python scripts/call_layers.py [MODEL_DIR] [--dtype fp16] [--optimize] [--attention gqa] [--split]

Layers, bottom to top (see docs/architecture.md): errors/spec/config/progress, checkpoint and
bundle, runtime, hf, recipes and patches, export, verify, optimize, report, api, cli."""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

LAYERS = [("errors", "spec", "config", "progress", "testing"), ("checkpoint", "bundle"), ("runtime",), ("serve",), ("hf",),
          ("recipes", "patches"), ("export",), ("verify",), ("optimize",), ("targets",), ("report",), ("api",), ("cli",)]
SRC = Path(__file__).resolve().parents[1] / "src" / "onnxport"


def layer_of(path: str) -> tuple[int, str] | None:
    try:
        rel = Path(path).resolve().relative_to(SRC)
    except ValueError:
        return None
    top = rel.parts[0].removesuffix(".py")
    for i, names in enumerate(LAYERS):
        if top in names:
            return i, str(rel)
    return None


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(SRC / "demo_model"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--optimize", action="store_true")
    ap.add_argument("--attention", default="default")
    ap.add_argument("--split", action="store_true")
    args = ap.parse_args()
    model = Path(args.model)
    up: Counter = Counter()
    modules: set[str] = set()
    reentries: Counter = Counter()

    def prof(frame, event, arg):
        if event != "call":
            return
        callee = layer_of(frame.f_code.co_filename)
        if callee is None:
            return
        modules.add(callee[1])
        caller_frame = frame.f_back
        while caller_frame is not None and layer_of(caller_frame.f_code.co_filename) is None:
            caller_frame = caller_frame.f_back
        if caller_frame is None:
            return
        caller = layer_of(caller_frame.f_code.co_filename)
        if callee[0] > caller[0]:
            edge = (f"{caller[1]}:{caller_frame.f_code.co_name}", f"{callee[1]}:{frame.f_code.co_name}")
            up[edge] += 1
            if callee[1] == "api.py":
                reentries[edge] += 1

    from onnxport.api import export
    from onnxport.config import ExportConfig, SplitConfig

    cfg = ExportConfig(dtype=args.dtype, optimize=args.optimize, attention=args.attention,
                       kv_layout="bshd" if args.split else "bhsd")
    with tempfile.TemporaryDirectory() as tmp:
        sys.setprofile(prof)
        try:
            export(model, Path(tmp) / "b", cfg, split=SplitConfig(pack=2) if args.split else None)
        finally:
            sys.setprofile(None)
    print(json.dumps({"modules_visited": len(modules), "up_call_sites": len(up), "up_calls": sum(up.values()),
                      "api_reentry_sites": len(reentries),
                      "sites": [f"{a} -> {b} (x{n})" for (a, b), n in sorted(up.items())]}, indent=1))


if __name__ == "__main__":
    main()
