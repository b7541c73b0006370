"""Drive a split bundle (embedding / block / block_cache / lm_head) from its manifest alone.

One sequence at a time (batch 1), as NPU runtimes do. Dynamic bundles grow the cache from the
graphs' `present` outputs; static bundles own a fixed [max_len] cache, write each new token's
key/value at its slot, and hide unwritten slots with the additive mask.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from onnxport.bundle import Manifest, resolve_inside
from onnxport.errors import RuntimeInputError
from onnxport.runtime.session import GraphSession
from onnxport.spec import additive_mask


class SplitDecoder:
    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, runtime: str | None = None):
        layout = manifest.layout
        self.static = bool(layout.static)
        self.max_len = int(layout.max_len or 0)
        self.prefill_len = int(layout.prefill_len or 0)
        self.head = layout.head or "logits"
        self.bshd = manifest.kv_cache.layout == "bshd"
        self.rope = layout.rope or "inside"
        self.inv_freq = np.asarray(layout.inv_freq or [], dtype=np.float32)
        self.rope_scaling = float(layout.attention_scaling if layout.attention_scaling is not None else 1.0)
        self.table = None
        self.sessions: dict[str, GraphSession] = {}
        self.blocks: list[tuple[dict, GraphSession]] = []
        self.block_caches: list[tuple[dict, GraphSession]] = []
        for g in manifest.graphs:
            role = g.role
            if role == "embedding_table":
                self.table = np.fromfile(resolve_inside(folder, g.file), dtype=g.dtype).reshape(g.shape)
                self.table_scale = np.float32(g.scale)
            elif role == "block":
                self.blocks.append((g, GraphSession(folder, g, threads, spinning=False, runtime=runtime)))
            elif role == "block_cache":
                self.block_caches.append((g, GraphSession(folder, g, threads, spinning=False, runtime=runtime)))
            elif self.table is None or role not in ("embedding", "embedding_cache"):
                self.sessions[role] = GraphSession(folder, g, threads, spinning=False, runtime=runtime)

    # --- pieces -----------------------------------------------------------------------------

    def embed(self, ids: np.ndarray, decode: bool) -> np.ndarray:
        if self.table is not None:
            return (self.table[ids] * self.table_scale).astype(np.float32)
        role = "embedding_cache" if decode and "embedding_cache" in self.sessions else "embedding"
        return self.sessions[role].run({"input_ids": ids}, check=False)["hidden_states"]

    def rope_inputs(self, positions: np.ndarray) -> dict:
        if self.rope != "outside":
            return {}
        freqs = positions.astype(np.float32)[..., None] * self.inv_freq  # [1, S, D/2]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return {"cos": (np.cos(emb) * self.rope_scaling).astype(np.float32),
                "sin": (np.sin(emb) * self.rope_scaling).astype(np.float32)}

    def masks(self, entry, q_pos, k_pos, valid) -> dict:
        """`attention_mask` and, for a pack holding windowed layers, `sliding_attention_mask`
        (each fed only where the graph declares it)."""
        out = {"attention_mask": additive_mask(q_pos, k_pos, valid, None)}
        window = next((w for w in entry.sliding_windows or [] if w), None)
        if window is not None:
            out["sliding_attention_mask"] = additive_mask(q_pos, k_pos, valid, window)
        return out

    def choose(self, hidden_last: np.ndarray, sampler) -> int:
        outs = self.sessions["lm_head"].run({"hidden_states": hidden_last}, check=False)
        if self.head == "argmax":
            return int(outs["token"][0, 0])
        if self.head.startswith("topk:"):
            idx = sampler(outs["values"])  # position within the top-k (greedy: 0)
            return int(outs["indices"][0, int(idx[0])])
        return int(sampler(outs["logits"])[0])

    def _kv_seq_axis(self) -> int:
        return 1 if self.bshd else 2

    # --- one sequence -----------------------------------------------------------------------

    def generate_one(self, prompt: list[int], max_new_tokens: int, sampler, eos: list[int], on_token=None):
        n = len(prompt)
        if self.static:
            if n > self.prefill_len:
                raise RuntimeInputError(
                    f"prompt has {n} tokens but this static bundle prefills at most {self.prefill_len}",
                    "re-export with a larger --prefill-len, or shorten the prompt",
                )
            if n + max_new_tokens - 1 > self.max_len:
                raise RuntimeInputError(
                    f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds this static bundle's "
                    f"--max-len {self.max_len}",
                    "lower --max-new-tokens, or re-export with a larger --max-len",
                )
        ax = self._kv_seq_axis()
        t0 = time.perf_counter()
        # prefill
        length = self.prefill_len if self.static else n
        ids = np.zeros((1, length), dtype=np.int64)
        ids[0, :n] = prompt
        pos = np.arange(length, dtype=np.int64)[None]
        h = self.embed(ids, decode=False)
        cache: dict[str, np.ndarray] = {}
        for entry, sess in self.blocks:
            feeds = {"hidden_states": h, "position_ids": pos, **self.rope_inputs(pos),
                     **self.masks(entry, pos[0], pos[0], np.ones(length, dtype=bool))}
            outs = sess.run(_declared(feeds, entry), check=False)
            h = outs["hidden_states_out"]
            for i in entry.layers:
                for t in ("key", "value"):
                    present = outs[f"present.{i}.{t}"]
                    if self.static:
                        shape = list(present.shape)
                        shape[ax] = self.max_len
                        buf = np.zeros(shape, dtype=np.float32)
                        idx = [slice(None)] * 4
                        idx[ax] = slice(0, n)
                        buf[tuple(idx)] = np.take(present, np.arange(n), axis=ax)
                        cache[f"past_key_values.{i}.{t}"] = buf
                    else:
                        cache[f"past_key_values.{i}.{t}"] = present
        tok = self.choose(h[:, n - 1], sampler)
        prefill_ms = (time.perf_counter() - t0) * 1000
        tokens = [tok]
        if on_token:
            on_token(0, tok)
        t1 = time.perf_counter()
        p = n  # position (and cache slot) of the token being fed
        while len(tokens) < max_new_tokens and tok not in eos:
            h = self.embed(np.array([[tok]], dtype=np.int64), decode=True)
            pos = np.array([[p]], dtype=np.int64)
            if self.static:
                k_pos = np.concatenate([np.arange(self.max_len), [p]])
                valid = np.concatenate([np.arange(self.max_len) < p, [True]])
            else:
                k_pos = np.arange(p + 1)
                valid = np.ones(p + 1, dtype=bool)
            for entry, sess in self.block_caches:
                feeds = {"hidden_states": h, "position_ids": pos, **self.rope_inputs(pos),
                         **self.masks(entry, pos[0], k_pos, valid)}
                for i in entry.layers:
                    for t in ("key", "value"):
                        feeds[f"past_key_values.{i}.{t}"] = cache[f"past_key_values.{i}.{t}"]
                outs = sess.run(_declared(feeds, entry), check=False)
                h = outs["hidden_states_out"]
                for i in entry.layers:
                    for t in ("key", "value"):
                        present = outs[f"present.{i}.{t}"]
                        name = f"past_key_values.{i}.{t}"
                        if self.static:
                            idx = [slice(None)] * 4
                            idx[ax] = slice(p, p + 1)
                            cache[name][tuple(idx)] = present
                        else:
                            cache[name] = present
            tok = self.choose(h[:, -1], sampler)
            tokens.append(tok)
            if on_token:
                on_token(0, tok)
            p += 1
        decode_ms = (time.perf_counter() - t1) * 1000
        return tokens, prefill_ms, decode_ms


def _declared(feeds: dict, entry) -> dict:
    """The feeds a block graph declares: a graph lists only what its layers read (no
    position_ids with the rope outside; only the masks of its layers' kinds)."""
    names = {t.name for t in entry.inputs}
    return {k: v for k, v in feeds.items() if k in names}
