"""An onnxruntime session for one graph of a bundle, with input checking from the manifest."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from onnxport.bundle import Graph, check_external_data, resolve_inside
from onnxport.bundle.seal import Seal
from onnxport.errors import BundleError, OnnxportError, RuntimeInputError
from onnxport.spec import PAST, SEQ, TOTAL, TensorSpec

#: the engines a bundle's graphs run on; OpenVINO through runtime/openvino.py
RUNTIMES = ("onnxruntime", "openvino")


def current_runtime(name: str | None = None) -> str:
    """The engine sessions are made with: `name` when given, else ONNXPORT_RUNTIME, else
    onnxruntime (checked: one of RUNTIMES)."""
    name = name or os.environ.get("ONNXPORT_RUNTIME", "") or "onnxruntime"
    if name not in RUNTIMES:
        raise RuntimeInputError(f"runtime {name!r} is not one of {', '.join(RUNTIMES)}",
                                f"use one of {', '.join(RUNTIMES)} (--runtime / ONNXPORT_RUNTIME)")
    return name


@contextmanager
def using_runtime(name: str) -> Iterator[None]:
    """Sessions made inside the block run on `name` (`generate --runtime`)."""
    before = os.environ.get("ONNXPORT_RUNTIME")
    os.environ["ONNXPORT_RUNTIME"] = name
    try:
        current_runtime()
        yield
    finally:
        if before is None:
            os.environ.pop("ONNXPORT_RUNTIME", None)
        else:
            os.environ["ONNXPORT_RUNTIME"] = before


def make_session(path: Path, threads: int | None = None, spinning: bool = True, runtime: str = "onnxruntime"):
    if runtime == "openvino":
        from onnxport.runtime.openvino import OpenVINOSession

        return OpenVINOSession(path, threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        # Split bundles run dozens of sessions one after another; each owns a thread pool whose
        # workers busy-wait after a run by default, starving the next session of cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class GraphSession:
    """Runs one manifest graph; checks names, dtypes, ranks and named-dim consistency first,
    so a wrong feed gives one line instead of an onnxruntime stack."""

    def __init__(self, bundle: Path, entry: Graph, threads: int | None = None, spinning: bool = True,
                 runtime: str | None = None):
        self.entry = entry
        #: "onnxruntime" (an InferenceSession in `session`) or "openvino"
        self.runtime = current_runtime(runtime)
        self.inputs = {i.name: i for i in entry.inputs}
        #: inputs the graph defaults when not fed (manifest `optional_inputs`)
        self.optional = {n: TensorSpec(n, o["dtype"], tuple(o["dims"])) for n, o in (entry.optional_inputs or {}).items()}
        self.output_names = entry.output_names
        threads = threads or int(os.environ.get("ONNXPORT_THREADS", "0")) or None
        path = resolve_inside(bundle, entry.file)
        for name in entry.external_data:
            resolve_inside(bundle, name)
        check_external_data(bundle, entry.file)  # what the graph itself names, not only the manifest
        # the graph's files against the manifest's sha256, hashed while ONNX Runtime loads them
        seal = Seal(bundle, entry.files).start()
        try:
            self.session = make_session(path, threads, spinning, self.runtime)
        except OnnxportError:
            seal.wait()
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises Fail/InvalidGraph/RuntimeException
            seal.wait()  # a file that changed explains the failure better
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if self.runtime == "openvino":
                raise BundleError(f"OpenVINO cannot load {entry.file}: {first}",
                                  "run it on ONNX Runtime (--runtime onnxruntime); OpenVINO lacks an op of this graph") from None
            raise BundleError(f"ONNX Runtime cannot load {entry.file}: {first}",
                              "the file is damaged or was replaced; re-run onnxport export") from None
        seal.wait()

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        missing = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs and n not in self.optional]
        if missing or extra:
            raise RuntimeInputError(
                f"{self.entry.file}: "
                + (f"missing inputs {missing[:4]}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown inputs {extra[:4]}" if extra else ""),
                f"expected inputs: {list(self.inputs)[:6]}{' ...' if len(self.inputs) > 6 else ''}",
            )
        bound: dict[str, int] = {}
        for name, arr in feeds.items():
            spec = self.inputs.get(name) or self.optional[name]
            if str(arr.dtype) != spec.dtype:
                raise RuntimeInputError(
                    f"input {name!r} has dtype {arr.dtype}, expected {spec.dtype}",
                    f"cast it with .astype('{spec.dtype}')",
                )
            if arr.ndim != len(spec.dims):
                raise RuntimeInputError(
                    f"input {name!r} has shape {list(arr.shape)}, expected rank {len(spec.dims)} {list(spec.dims)}",
                    "see manifest.json for the graph's input dims",
                )
            for size, dim in zip(arr.shape, spec.dims):
                if isinstance(dim, int) and size != dim:
                    raise RuntimeInputError(
                        f"input {name!r} has shape {list(arr.shape)}, expected {list(spec.dims)}",
                        "see manifest.json for the graph's input dims",
                    )
                if isinstance(dim, str):
                    if bound.setdefault(dim, size) != size:
                        raise RuntimeInputError(
                            f"input {name!r}: dim {dim!r} is {size} but another input has {bound[dim]}",
                            "all inputs must agree on named dims (batch_size, sequence_length, ...)",
                        )
        if {PAST, SEQ, TOTAL} <= bound.keys():
            if bound[PAST] + bound[SEQ] != bound[TOTAL]:
                raise RuntimeInputError(
                    "attention_mask length must equal past_sequence_length + sequence_length "
                    f"({bound[PAST]} + {bound[SEQ]} != {bound[TOTAL]})",
                    "append one mask column per new token",
                )

    def run(self, feeds: dict[str, np.ndarray], check: bool = True) -> dict[str, np.ndarray]:
        if check:
            self.check(feeds)
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))
