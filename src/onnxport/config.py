"""Frozen, validated configuration for each stage."""

from __future__ import annotations

from dataclasses import dataclass

from onnxport.errors import InputError
from onnxport.spec import KV_LAYOUTS, KV_NAMINGS

EXPORTERS = ("dynamo", "torchscript")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    exporter: str = "dynamo"  # "auto" picks dynamo for opset >= 18, else torchscript
    kv_layout: str = "bhsd"
    kv_naming: str = "optimum"
    #: float32; float16 (fp16 compute, nodes past fp16's range kept in fp32 by the precision
    #: guard); bfloat16 (weights stored in bf16, fp32 compute). The model is always traced and
    #: verified in float32; the graph is converted after export (optimize/precision.py).
    dtype: str = "float32"
    #: fp16 guard: a node is kept in fp32 when a value it reads or writes reaches
    #: 65504 / fp16_headroom on the sample inputs
    fp16_headroom: float = 8.0
    #: ONNX Runtime fusions on the decoder graph (optimize/fusions.py), kept only if re-verified
    optimize: bool = False
    #: encoder / module graphs with more weight bytes than this are cut into consecutive part
    #: graphs under it, chained by the runtime (optimize/partition.py); None: one file each
    max_graph_bytes: int | None = None
    #: with dtype bfloat16: compute in bf16 too (for GPU / TensorRT; ONNX Runtime's CPU
    #: provider has no bf16 kernels, so it is verified on a CPU emulation twin), instead of
    #: bf16-stored weights with fp32 compute
    bf16_compute: bool = False
    #: decoder attention: "default" (the model's own ops) or "gqa" (one
    #: com.microsoft.GroupQueryAttention node per layer, export/attention.py; dynamo only)
    attention: str = "default"
    verify: bool = True
    force: bool = False
    allow_pickle: bool = False
    #: write weights to one `model.onnx.data` beside the graph when the model is larger than this
    external_data_threshold_bytes: int = 1 << 30
    #: trace on the meta device and stream weights from the checkpoint into the graph one tensor
    #: at a time (monolithic decoders from safetensors; verification then loads the model)
    low_memory: bool = False
    #: rewrites not to apply (by name; `onnxport patches` lists them)
    skip_patches: tuple[str, ...] = ()
    #: set when exporter="auto" resolved to dynamo: encoders/modules retry with TorchScript when
    #: dynamo fails (decoders are exported with one exporter)
    fallback: bool = False
    #: trace two decoder layers and copy the second for the others when all layers are alike
    #: (export/stamp.py); False traces every layer
    stamp: bool = True
    #: write a stamped decoder's weights while its graph is traced (bundle/weights.py
    #: EarlyWeights); False writes them when the graph is saved. Same bundle either way.
    early_weights: bool = True
    #: reuse a stamped decoder's short trace kept by an earlier export of the same architecture
    #: with the same code and versions, and keep new ones (export/template.py; the folder is
    #: $ONNXPORT_TEMPLATES, else ~/.cache/onnxport/templates; ONNXPORT_TEMPLATES=off disables it too)
    template_cache: bool = True
    #: `--target T`: the preset these options came from, recorded in the manifest
    #: ({"name", "flags"}; targets/)
    target: dict | None = None

    @property
    def trace_dtype(self) -> str:
        """The dtype the model is loaded, traced and verified in (conversion comes after)."""
        return "float32"

    def __post_init__(self) -> None:
        if self.exporter == "auto":
            object.__setattr__(self, "exporter", "dynamo" if self.opset >= 18 else "torchscript")
            object.__setattr__(self, "fallback", self.exporter == "dynamo")
        if self.exporter not in EXPORTERS:
            raise InputError(f"unknown exporter {self.exporter!r}", f"use one of: {', '.join(EXPORTERS)}")
        if self.kv_layout not in KV_LAYOUTS:
            raise InputError(f"unknown kv layout {self.kv_layout!r}", f"use one of: {', '.join(KV_LAYOUTS)}")
        if self.kv_naming not in KV_NAMINGS:
            raise InputError(f"unknown kv naming {self.kv_naming!r}", f"use one of: {', '.join(KV_NAMINGS)}")
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}", "use --dtype fp32, fp16 or bf16")
        if self.attention not in ("default", "gqa"):
            raise InputError(f"unknown attention {self.attention!r}", "use --attention default or gqa")
        if self.attention == "gqa" and self.exporter != "dynamo":
            raise InputError("--attention gqa needs the dynamo exporter (opset >= 18)",
                             "drop --attention gqa, or use --exporter dynamo")
        if self.max_graph_bytes is not None and self.max_graph_bytes <= 0:
            raise InputError(f"--max-graph-size must be positive, got {self.max_graph_bytes}")
        if self.bf16_compute and self.dtype != "bfloat16":
            raise InputError("--bf16-compute goes with --dtype bf16", "add --dtype bf16, or drop --bf16-compute")
        if not self.fp16_headroom >= 1:
            raise InputError(f"fp16 headroom must be >= 1, got {self.fp16_headroom}")
        lo, hi = (18, 23) if self.exporter == "dynamo" else (13, 20)
        if not lo <= self.opset <= hi:
            raise InputError(
                f"opset {self.opset} is not supported by the {self.exporter} exporter",
                f"use an opset between {lo} and {hi}"
                + (" (or --exporter torchscript for opset 13-17)" if self.exporter == "dynamo" else ""),
            )


#: (atol, rtol, spread, min_cosine) per converted dtype, against the fp32 PyTorch model (the
#: rules are VerifyConfig's). Measured worst cases over the four decoder shapes, on the model's
#: own caches (verify/decoder.model_made_past), logits in units of the row's std, tensors
#: relative to their max|ref|; SmolLM2-135M-Instruct (30 layers) / the demo model (4 layers):
#:   fp16 compute      logits 0.016 / 0.0033, caches 2.6e-3 / 2.3e-3, cosine >= 0.9999999
#:   bf16 weights      logits 0.105 / 0.019,  caches 1.2e-2 / 4.9e-3, cosine >= 0.999996
#:   bf16 compute      logits 0.84  / 0.063,  caches 5.5e-2 / 2.3e-2, cosine >= 0.99926
#:                     (CPU emulation; one greedy flip of 12 at a near-tie on SmolLM2)
#: Each bound keeps ~3x over the deeper model's number; fp16 keeps more because its error grows
#: with width and depth (a Llama-2-7B-shaped model, 32 layers of 4096: logits off by ~5 % of
#: their scale). A graph error (mask, rotary, layout, a wrong weight) moves logits by O(std)
#: and cosine far below these floors.
DTYPE_TOLERANCES = {
    "float16": (5e-3, 2e-2, 1e-1, 0.9995),
    "bfloat16": (2e-2, 5e-2, 3e-1, 0.999),
    "bfloat16-compute": (5e-2, 1.5e-1, 2.5, 0.995),
}


@dataclass(frozen=True)
class VerifyConfig:
    """What "ONNX Runtime agrees with PyTorch" means (verify/compare.py applies it):

    - tensors (hidden states, caches, encoder outputs): max|diff| <= atol + rtol * max|ref|;
    - logits, per row: max|diff| <= atol + spread * std of the reference row;
    - every output: cosine >= min_cosine.

    The fp32 numbers, measured ONNX Runtime against PyTorch (worst over the four decoder
    shapes, on the model's own caches): SmolLM2-135M-Instruct logits 3.0e-5 x the row's std,
    caches 3.3e-6 of max|ref|; its split blocks (random hidden states of ~1e3 in a few
    channels) 4.5e-6 of max|ref|; the demo model 2.9e-6 / 1.1e-6. PyTorch fp32 itself is no
    closer to exact arithmetic: on SmolLM2 with random caches it differs from PyTorch fp64 by
    4.5e-3 where ONNX Runtime differs by 3.6e-3 (0.15-0.2 % of the row's std; random caches
    make attention peaked, which amplifies rounding). The logits bound keeps 5x over that
    amplified case (300x over the model's own caches), the tensor bound 20x; atol is the
    floor for values near zero (tiny random models). Still failing: a 1 % gain error, one
    logit moved by a tenth of the row's std, one position's row swapped (tests/test_verify.py)."""

    #: absolute floor of both rules (values near zero)
    atol: float = 1e-3
    #: tensors: max|diff| <= atol + rtol * max|ref|
    rtol: float = 1e-4
    #: logits: max|diff| of each row <= atol + spread * the std of the reference row
    spread: float = 1e-2
    #: cosine similarity per output, flattened; a wrong op drops this far below 0.9999.
    min_cosine: float = 0.9999
    seed: int = 0
    #: the graph dtype these tolerances are for
    dtype: str = "float32"
    #: ONNX Runtime runs a graph whose weights pass this many bytes one segment at a time
    #: (runtime/segments.py), so verifying a model larger than memory stays bounded. With the
    #: model in memory (no --low-memory) segments start past a quarter of the available memory
    #: instead, when that is more (segments.segment_budget)
    segment_bytes: int = 1 << 30

    def for_dtype(self, dtype: str) -> VerifyConfig:
        """The tolerances for a graph in `dtype` (against the fp32 PyTorch model). float32
        keeps this config's; the others are written down in DTYPE_TOLERANCES."""
        if dtype == "float32":
            return self
        atol, rtol, spread, min_cosine = DTYPE_TOLERANCES[dtype]
        return VerifyConfig(atol=atol, rtol=rtol, spread=spread, min_cosine=min_cosine, seed=self.seed, dtype=dtype,
                            segment_bytes=self.segment_bytes)

    def record(self) -> dict:
        """The tolerance as the manifest records it."""
        return {"atol": self.atol, "rtol": self.rtol, "spread": self.spread, "min_cosine": self.min_cosine,
                "dtype": self.dtype}

    def __post_init__(self) -> None:
        if not (self.atol > 0 and self.rtol >= 0 and self.spread > 0 and 0 < self.min_cosine <= 1):
            raise InputError("verify tolerances must be atol > 0, rtol >= 0, spread > 0 and 0 < min_cosine <= 1")
        if self.segment_bytes <= 0:
            raise InputError(f"the verification segment size must be positive, got {self.segment_bytes}")


@dataclass(frozen=True)
class SplitConfig:
    pack: int = 1
    static: bool = False
    max_len: int = 512
    prefill_len: int = 128
    head: str = "logits"  # logits | argmax | topk:K
    rope: str = "inside"  # inside | outside
    embedding_bin: bool = False
    #: store each weight once in `weights.data`, read by every graph (prefill and decode blocks,
    #: a tied embedding and lm_head); False keeps every graph self-contained, for toolchains
    #: that compile one file at a time
    share_weights: bool = True
    #: pick `pack` (layers per block graph) as the most layers whose weights stay under this
    #: many bytes (--max-graph-size); None: use `pack`
    max_graph_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_graph_bytes is not None and self.max_graph_bytes <= 0:
            raise InputError(f"--max-graph-size must be positive, got {self.max_graph_bytes}")
        if self.pack < 1:
            raise InputError(f"--pack must be >= 1, got {self.pack}")
        if self.rope not in ("inside", "outside"):
            raise InputError(f"--rope must be inside or outside, got {self.rope!r}")
        if not (self.head in ("logits", "argmax") or (self.head.startswith("topk:") and self.head[5:].isdigit()
                                                       and int(self.head[5:]) > 0)):
            raise InputError(f"--head must be logits, argmax or topk:K, got {self.head!r}", "e.g. --head topk:8")
        if self.static and not (1 <= self.prefill_len <= self.max_len):
            raise InputError(
                f"--prefill-len {self.prefill_len} must be between 1 and --max-len {self.max_len}",
                "the prompt is prefilled into the same cache",
            )

    @property
    def top_k(self) -> int:
        return int(self.head[5:]) if self.head.startswith("topk:") else 0


@dataclass(frozen=True)
class QuantConfig:
    """`onnxport quantize`: weight-only MatMulNBits with a quality gate."""

    bits: int = 4
    block_size: int = 32
    #: rtn: round to nearest per block; awq: activation-aware per-channel scales first; gptq:
    #: rounding errors compensated through the calibration activations' inverse Hessian
    method: str = "rtn"
    symmetric: bool = True
    #: MatMulNBits accuracy_level (0 = unset: fp32 compute; 4 = int8 compute, faster on CPU)
    accuracy_level: int = 0
    #: calibration / held-out text file (default: Python's documentation calibrates, the text
    #: shipped in onnxport/data/calib.txt is held out)
    calib: str | None = None
    #: gate: held-out perplexity at most (1 + this) x the source bundle's
    max_ppl_increase: float = 0.10
    #: gate: fraction of greedy tokens equal to the source bundle's (None: not gated, reported)
    min_agreement: float | None = None
    #: gate: layers whose relative output error on the calibration set exceeds this start at int8
    max_error: float | None = None
    agreement_tokens: int = 32
    #: int4: move the most sensitive layers to int8 until the gate holds
    escalate: bool = True
    #: int4: accept a result the gate moved entirely to int8 (otherwise an error: a user who
    #: asked for int4 does not silently get int8)
    allow_fallback: bool = False
    #: also quantize the token embedding table (GatherBlockQuantized, same bits and block)
    embedding: bool = False
    #: int4: the output head (lm_head, tied or not) at these bits instead (8: as llama.cpp's
    #: Q4_K_M keeps output.weight at 6 bits; None: like every other layer)
    head_bits: int | None = None
    #: calibration tokens (AWQ scales, GPTQ Hessians, per-layer errors): of Python's documentation
    #: by default (the gate holds out onnxport/data/calib.txt), or the first of a --calib text
    #: (the gate holds out the 1024 after them)
    calib_tokens: int = 4096
    force: bool = False
    external_data_threshold_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InputError(f"--bits must be 4 or 8, got {self.bits}", "use --bits 4 (int4) or --bits 8 (int8)")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise InputError(f"--block-size must be 16, 32, 64, 128 or 256, got {self.block_size}",
                             "use --block-size 32 (the default) or another power of two from 16 to 256")
        if self.method not in ("rtn", "awq", "gptq"):
            raise InputError(f"unknown --method {self.method!r}", "use --method rtn, awq or gptq")
        if self.head_bits not in (None, 4, 8):
            raise InputError(f"--head-bits must be 4 or 8, got {self.head_bits}", "use --head-bits 8 (or leave it out)")
        if self.calib_tokens < 16:
            raise InputError(f"--calib-tokens must be at least 16, got {self.calib_tokens}", "use --calib-tokens 384 or more")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"--accuracy-level must be 0-4, got {self.accuracy_level}",
                             "0 = fp32 compute (default), 4 = int8 compute")
        if self.max_ppl_increase < 0 or (self.min_agreement is not None and not 0 <= self.min_agreement <= 1):
            raise InputError("--max-ppl-increase must be >= 0 and --min-agreement between 0 and 1",
                             "e.g. --max-ppl-increase 0.1 --min-agreement 0.5")
        if self.max_error is not None and self.max_error <= 0:
            raise InputError(f"--max-error must be > 0, got {self.max_error}", "e.g. --max-error 0.05")


def parse_size(text: str) -> int:
    """'2GB', '1.5GiB', '500MB', '4096' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text or "")
    if not m:
        raise InputError(f"cannot read the size {text!r}", "write it like 2GB, 1.5GiB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)
