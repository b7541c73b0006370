"""TensorRT: fp16, plain ONNX ops (its ONNX parser has no com.microsoft ops), optimisation
profiles from the manifest's named dims, written as a ready trtexec command. TensorRT does not
install here (NVIDIA's own index): the check is a versioned table (TensorRT 10.x ONNX parser),
and the command runs where trtexec exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from onnxport.targets import ERROR, INFO, WARNING, Finding, Target, register_target
from onnxport.targets.rules import (
    CONTROL_FLOW,
    DATA_DEPENDENT,
    contrib_ops,
    graphs,
    ops_named,
    opset_above,
)

#: TensorRT 10.x's ONNX parser (onnx-tensorrt docs/operators.md): ops it does not import
UNSUPPORTED = {"Unique", "StringNormalizer", "TfIdfVectorizer", "Multinomial", "RandomNormal", "RandomUniform",
               "RandomNormalLike", "RandomUniformLike", "Bernoulli", "SequenceAt", "SequenceConstruct",
               "SequenceInsert", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement"}
MAX_OPSET = 20


def profile(g, manifest, batch: int = 8) -> tuple[str, str, str]:
    """--minShapes / --optShapes / --maxShapes for one graph from its named dims."""
    longest = int(manifest.model.max_positions or 2048)
    table = {"batch_size": (1, 1, batch), "batch": (1, 1, batch), "sequence_length": (1, 128, longest),
             "past_sequence_length": (0, 128, longest - 1), "total_sequence_length": (1, 256, longest)}
    shapes = ([], [], [])
    for t in g.inputs:
        for k in range(3):
            dims = [str(d) if isinstance(d, int) else str(table.get(d, (1, 64, 512))[k]) for d in t.dims]
            shapes[k].append(f"{t.name}:{'x'.join(dims) or '1'}")
    return tuple(",".join(s) for s in shapes)


def trtexec_command(g, manifest) -> str:
    lo, opt, hi = profile(g, manifest)
    fp = "--fp16" if (g.precision or {}).get("compute") == "float16" else \
        "--bf16" if (g.precision or {}).get("compute") == "bfloat16" else ""
    return (f"trtexec --onnx={g.file} {fp} --minShapes={lo} --optShapes={opt} --maxShapes={hi} "
            f"--saveEngine={Path(g.file).stem}.plan").replace("  ", " ")


@register_target
class TensorRT(Target):
    name = "tensorrt"
    summary = "TensorRT: fp16, plain ONNX ops, optimisation profiles (trtexec)"

    def __init__(self):
        self.preset = {"dtype": "fp16", "attention": "default"}

    def check(self, bundle: Path, manifest):
        findings = []
        for g, model in graphs(bundle, manifest):
            findings += contrib_ops(g, model, ERROR, "TensorRT's ONNX parser has no com.microsoft ops "
                                                     "(export without --attention gqa / quantize / --optimize)")
            findings += ops_named(g, model, UNSUPPORTED, ERROR, "not imported by TensorRT 10's ONNX parser")
            findings += ops_named(g, model, CONTROL_FLOW, WARNING, "control flow: supported, but each branch is a "
                                                                   "separate subgraph and slows the engine")
            findings += ops_named(g, model, DATA_DEPENDENT, WARNING, "data-dependent output shape: needs an "
                                                                     "output allocator")
            findings += opset_above(g, model, MAX_OPSET, ERROR, "TensorRT 10's parser")
            findings.append(Finding(INFO, "build: " + trtexec_command(g, manifest), g.file))
        how = ["TensorRT 10.x ONNX-parser op table (TensorRT does not install here)"]
        if shutil.which("trtexec"):
            for g in manifest.graphs:
                if g.file.endswith(".onnx"):
                    res = subprocess.run(trtexec_command(g, manifest).split(), cwd=bundle, capture_output=True,
                                         text=True, timeout=3600)
                    if res.returncode != 0:
                        findings.append(Finding(ERROR, "trtexec failed: " + (res.stdout + res.stderr).strip()[-300:],
                                                g.file))
            how.append("trtexec (found on PATH): each graph built")
        return findings, how
