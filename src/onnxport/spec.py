"""The shared vocabulary, torch-free: tensor specs, KV-cache specs with their names and dims,
attention masks, and the one feed generator that export (example inputs) and verify (inputs
at several shapes) both use. Every stage may import this module; it imports no stage.

A tensor's dims are ints (static) or names (dynamic): `batch_size`, `sequence_length`,
`past_sequence_length`, `total_sequence_length`, or a part's own (`num_patches`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: named dims of decoder graphs
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
#: the additive mask's "blocked" value (float32 min, as transformers uses)
MASK_MIN = float(np.finfo(np.float32).min)
KV_LAYOUTS = ("bhsd", "bshd")
KV_NAMINGS = ("optimum", "seed")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, dtype (numpy/ONNX name), dims (int or dim name).
    `sizes` gives example sizes of named dims; `low`/`high` the value range of int inputs."""

    name: str
    dtype: str
    dims: tuple
    sizes: tuple = ()  # ((dim name, example size), ...)
    low: int = 0
    high: int = 2

    def io(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


# --- KV cache ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateSpec:
    """One fixed-size recurrent state of a layer (mamba / linear attention): `kind` is `conv`
    (the last kernel-size inputs of a causal conv) or `recurrent` (the ssm / delta-rule
    state); `index` numbers a layer's states of one kind; `shape` excludes the batch dim."""

    kind: str
    index: int
    shape: tuple[int, ...]

    @property
    def suffix(self) -> str:
        return f"{self.kind}_state" + (f"_{self.index}" if self.index else "")


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache tensors: heads and head widths of key and value (they differ for MLA;
    0 heads: the layer keeps no key/value, e.g. a mamba layer), and its recurrent states."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    states: tuple[StateSpec, ...] = ()
    #: width of a sparse-attention (DSA) indexer key cache, [batch, seq, indexer_dim]; 0: none
    indexer_dim: int = 0

    @property
    def has_kv(self) -> bool:
        return self.key_heads > 0


@dataclass(frozen=True)
class KVSpec:
    layers: tuple[LayerKV, ...]
    #: the model keeps its self-attention cache inside an encoder-decoder cache (BERT-like
    #: models used as decoders); the cross-attention half stays empty
    encoder_decoder: bool = False

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, head_dim: int) -> KVSpec:
        return cls(tuple(LayerKV(num_kv_heads, head_dim, num_kv_heads, head_dim) for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return next((x.key_heads for x in self.layers if x.has_kv), 0)

    @property
    def head_dim(self) -> int:
        return next((x.key_dim for x in self.layers if x.has_kv), 0)

    @property
    def is_uniform(self) -> bool:
        return (len(set(self.layers)) == 1 and self.layers[0].key_dim == self.layers[0].value_dim
                and not self.has_states and not self.has_indexer)

    @property
    def is_empty(self) -> bool:
        """No cache at all (the model returns none): the graph reads the whole sequence per call."""
        return not self.layers

    @property
    def has_indexer(self) -> bool:
        return any(layer.indexer_dim for layer in self.layers)

    @property
    def has_states(self) -> bool:
        """Recurrent state in some layer: the graph then takes one token per call (see
        `cache_entries`), as transformers' own step path does."""
        return any(layer.states for layer in self.layers)


@dataclass(frozen=True)
class CacheEntry:
    """One flat cache tensor: past (input) and present (output) names, its layer, and what it
    holds (`key`, `value`, or a StateSpec's suffix)."""

    past: str
    present: str
    layer: int
    what: str


def cache_entries(kv: KVSpec, naming: str = "optimum") -> list[CacheEntry]:
    """Every flat cache tensor in graph order: per layer key, value (layers that keep them),
    a DSA indexer key cache (`past_key_values.{i}.indexer_key`), then the layer's states
    (`past_key_values.{i}.conv_state` -> `present.{i}.conv_state`)."""
    out = []
    for i, layer in enumerate(kv.layers):
        if layer.has_kv:
            past, present = kv_names(i + 1, naming)
            out += [CacheEntry(past[-2], present[-2], i, "key"), CacheEntry(past[-1], present[-1], i, "value")]
        if layer.indexer_dim:
            out.append(CacheEntry(f"past_key_values.{i}.indexer_key", f"present.{i}.indexer_key", i, "indexer_key"))
        for st in layer.states:
            out.append(CacheEntry(f"past_key_values.{i}.{st.suffix}", f"present.{i}.{st.suffix}", i, st.suffix))
    return out


def cache_dims(layer: LayerKV, what: str, layout: str, seq, batch=BATCH) -> list:
    """Dims of one flat cache tensor: a key/value with sequence dim `seq`, or a fixed state."""
    if what in ("key", "value"):
        return kv_dims(layer, what, layout, seq, batch)
    if what == "indexer_key":
        return [batch, seq, layer.indexer_dim]
    st = next(s for s in layer.states if s.suffix == what)
    return [batch, *st.shape]


def kv_names(num_layers: int, naming: str = "optimum") -> tuple[list[str], list[str]]:
    """Flat past (input) and present (output) names, key before value, layer by layer."""
    past, present = [], []
    for i in range(num_layers):
        if naming == "seed":
            past += [f"past_key_in{i}", f"past_value_in{i}"]
            present += [f"past_key{i}", f"past_value{i}"]
        else:
            past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            present += [f"present.{i}.key", f"present.{i}.value"]
    return past, present


def kv_dims(layer: LayerKV, which: str, layout: str, seq, batch=BATCH) -> list:
    """Dims of one cache tensor (`which` = key | value) in `layout` with sequence dim `seq`."""
    heads, dim = (layer.key_heads, layer.key_dim) if which == "key" else (layer.value_heads, layer.value_dim)
    return [batch, seq, heads, dim] if layout == "bshd" else [batch, heads, seq, dim]


def seq_axis(layout: str) -> int:
    return 1 if layout == "bshd" else 2


# --- masks ------------------------------------------------------------------------------------

def additive_mask(q_pos: np.ndarray, k_pos: np.ndarray, valid: np.ndarray, window: int | None) -> np.ndarray:
    """[1, 1, q, k] float32: 0 where a query may attend a key (causal, valid, inside the window)."""
    ok = valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        ok &= (q_pos[:, None] - k_pos[None, :]) < window
    return np.where(ok, 0.0, MASK_MIN).astype(np.float32)[None, None]


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [batch, longest] int64 of token rows padded on the left, as transformers'
    generate batches them: `pad` in the padded slots, mask 0 there."""
    return _pad(rows, pad, right=False)


def right_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) as `left_pad`, padded on the right: for graphs whose positions and cache
    slots come from the mask's row sums (`padding: right`)."""
    return _pad(rows, pad, right=True)


def _pad(rows: list[list[int]], pad: int, right: bool) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for r, row in enumerate(rows):
        if len(row):
            at = slice(0, len(row)) if right else slice(longest - len(row), longest)
            ids[r, at] = row
            mask[r, at] = 1
    return ids, mask


def padded_positions(mask: np.ndarray, pad_position: int = 1) -> np.ndarray:
    """transformers' generate: positions count real tokens; padded slots get `pad_position`
    (1 in 4.x, 0 in 5.x: the manifest's `model.pad_position`)."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = pad_position
    return pos.astype(np.int64)


# --- the one feed generator -------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeCase:
    """Sizes for one verification (or tracing) run of a decoder graph."""

    batch: int
    seq: int
    past: int
    #: left padding in row 0: this many leading positions of attention_mask are 0
    left_pad: int = 0
    #: right padding in row 0 (`padding: right` graphs): this many positions at the end of
    #: the prompt are 0 (the last new tokens of a prefill, else the last past slots)
    right_pad: int = 0

    @property
    def label(self) -> str:
        s = f"batch={self.batch},seq={self.seq},past={self.past}"
        return s + (f",left_pad={self.left_pad}" if self.left_pad else "") + (
            f",right_pad={self.right_pad}" if self.right_pad else "")

    @property
    def padded(self) -> bool:
        return bool(self.left_pad or self.right_pad)

    @property
    def sizes(self) -> dict:
        return {BATCH: self.batch, SEQ: self.seq, PAST: self.past, TOTAL: self.past + self.seq}


#: The shapes every decoder export is checked on: first decode step with an empty cache, a
#: batched left-padded prefill from an empty cache (what generation starts with; models that
#: branch on the cache length in Python are traced with a cache, so this catches them), a
#: batched prefill-after-cache with left padding (row 0 padded across its whole past and into
#: the new tokens), and a single-token decode after a longer cache.
DECODER_CASES = (
    ShapeCase(1, 1, 0),
    ShapeCase(2, 6, 0, left_pad=3),
    ShapeCase(2, 7, 5, left_pad=7),
    ShapeCase(1, 1, 33),
)
#: GroupQueryAttention graphs (`--attention gqa`): ONNX Runtime's kernel takes a prompt that
#: continues a cache one row at a time, so that case runs at batch 1 (generation never does it:
#: it prefills from an empty cache, then feeds one token per step), and a batched decode step
#: with a left-padded row takes its place
GQA_CASES = (
    ShapeCase(1, 1, 0),
    ShapeCase(2, 6, 0, left_pad=3),
    ShapeCase(1, 7, 5),
    ShapeCase(2, 1, 33, left_pad=4),
)
#: GroupQueryAttention graphs with the rotary inside (`padding: right`, optimize/gqa_rotary.py):
#: a right-padded batched prefill, a prompt continuing a cache (batch 1), and a batched decode
#: step whose row 0 has padding between its prompt and the new token, as the generator leaves it
GQA_RIGHT_CASES = (
    ShapeCase(1, 1, 0),
    ShapeCase(2, 6, 0, right_pad=3),
    ShapeCase(1, 7, 5),
    ShapeCase(2, 1, 33, right_pad=4),
)
#: example sizes for tracing: all distinct and > 1 so that no dynamic dim is specialised or
#: unified with another by the exporter (torch.export specialises sizes 0 and 1)
TRACE_CASE = ShapeCase(2, 3, 5)
#: graphs with recurrent state take one token per call: checked at these shapes (the states
#: are random, as a cache is)
STEP_CASES = (
    ShapeCase(1, 1, 0),
    ShapeCase(2, 1, 5, left_pad=3),
    ShapeCase(1, 1, 33),
)
STEP_TRACE_CASE = ShapeCase(2, 1, 5)
#: graphs without a cache: the whole (left-padded) sequence each call
FULL_CASES = (
    ShapeCase(1, 1, 0),
    ShapeCase(2, 7, 0, left_pad=3),
    ShapeCase(1, 33, 0),
)
FULL_TRACE_CASE = ShapeCase(2, 5, 0)


def feeds(inputs: list[TensorSpec], sizes: dict, seed: int = 0, vocab_size: int = 2, *, past: int = 0,
          left_pad: int = 0, right_pad: int = 0, window: int | None = None, static_cache: bool = False) -> dict[str, np.ndarray]:
    """Inputs for the graph inputs `inputs` at `sizes` (named dim -> size).

    Token ids are random in [0, vocab_size); a 2-D `attention_mask` is a 0/1 padding mask with
    `left_pad` zeros in row 0; a 4-D one (split layouts) is the additive causal mask for queries
    at positions `past`.., keys over the whole cache (`static_cache`: slots past the written
    ones are blocked, the new token's key sits in the last slot), `sliding_attention_mask`
    also windowed; `position_ids` follow the mask; everything else is standard normal (at
    fp16 precision whatever the dtype: the same values for a graph and its fp16 version)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    total = sizes.get(TOTAL)
    mask2d = None
    if total is not None and BATCH in sizes:
        mask2d = np.ones((sizes[BATCH], total), dtype=np.int64)
        mask2d[0, :left_pad] = 0
        if right_pad:  # the prompt's end: the new tokens of a prefill, else the past
            end = sizes.get(PAST) or total
            mask2d[0, end - right_pad:end] = 0
    for inp in inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in inp.dims]
        name, dtype = inp.name, np.dtype(inp.dtype)
        if name == "input_ids":
            out[name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
            if mask2d is not None and len(shape) == 2 and shape[0] == mask2d.shape[0]:
                # padded slots hold token 0, as the generator feeds them (a pad embedding is
                # often all zeros: RMSNorm's eps is all that keeps it finite)
                out[name][mask2d[:, total - shape[1]:] == 0] = 0
        elif name == "attention_mask" and len(shape) == 2:
            out[name] = mask2d if mask2d is not None else np.ones(shape, dtype=np.int64)
        elif name.endswith("attention_mask") and len(shape) == 4:
            q, t = shape[2], shape[3]
            q_pos = np.arange(past, past + q)
            if static_cache:
                k_pos = np.concatenate([np.arange(t - 1), [past]])
                valid = np.ones(t, dtype=bool)
                valid[past:t - 1] = False
            else:
                k_pos, valid = np.arange(t), np.ones(t, dtype=bool)
            out[name] = additive_mask(q_pos, k_pos, valid, window if name.startswith("sliding") else None)
        elif name == "position_ids" and len(shape) == 3:
            # multimodal rotary ids [axes, batch, seq]: each axis its own offset, so the graph
            # is checked with axes that differ (as for image tokens), not just equal text ids
            base = (padded_positions(mask2d)[:, total - shape[-1]:] if mask2d is not None and shape[1] == mask2d.shape[0]
                    else np.broadcast_to(np.arange(past, past + shape[-1], dtype=np.int64), shape[1:]))
            out[name] = np.stack([base + 3 * a for a in range(shape[0])]).astype(np.int64)
        elif name == "position_ids":
            if mask2d is not None and shape[0] == mask2d.shape[0]:
                out[name] = padded_positions(mask2d)[:, total - shape[-1]:]
            else:
                out[name] = np.arange(past, past + shape[-1], dtype=np.int64)[None]
        elif dtype.kind in "iub":
            out[name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            # drawn at fp16 precision, so a graph converted to fp16 gets the very values its
            # fp32 original got (and the PyTorch reference computed for it still applies)
            out[name] = rng.standard_normal(shape).astype(np.float16).astype(dtype)
    return out
