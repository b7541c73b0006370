"""ONNX Runtime on CPU: the fastest CPU graph (GroupQueryAttention with the rotary inside, ORT's
fusions), checked by loading every graph in ONNX Runtime's CPU provider and running it once."""

from __future__ import annotations

from pathlib import Path

from onnxport.targets import ERROR, WARNING, Finding, Target, register_target
from onnxport.targets.rules import graphs, sample_feeds


def ort_runs(bundle: Path, manifest, provider: str = "CPUExecutionProvider") -> list[Finding]:
    """Each graph loads and runs once in ONNX Runtime (the check's own toolchain)."""
    import onnxruntime as ort

    from onnxport.bundle import resolve_inside

    out = []
    for g, _ in graphs(bundle, manifest):
        so = ort.SessionOptions()
        so.log_severity_level = 4  # failures are reported as findings, not logged
        try:
            sess = ort.InferenceSession(str(resolve_inside(bundle, g.file)), so, providers=[provider])
        except Exception as e:  # noqa: BLE001 - reported as the finding
            out.append(Finding(ERROR, f"ONNX Runtime cannot load it: {str(e).strip().splitlines()[0][:200]}", g.file))
            continue
        x = sample_feeds(g, manifest.model.vocab_size)
        if x is None:
            continue
        try:
            sess.run(None, x)
        except Exception as e:  # noqa: BLE001 - generic sample inputs may not fit every graph's contract
            out.append(Finding(WARNING, "loads, but did not run on generic sample inputs: "
                                        f"{str(e).strip().splitlines()[0][:160]}", g.file))
    return out


@register_target
class Cpu(Target):
    name = "cpu"
    summary = "ONNX Runtime, CPU provider: GroupQueryAttention graph + fusions, fp32"

    def __init__(self):
        self.preset = {"attention": "gqa", "optimize": True}

    def check(self, bundle: Path, manifest):
        import onnxruntime as ort

        findings = ort_runs(bundle, manifest)
        for g in manifest.graphs:
            if (g.precision or {}).get("compute") == "bfloat16":
                findings.append(Finding(ERROR, "bf16 compute: ONNX Runtime's CPU provider has no bf16 kernels", g.file))
            elif (g.precision or {}).get("compute") == "float16":
                findings.append(Finding(WARNING, "fp16 compute runs, but slower than fp32 on most CPUs", g.file))
        return findings, [f"onnxruntime {ort.__version__} CPUExecutionProvider: each graph loaded and run once"]
