"""Frozen, validated configuration for each stage."""

from __future__ import annotations

from dataclasses import dataclass

from onnxport.errors import InputError

EXPORTERS = ("dynamo", "torchscript")
KV_LAYOUTS = ("bhsd", "bshd")
KV_NAMINGS = ("optimum", "seed")
DTYPES = ("float32",)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    exporter: str = "dynamo"
    kv_layout: str = "bhsd"
    kv_naming: str = "optimum"
    dtype: str = "float32"
    verify: bool = True
    force: bool = False
    allow_pickle: bool = False
    #: write weights to one `model.onnx.data` beside the graph when the model is larger than this
    external_data_threshold_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise InputError(f"unknown exporter {self.exporter!r}", f"use one of: {', '.join(EXPORTERS)}")
        if self.kv_layout not in KV_LAYOUTS:
            raise InputError(f"unknown kv layout {self.kv_layout!r}", f"use one of: {', '.join(KV_LAYOUTS)}")
        if self.kv_naming not in KV_NAMINGS:
            raise InputError(f"unknown kv naming {self.kv_naming!r}", f"use one of: {', '.join(KV_NAMINGS)}")
        if self.dtype not in DTYPES:
            raise InputError(
                f"dtype {self.dtype!r} is not supported yet", "export in float32 (the default)"
            )
        lo, hi = (18, 23) if self.exporter == "dynamo" else (14, 20)
        if not lo <= self.opset <= hi:
            raise InputError(
                f"opset {self.opset} is not supported by the {self.exporter} exporter",
                f"use an opset between {lo} and {hi}"
                + (" (or --exporter torchscript for opset 14-17)" if self.exporter == "dynamo" else ""),
            )


@dataclass(frozen=True)
class VerifyConfig:
    #: fp32 tolerances. ORT and PyTorch run the same fp32 math with different kernels and
    #: reduction orders; for logits of a normalised network that is ~1e-5 absolute. 1e-3 is
    #: two orders of margin yet catches any real graph error (wrong mask, rotary, layout).
    atol: float = 1e-3
    #: cosine similarity per output, flattened; a wrong op drops this far below 0.9999.
    min_cosine: float = 0.9999
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.atol > 0 and 0 < self.min_cosine <= 1):
            raise InputError("verify tolerances must be atol > 0 and 0 < min_cosine <= 1")
