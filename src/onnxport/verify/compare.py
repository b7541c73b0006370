"""Numeric comparison of one output (numpy only)."""

from __future__ import annotations

import numpy as np


def compare(actual: np.ndarray, expected: np.ndarray, atol: float, min_cosine: float, rtol: float = 0.0) -> dict:
    """max|diff|, cosine and a verdict. The bound on max|diff| is `atol + rtol * max|reference|`:
    fp32 kernels differ by a relative ~1e-6, so a residual stream that reaches 1e3 differs by
    ~1e-3 without anything being wrong. NaN/Inf anywhere, or a shape mismatch, fails."""
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
    bound = atol + rtol * ref_max
    return {
        "ok": bool(diff <= bound and cos >= min_cosine),
        "max_abs_diff": diff,
        "cosine": cos,
        "snr_db": round(snr, 2) if np.isfinite(snr) else None,
        "max_abs_ref": ref_max,
        "bound": bound,
    }
