"""Data-dependent preprocessing that lives OUTSIDE the graphs (numpy only, no torch).

Index maps and masks that depend on the input's grid or lengths (window order, packed-sequence
masks, chunk padding) need Python loops and `.tolist()`; no exporter can put them in a graph
that stays valid for other inputs, and NPU compilers want static graphs anyway. onnxport exports
the encoder with these tensors as inputs and computes them here, from what the manifest records
(`graphs[i].preprocess` names the function, `graphs[i].meta` holds its constants). The tests
check each function against the transformers code it replaces.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

NEG = np.finfo(np.float32).min

PREPROCESSORS: dict[str, Callable] = {}


def preprocessor(name: str):
    def deco(fn):
        PREPROCESSORS[name] = fn
        return fn

    return deco


def block_diagonal_mask(cu_seqlens, length: int | None = None) -> np.ndarray:
    """Additive attention mask [1, 1, S, S] of a packed sequence: 0 within a segment
    (cu_seqlens[i] <= q, k < cu_seqlens[i+1]), float32-min across segments."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    length = int(cu[-1]) if length is None else length
    segment = np.searchsorted(cu[1:], np.arange(length), side="right")
    same = segment[:, None] == segment[None, :]
    return np.where(same, 0.0, NEG).astype(np.float32)[None, None]


# --- Qwen2.5-VL vision (transformers.vision_utils, rewritten in numpy) ---------------------------

def vision_position_ids(grid_thw, merge: int) -> np.ndarray:
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def vision_cu_seqlens(grid_thw) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)


def vision_window_index(grid_thw, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    window_index, cu = [], [0]
    offset = 0
    win = window_size // merge // patch_size
    unit = merge * merge
    for t, h, w in np.asarray(grid_thw).tolist():
        lh, lw = h // merge, w // merge
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = win - lh % win, win - lw % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return np.concatenate(window_index).astype(np.int64), cu_arr[keep]


@preprocessor("qwen2_5_vl_vision")
def qwen2_5_vl_vision(pixel_values: np.ndarray, grid_thw, meta: dict) -> dict[str, np.ndarray]:
    """Graph feeds for the Qwen2.5-VL vision encoder from processor outputs (pixel_values
    [num_patches, C*T*P*P], grid_thw [num_images, 3])."""
    merge, window, patch = meta["spatial_merge_size"], meta["window_size"], meta["patch_size"]
    n = pixel_values.shape[0]
    window_index, cu_window = vision_window_index(grid_thw, merge, window, patch)
    return {
        "pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
        "position_ids": vision_position_ids(grid_thw, merge),
        "window_index": window_index,
        "attention_mask": block_diagonal_mask(vision_cu_seqlens(grid_thw), n),
        "window_attention_mask": block_diagonal_mask(cu_window, n),
    }


# --- Qwen2.5-Omni audio (transformers' chunk_and_pad_features & co., in numpy) --------------------

@preprocessor("qwen2_5_omni_audio")
def qwen2_5_omni_audio(input_features: np.ndarray, feature_lens, meta: dict) -> dict[str, np.ndarray]:
    """Graph feeds for the Qwen2.5-Omni audio encoder from concatenated mel features
    [num_mel_bins, total_frames] and per-clip frame counts."""
    chunk = meta["n_window"] * 2
    lens = np.asarray(feature_lens, dtype=np.int64)
    chunk_lengths = []
    for n in lens.tolist():
        full, tail = divmod(n, chunk)
        chunk_lengths += [chunk] * full + ([tail] if tail else [])
    chunk_lengths = np.asarray(chunk_lengths, dtype=np.int64)
    longest = int(chunk_lengths.max())
    padded = np.zeros((len(chunk_lengths), input_features.shape[0], longest), dtype=np.float32)
    start = 0
    for i, c in enumerate(chunk_lengths.tolist()):
        padded[i, :, :c] = input_features[:, start:start + c]
        start += c
    after_conv = (chunk_lengths - 1) // 2 + 1
    valid = (np.arange(int(after_conv.max()))[None, :] < after_conv[:, None]).reshape(-1).nonzero()[0]
    clip_after = (lens - 1) // 2 + 1
    pooled = (clip_after - 2) // 2 + 1
    offsets = np.concatenate([[0], np.cumsum(clip_after)[:-1]])
    pool = np.concatenate([off + 2 * np.arange(p) for off, p in zip(offsets.tolist(), pooled.tolist())])
    cu = np.concatenate([[0], np.cumsum(after_conv)])
    return {
        "padded_feature": padded,
        "chunk_lengths": chunk_lengths,
        "valid_indices": valid.astype(np.int64),
        "pool_indices": pool.astype(np.int64),
        "attention_mask": block_diagonal_mask(cu, int(cu[-1])),
    }


# --- MiniCPM-V 4.6 vision (NaViT packing: nearest position ids, 2x2 window order) ----------------

def nearest_position_ids(target_sizes, per_side: int) -> np.ndarray:
    """transformers.vision_utils.get_vision_nearest_position_ids in numpy (bucketize, right=True)."""
    boundaries = np.arange(1 / per_side, 1.0, 1 / per_side, dtype=np.float32)
    out = []
    for h, w in np.asarray(target_sizes).tolist():
        bh = np.searchsorted(boundaries, (np.arange(h) / h).astype(np.float32), side="right")
        bw = np.searchsorted(boundaries, (np.arange(w) / w).astype(np.float32), side="right")
        out.append((bh[:, None] * per_side + bw).reshape(-1))
    return np.concatenate(out).astype(np.int64)


@preprocessor("minicpmv4_6_vision")
def minicpmv4_6_vision(pixel_values: np.ndarray, target_sizes, meta: dict) -> dict[str, np.ndarray]:
    """Graph feeds for the MiniCPM-V 4.6 vision tower from processor outputs (pixel_values
    [1, C, P, num_patches*P], target_sizes [num_images, 2] in patches)."""
    sizes = np.asarray(target_sizes, dtype=np.int64)
    grid = np.concatenate([np.ones((len(sizes), 1), dtype=np.int64), sizes], axis=1)
    window_index, cu_window = vision_window_index(grid, 1, meta["window_kernel_size"], 1)
    return {
        "pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
        "target_sizes": sizes,
        "position_ids": nearest_position_ids(sizes, meta["num_patches_per_side"]),
        "window_index": window_index,
        "cu_window_seqlens": cu_window,
    }
