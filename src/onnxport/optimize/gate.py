"""`onnxport quantize`: weight-only int4 / int8 (MatMulNBits) of an exported fp32 decoder bundle,
behind a quality gate measured against the source bundle (held-out perplexity, greedy
agreement). The most sensitive layers move to int8 until the gate holds, and the manifest and
the CLI say how many layers left the requested bits and why. onnxruntime + numpy only."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from onnxport.bundle import DECODER, Manifest, atomic_bundle, external_locations, write_manifest
from onnxport.bundle.assemble import finish_bundle
from onnxport.config import QuantConfig
from onnxport.errors import InputError, VerificationError
from onnxport.optimize.bundle import source_decoder_bundle
from onnxport.runtime import Generator

log = logging.getLogger(__name__)


def quantize_bundle(bundle: str | Path, out: str | Path, cfg: QuantConfig = QuantConfig()) -> Manifest:
    """Weight-only int4/int8 (MatMulNBits) of a monolithic fp32 decoder bundle into a new
    bundle at `out`, gated: the held-out perplexity and greedy agreement of the quantized graph
    against the source bundle must meet `cfg`; the most sensitive layers move to int8 until
    they do, else nothing is written. onnxruntime + numpy only."""
    import math
    from dataclasses import replace

    from onnxport.optimize.quantize import (
        ESCALATION,
        QuantSpec,
        awq_scales,
        calibrate,
        gptq_codes,
        head_node,
        module_names,
        quantize_graph,
        sensitivity,
    )
    from onnxport.verify.quality import (
        calibration_split,
        greedy_agreement,
        greedy_tokens,
        logits_agreement,
        perplexity,
    )

    t0 = time.perf_counter()
    src = Path(bundle)
    manifest = source_decoder_bundle(src, "quantize")
    if (manifest.export.dtype or "float32") != "float32" or manifest.graph(DECODER).quantization:
        raise InputError(f"the bundle is already {manifest.export.dtype if manifest.export.dtype != 'float32' else 'quantized'}",
                         "quantize the float32 bundle")
    graph = manifest.graph(DECODER)
    reference = Generator(src)
    if cfg.calib:
        calib, held, prompts = calibration_split(read_calibration_text(Path(cfg.calib)), reference.tokenizer,
                                                 calib_tokens=cfg.calib_tokens)
    else:
        # calibration: Python's documentation as every CPython ships it; held out: onnxport's own text
        calib = default_calibration_tokens(reference.tokenizer, cfg.calib_tokens)
        _, held, prompts = calibration_split(default_calibration_text(), reference.tokenizer)
    if len(calib) < 16 or len(held) < 64:
        raise InputError(f"the calibration text gives {len(calib) + len(held)} tokens; at least 80 are needed",
                         "pass a longer --calib text")
    spec = QuantSpec(cfg.bits, cfg.block_size, cfg.symmetric, cfg.accuracy_level)
    # windows the model's positions allow (a long calibration text on a short-context model)
    window = min(512, (manifest.model.max_positions or 512) - 1)
    stats = calibrate(src / graph.file, [reference.prefill_feeds(calib[a:a + window]) for a in range(0, len(calib), window)
                                        if len(calib[a:a + window]) > 1])
    scales = awq_scales(src / graph.file, stats, spec) if cfg.method == "awq" else None
    head = head_node(src / graph.file) if cfg.head_bits == 8 and cfg.bits == 4 else None
    codes = gptq_codes(src / graph.file, stats, spec, skip={head}) if cfg.method == "gptq" and cfg.bits == 4 else None
    errors = sensitivity(src / graph.file, stats, spec, scales, codes)
    # the int8 errors, for the layers the gate may move there (recorded per layer; AWQ's scales
    # are folded into every layer, int8 ones included)
    errors8 = sensitivity(src / graph.file, stats, replace(spec, bits=8), scales) if cfg.bits == 4 else {}
    del stats
    if not errors:
        raise InputError("the decoder graph has no MatMul with a constant weight to quantize",
                         "export the bundle with onnxport export (dynamo exporter)")
    ppl_fp = perplexity(reference, held)
    ref_tokens = greedy_tokens(reference, prompts, cfg.agreement_tokens)  # once, for every attempt
    attempts = []
    with atomic_bundle(out, cfg.force, inputs=(src,)) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in {graph.file, *graph.external_data, "manifest.json"}:
                shutil.copy2(f, tmp / f.name)
        steps = ESCALATION if cfg.bits == 4 and cfg.escalate else (0.0,)
        for frac in steps:
            over = [n for n, e in errors.items() if cfg.max_error is not None and e > cfg.max_error and cfg.bits == 4]
            int8 = list(dict.fromkeys(([head] if head else []) + list(errors)[: math.ceil(frac * len(errors))] + over))
            if attempts and len(int8) == attempts[-1]["int8_layers"]:
                continue  # --max-error already moved these
            for f in (tmp / graph.file, tmp / (graph.file + ".data")):
                f.unlink(missing_ok=True)
            folded = quantize_graph(src / graph.file, tmp / graph.file, spec, int8, cfg.external_data_threshold_bytes,
                                    scales, cfg.embedding, codes)
            q = replace(graph, external_data=sorted(set(external_locations(tmp / graph.file))), files=None)
            qm = replace(manifest, graphs=[q if g is graph else g for g in manifest.graphs])
            write_manifest(tmp, qm)
            gen = Generator(tmp)
            ppl_q = perplexity(gen, held)
            agree = greedy_agreement(gen, ref_tokens, prompts, cfg.agreement_tokens)
            ok = ppl_q <= ppl_fp * (1 + cfg.max_ppl_increase) and (cfg.min_agreement is None or
                                                                   agree["fraction"] >= cfg.min_agreement)
            attempts.append({"int8_layers": len(int8), "perplexity": round(ppl_q, 4),
                             "agreement": agree["fraction"], "ok": ok})
            log.info("quantize: %d layers int8 -> ppl %.3f (fp %.3f), agreement %.3f", len(int8), ppl_q, ppl_fp,
                     agree["fraction"])
            if ok:
                # the kept graph against the source, teacher-forced on the held-out text
                teacher = logits_agreement(gen, reference, held)
                break
            del gen
        if not attempts[-1]["ok"]:
            raise VerificationError(
                f"int{cfg.bits} quality gate not met: held-out perplexity {ppl_q:.3f} vs {ppl_fp:.3f} "
                f"(max +{cfg.max_ppl_increase:.0%}), greedy agreement {agree['fraction']:.2f}"
                + (f" (min {cfg.min_agreement})" if cfg.min_agreement is not None else "")
                + (f" with {len(int8)} of {len(errors)} layers at int8" if int8 else ""),
                "loosen --max-ppl-increase / --min-agreement, use --bits 8 or a smaller --block-size; nothing was written")
        bits = {n: (8 if n in set(int8) else cfg.bits) for n in errors}
        fallback = None
        moved = [n for n in int8 if n != head]
        if moved and cfg.bits == 4:
            first = attempts[0]
            fallback = {"int8_layers": len(moved), "of": len(errors),
                        "why": (f"with {first['int8_layers']} layers at int8 the held-out perplexity was "
                                f"{first['perplexity']:.3f} vs the source's {ppl_fp:.3f} "
                                f"({first['perplexity'] / ppl_fp - 1:+.1%}; allowed +{cfg.max_ppl_increase:.0%})"
                                + (f" and greedy agreement {first['agreement']:.2f} (min {cfg.min_agreement})"
                                   if cfg.min_agreement is not None else "")
                                if not first["ok"] else
                                f"their relative output error exceeds --max-error {cfg.max_error}")}
            if len(int8) == len(errors) and not cfg.allow_fallback:
                raise VerificationError(
                    f"--bits 4: the quality gate moved all {len(errors)} layers to int8: {fallback['why']}",
                    "pass --allow-fallback to write the int8 result, or try --method awq, --asymmetric, a smaller "
                    "--block-size or a looser --max-ppl-increase; nothing was written")
        modules = module_names(src / graph.file)
        q.quantization = {
            "method": cfg.method, "bits": cfg.bits, "block_size": cfg.block_size, "symmetric": cfg.symmetric,
            "fallback": fallback, "head": {"node": head, "bits": 8} if head else None,
            "accuracy_level": cfg.accuracy_level or None, "format": "com.microsoft.MatMulNBits",
            "embedding": f"int{cfg.bits} GatherBlockQuantized" if cfg.embedding else "float32",
            "awq": {"scaled_groups": len(scales), "applied_as": "Mul by 1/s before each group, W * s packed"}
            if scales is not None else None,
            "layers": {f"int{b}": sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
            "bias_adds_folded": folded,
            "per_layer": [{"node": n, "module": modules.get(n), "bits": bits[n], "block_size": cfg.block_size,
                           # GPTQ codes are int4 only: its int8 layers are rounded to nearest
                           "method": cfg.method if bits[n] == cfg.bits or cfg.method != "gptq" else "rtn",
                           "accuracy_level": cfg.accuracy_level or None,
                           # the measured error of the weight as written: the int4 one, or the int8 one kept
                           "relative_error": round(e if bits[n] == cfg.bits else errors8[n], 5),
                           **({"int4_relative_error": round(e, 5)} if bits[n] != cfg.bits else {})}
                          for n, e in errors.items()],
            "perplexity": {"source": round(ppl_fp, 4), "quantized": round(ppl_q, 4), "heldout_tokens": len(held)},
            "greedy_agreement": agree,
            "logits": teacher,
            "gate": {"max_ppl_increase": cfg.max_ppl_increase, "min_agreement": cfg.min_agreement,
                     "max_error": cfg.max_error,
                     "calibration": cfg.calib or CORPUS, "calibration_tokens": len(calib),
                     "heldout": cfg.calib or "onnxport/data/calib.txt",
                     "attempts": attempts},
        }
        # the source's PyTorch comparison does not describe the quantized graph: its gate does
        qm.verification = {"ok": True, "kind": "quality gate against the source bundle",
                           "perplexity": q.quantization["perplexity"], "greedy_agreement": agree}
        qm.parts = [replace(p, verification=qm.verification) if p.name == DECODER else p for p in qm.parts]
        finish_bundle(None, tmp, qm, t0)
    return qm


#: the default calibration text (the held-out text is onnxport/data/calib.txt)
CORPUS = "pydoc_data.topics (Python's documentation, shipped with the interpreter)"


def default_calibration_tokens(tokenizer, n: int) -> list[int]:
    """The first `n` tokens of Python's own documentation as every CPython ships it
    (`pydoc_data.topics`: the language reference topics `help()` shows, ~465 KB of English)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids: list[int] = []
    chars = 8 * n
    while len(ids) < n and chars < 2 * len(text):
        ids = tokenizer.encode(text[:chars])
        chars *= 2
    return ids[:n]


def default_calibration_text() -> str:
    from importlib import resources

    return resources.files("onnxport").joinpath("data/calib.txt").read_text(encoding="utf-8")


def read_calibration_text(path: Path) -> str:
    """--calib: a UTF-8 text file."""
    if not path.is_file():
        raise InputError(f"--calib {path} is not a file", "pass a text file (e.g. documentation in your model's domain)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--calib {path} is not UTF-8 text (byte {e.start} cannot be decoded)",
                         "pass a plain text file") from None
    if "\x00" in text:
        raise InputError(f"--calib {path} holds NUL bytes: it is not text", "pass a plain text file")
    return text
