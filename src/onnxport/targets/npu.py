"""NPU compilers (the LLM-TPU / AXERA pulsar2 / RKNN / TPU-MLIR flows the seed notes describe):
the static split layout at opset 13 with an argmax head and the rotary outside the blocks. Their
toolchains do not install here: the check is the contract they state - every dim fixed, opset
13, standard ONNX ops only, no control flow or data-dependent shapes, int32-friendly inputs."""

from __future__ import annotations

from pathlib import Path

from onnxport.targets import ERROR, INFO, WARNING, Finding, Target, register_target
from onnxport.targets.rules import (
    CONTROL_FLOW,
    DATA_DEPENDENT,
    contrib_ops,
    dtypes,
    dynamic_dims,
    graphs,
    ops_named,
    opset_above,
)


@register_target
class Npu(Target):
    name = "npu"
    summary = "NPU compilers: static split layout, opset 13, argmax head, rope outside"

    def __init__(self):
        self.preset = {"static": True, "layout": "split", "opset": 13, "head": "argmax", "rope": "outside"}

    def check(self, bundle: Path, manifest):
        findings = []
        if not manifest.is_split:
            findings.append(Finding(ERROR, "monolithic layout: NPU flows take the split layout "
                                           "(embedding / block_i / block_cache_i / lm_head; export with --target npu)"))
        for g, model in graphs(bundle, manifest):
            findings += dynamic_dims(g, ERROR)
            findings += opset_above(g, model, 13, WARNING, "most NPU toolchains (pulsar2, RKNN)")
            findings += contrib_ops(g, model, ERROR, "NPU compilers read standard ONNX ops only")
            findings += ops_named(g, model, CONTROL_FLOW, ERROR, "control flow: NPU graphs are straight-line")
            findings += ops_named(g, model, DATA_DEPENDENT - {"TopK"}, ERROR, "data-dependent output shape")
            findings += dtypes(g, {"bfloat16"}, ERROR, "NPU toolchains quantize from fp32 / fp16")
            findings += dtypes(g, {"int64"}, INFO, "several NPUs take int32 ids; cast on the host if yours does")
        return findings, ["the NPU contract of the seed notes (static shapes, opset 13, standard ops); "
                          "no NPU toolchain installs here"]

