"""Numeric comparison of one output (numpy only).

Two rules, both relative to the reference's own scale, because fp32 rounding grows with the
size of what is summed and with depth (a trained 30-layer model's logits differ by 7e-3 between
ONNX Runtime and PyTorch, and by 4.5e-3 between PyTorch fp32 and PyTorch fp64, on the same
inputs; see config.VerifyConfig for the measured numbers behind each bound):

- tensors (hidden states, caches, encoder outputs): max|diff| <= atol + rtol * max|reference|;
- logits: per row (one position's scores over the vocabulary), max|diff| <= atol + spread * std
  of the reference row: what decides a token is the ordering of scores, whose scale is their
  spread, not their largest value.
  The greedy token can only change where the reference's top-2 gap is <= 2 * max|diff| of the
  row, so the bound also limits greedy flips to near-ties; the record counts them anyway, with
  the top-5 overlap, because that is what a user asks first.

Both also need cosine >= min_cosine over the whole output. NaN/Inf anywhere, or a shape
mismatch, fails.
"""

from __future__ import annotations

import numpy as np


def compare(actual: np.ndarray, expected: np.ndarray, tol, logits: bool = False) -> dict:
    """max|diff|, cosine, the bound and a verdict. `tol` carries atol, rtol, spread and
    min_cosine (a VerifyConfig). `logits`: the last axis is a vocabulary (the logits rule)."""
    if actual.shape != expected.shape:
        return {"ok": False, "error": f"shape {list(actual.shape)} != expected {list(expected.shape)}"}
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return {"ok": False, "error": "non-finite values", "max_abs_diff": float("nan"), "cosine": float("nan")}
    diff = float(np.max(np.abs(a - e))) if a.size else 0.0
    na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    if a.size == 0 or (na == 0 and ne == 0):
        cos = 1.0
    else:
        cos = float(a @ e / max(na * ne, 1e-30))
    noise = float(np.sum((a - e) ** 2))
    snr = float("inf") if noise == 0 else 10 * np.log10(max(float(e @ e), 1e-300) / noise)
    ref_max = float(np.max(np.abs(e))) if e.size else 0.0
    out = {"max_abs_diff": diff, "cosine": cos, "snr_db": round(snr, 2) if np.isfinite(snr) else None,
           "max_abs_ref": ref_max}
    if logits and expected.ndim >= 1 and expected.shape[-1] > 1 and a.size:
        out.update(_logits_rule(actual, expected, tol))
        within = out.pop("rows_within")
    else:
        out["bound"] = tol.atol + tol.rtol * ref_max
        within = diff <= out["bound"]
    out["ok"] = bool(within and cos >= tol.min_cosine)
    return out


def _logits_rule(actual: np.ndarray, expected: np.ndarray, tol) -> dict:
    vocab = expected.shape[-1]
    e = expected.reshape(-1, vocab).astype(np.float64)
    a = actual.reshape(-1, vocab).astype(np.float64)
    row_diff = np.abs(a - e).max(axis=-1)
    std = e.std(axis=-1)
    bounds = tol.atol + tol.spread * std
    worst = int(np.argmax(row_diff / bounds))
    top1 = a.argmax(-1) == e.argmax(-1)
    k = min(5, vocab)
    top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]
    top_e = np.argpartition(-e, k - 1, axis=-1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_e)])
    return {
        "rows_within": bool(np.all(row_diff <= bounds)),
        # max|diff| of the worst row (against its bound) in units of that row's std
        "spread_error": float(row_diff[worst] / std[worst]) if std[worst] > 0 else float("inf"),
        "spread_bound": tol.spread,
        "row_std": float(std[worst]),
        "bound": float(bounds[worst]),
        "greedy_equal": f"{int(top1.sum())}/{len(top1)}",
        "top5_overlap": round(float(overlap), 4),
    }


def describe(name: str, r: dict, min_cosine: float | None = None) -> str:
    """One line for a failed (or the worst) output: what was measured against which bound."""
    if "error" in r:
        return f"{name}: {r['error']}"
    cos = f"cosine {r['cosine']:.6f}" + (f" (min {min_cosine})" if min_cosine is not None else "")
    if "spread_error" in r:
        return (f"{name}: max|diff| {r['spread_error']:.3g} x the row's std {r['row_std']:.3g} (bound "
                f"{r['bound']:.3g} = atol + {r['spread_bound']:g} x std), {cos}, greedy tokens {r['greedy_equal']} equal")
    return (f"{name}: max|diff| {r['max_abs_diff']:.3g} (bound {r['bound']:.3g} = atol + rtol x max|ref| "
            f"{r['max_abs_ref']:.3g}), {cos}")
