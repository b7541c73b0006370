"""Next-token choice: greedy, or seeded sampling with temperature, top-k and top-p (numpy).

Order and semantics follow transformers' logits warpers: temperature, then top-k, then top-p
(smallest set whose probability mass reaches top_p; at least one token kept)."""

from __future__ import annotations

import numpy as np

from onnxport.errors import RuntimeInputError


class Sampler:
    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if do_sample and temperature <= 0:
            raise RuntimeInputError(f"temperature must be > 0, got {temperature}", "use greedy decoding for temperature 0")
        if top_k < 0:
            raise RuntimeInputError(f"top_k must be >= 0, got {top_k}", "use --top-k 0 (off) or a positive count")
        if not 0 < top_p <= 1:
            raise RuntimeInputError(f"top_p must be in (0, 1], got {top_p}", "use e.g. --top-p 0.9, or 1.0 (off)")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] -> token ids [batch]"""
        if not self.do_sample:
            return logits.argmax(axis=-1).astype(np.int64)
        x = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < x.shape[-1]:
            kth = np.partition(x, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1.0:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(probs, order, axis=-1)
            before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
            keep_sorted = before < self.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(axis=-1, keepdims=True)
        cdf = np.cumsum(probs, axis=-1)
        u = (1.0 - self.rng.random((probs.shape[0], 1))) * cdf[:, -1:]  # in (0, total]
        return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (-inf stays -inf)."""
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
