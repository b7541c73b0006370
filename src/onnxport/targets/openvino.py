"""OpenVINO (CPU plugin): read, compile at f32 and run every graph, outputs compared with ONNX
Runtime's on the same inputs (the real toolchain: `pip install openvino`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxport.targets import ERROR, INFO, WARNING, Finding, Target, register_target
from onnxport.targets.rules import graphs, sample_feeds

#: relative difference from ONNX Runtime above which an output is reported
TOLERANCE = 1e-3


@register_target
class OpenVINO(Target):
    name = "openvino"
    summary = "OpenVINO CPU plugin (f32): the default graph; generate --runtime openvino runs it"

    def __init__(self):
        # OpenVINO 2026.4 converts GroupQueryAttention but fails on it at batch > 1: the plain graph
        self.preset = {"attention": "default"}

    def check(self, bundle: Path, manifest):
        try:
            import openvino as ov
        except ImportError:
            return [Finding(WARNING, "openvino is not installed: nothing was checked (pip install openvino)")], []
        import onnxruntime as ort

        from onnxport.bundle import resolve_inside

        core = ov.Core()
        findings = []
        for g, _ in graphs(bundle, manifest):
            path = str(resolve_inside(bundle, g.file))
            try:
                compiled = core.compile_model(core.read_model(path), "CPU",
                                              {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
            except Exception as e:  # noqa: BLE001 - OpConversionFailure names the op
                findings.append(Finding(ERROR, f"OpenVINO cannot convert it: {str(e).strip().splitlines()[-1][:240]}",
                                        g.file))
                continue
            x = sample_feeds(g, manifest.model.vocab_size)
            if x is None:
                continue
            names = {n for port in compiled.inputs for n in port.get_names()}
            request = compiled.create_infer_request()
            try:
                ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, x)
            except Exception:  # noqa: BLE001 - generic sample inputs do not fit this graph: compiled only
                findings.append(Finding(INFO, "compiled; not run (generic sample inputs do not fit it)", g.file))
                continue
            try:
                request.infer({k: v for k, v in x.items() if k in names})
            except Exception as e:  # noqa: BLE001 - ONNX Runtime ran these inputs; OpenVINO did not
                findings.append(Finding(ERROR, f"OpenVINO cannot run it: {str(e).strip().splitlines()[-1][:200]}",
                                        g.file))
                continue
            worst = 0.0
            for out, want in zip(g.output_names, ref):
                got = request.get_tensor(compiled.output(out)).data
                if want.dtype.kind == "f":
                    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
                    worst = max(worst, err)
                    if err > TOLERANCE:
                        findings.append(Finding(ERROR, f"{out} differs from ONNX Runtime by {err:.2e} of its scale",
                                                g.file))
                elif not np.array_equal(got, want):
                    findings.append(Finding(ERROR, f"{out} differs from ONNX Runtime", g.file))
            findings.append(Finding(INFO, f"compiled and ran; outputs within {worst:.1e} of ONNX Runtime", g.file))
        if any(g.attention for g in manifest.graphs):
            findings.append(Finding(WARNING, "GroupQueryAttention: OpenVINO 2026.4 fails on it at batch > 1 "
                                             "(onnxport's runtime then runs prompts one at a time)"))
        return findings, [f"openvino {ov.__version__} CPU plugin, f32: each graph read, compiled, run, "
                          "compared with onnxruntime"]
