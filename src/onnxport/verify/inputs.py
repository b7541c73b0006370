"""Shape sets and inputs for verifying a decoder graph (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShapeCase:
    batch: int
    seq: int
    past: int
    #: left padding in row 0: this many leading positions of attention_mask are 0
    left_pad: int = 0

    @property
    def label(self) -> str:
        s = f"batch={self.batch},seq={self.seq},past={self.past}"
        return s + (f",left_pad={self.left_pad}" if self.left_pad else "")


#: The shapes every decoder export is checked on: first decode step with an empty cache, a
#: batched prefill-after-cache with left padding (row 0 padded across its whole past and into
#: the new tokens), and a single-token decode after a longer cache.
DECODER_CASES = (
    ShapeCase(1, 1, 0),
    ShapeCase(2, 7, 5, left_pad=7),
    ShapeCase(1, 1, 33),
)


def decoder_feeds(spec: dict, case: ShapeCase, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    total = case.past + case.seq
    sizes = {
        "batch_size": case.batch,
        "sequence_length": case.seq,
        "past_sequence_length": case.past,
        "total_sequence_length": total,
    }
    mask = np.ones((case.batch, total), dtype=np.int64)
    mask[0, : case.left_pad] = 0
    # transformers' generate: positions count real tokens; padded slots get position 1.
    pos_full = np.cumsum(mask, axis=-1) - 1
    pos_full[mask == 0] = 1
    feeds: dict[str, np.ndarray] = {}
    for inp in spec["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in inp["dims"]]
        name = inp["name"]
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "position_ids":
            feeds[name] = pos_full[:, case.past :].astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape).astype(inp["dtype"])
    return feeds
