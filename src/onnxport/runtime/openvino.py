"""OpenVINO as a second runtime: a bundle's graphs compiled by OpenVINO's CPU plugin, behind the
one call of onnxruntime.InferenceSession the runtime uses (`run(output_names, feeds)`), so the
same generation loop, checks and sealing run on it (`onnxport generate --runtime openvino`).

f32 inference precision is set explicitly: the CPU plugin's default on processors with bf16
support is bf16, which moved the demo model's logits by 0.087 (8.6e-6 at f32); so is turning off
the plugin's dynamic int8 quantization of activations for quantized weights. Inputs
backed by an initializer (`logits_to_keep`) are folded into constants by OpenVINO's ONNX reader,
so a feed for one of those is dropped: the graph then computes its default."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxport.errors import InputError


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINOSession:
    def __init__(self, path: Path, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise InputError("--runtime openvino needs the openvino package", "pip install openvino") from None
        core = ov.Core()
        # f32 compute, and no int8 quantization of the activations that meet int4/int8 weights
        # (on by default: it moved an int4 bundle's logits by 0.125, 1.3e-5 without)
        config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = {n for port in self.compiled.inputs for n in port.get_names()}
        self.outputs = {n: port for port in self.compiled.outputs for n in port.get_names()}

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer({k: v for k, v in feeds.items() if k in self.input_names})
        # the request reuses its output tensors on the next call: copy what is returned
        return [np.array(self.request.get_tensor(self.outputs[n]).data, copy=True) for n in output_names]
