"""Prompt-lookup speculative decoding, greedy-exact (`generate --speculative K`).

No second model: the draft is up to K tokens that followed the most recent earlier occurrence of
the sequence's last n-gram (n = 3, 2, 1), in the prompt or in what was generated; its length
adapts (doubled after a draft fully taken, cut to one past the taken prefix after a miss), so a
text that does not repeat itself costs few wasted positions. One forward
verifies them all: the graph reads the last accepted token and the draft at once over the cache,
each position's argmax is what plain greedy decoding would have produced there, the draft is
kept up to its first disagreement, and the model's own token at that position comes free. The
cache is cut back to the kept positions (`Sequence`): the default graph's present = past + the
new tokens, so cutting it is a slice; the GroupQueryAttention graph writes one shared buffer in
place and reads only as far as the attention mask says, so a shorter mask is the cut. Output is
plain greedy decoding's, token for token (on graphs that round activations to int8, MatMulNBits
accuracy level 4, up to near-ties: docs/runtime.md); what changes is how many forwards it takes.
Input-grounded text (code edits, summaries, extraction, chat that quotes the prompt) repeats
spans of its context, which is where drafts are accepted.

With a draft bundle (`generate --draft DIR`: a smaller model with the same tokenizer, or the
same model quantized) the drafts are that model's greedy tokens instead (`DraftModel`), for
text that does not repeat its context; the verification, and so the output, is the same.
"""

from __future__ import annotations

import time

import numpy as np

from onnxport.errors import RuntimeInputError


def find_draft(tokens: list[int], k: int, ngram: int = 3) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n-gram."""
    for n in range(min(ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                draft = tokens[start + n:start + n + k]
                if draft:
                    return draft
    return []


class Sequence:
    """One sequence's forwards over its cache: the default graph's concatenated cache (present =
    past + new; cut by slicing) or the GroupQueryAttention graph's shared buffer (written in
    place at the slots the mask says; cut by a shorter mask). `capacity`: the most positions."""

    def __init__(self, gen, capacity: int):
        if gen.split is not None or gen.step_only or not gen.past_names or gen.rows_alone:
            raise RuntimeInputError("speculative decoding needs a monolithic decoder graph with a cache that reads "
                                    "several tokens per call (the default or --attention gqa export)",
                                    "drop --speculative / --draft for this bundle")
        self.gen = gen
        self.cached = 0
        self.run = gen._shared_buffer_runner(1, capacity) if gen.shared_buffer else None
        self.past = {} if self.run else {p: gen._empty_past(p, 1) for p in gen.past_names}
        self.axis = 2 if gen.kv_layout == "bhsd" else 1

    def forward(self, ids: list[int], last_only: bool = False) -> np.ndarray:
        """Logits [len(ids), vocab] of `ids` read after the cache (the last row only with
        `last_only`); the cache grows by len(ids)."""
        g, n = self.gen, len(ids)
        total = self.cached + n
        feeds = g._feeds(np.asarray([ids], dtype=np.int64), np.ones((1, total), dtype=np.int64),
                         np.arange(self.cached, total, dtype=np.int64)[None], self.past)
        if g.keeps_logits:
            feeds["logits_to_keep"] = np.array(1 if last_only else n, dtype=np.int64)
        outs = self.run(feeds) if self.run is not None else g.session.run(feeds, check=self.cached == 0)
        if self.run is None:
            self.past = {p: outs[q] for p, q in zip(g.past_names, g.present_names)}
        self.cached = total
        return outs["logits"][0, -1:] if last_only else outs["logits"][0, -n:]

    def keep(self, n: int) -> None:
        """Forget every position from `n` on."""
        if n < self.cached:
            if self.run is None:
                self.past = {p: np.take(v, np.arange(n), axis=self.axis) for p, v in self.past.items()}
            self.cached = n


class PromptLookup:
    """Drafts from the text itself (`find_draft`), `k` tokens at most, width adapting to what
    was lately taken: doubled after a draft fully taken, one past the taken prefix after a miss."""

    seconds = 0.0

    def __init__(self, k: int, ngram: int = 3):
        self.k, self.ngram, self.width = k, ngram, k

    def start(self, prompt: list[int], capacity: int) -> None:
        self.width = self.k

    def propose(self, context: list[int], room: int) -> list[int]:
        return find_draft(context, min(self.width, room), self.ngram)

    def taken(self, context: list[int], draft: list[int], n: int) -> None:
        if draft:
            self.width = min(self.k, 2 * self.width) if n == len(draft) else max(1, n + 1)


class DraftModel(PromptLookup):
    """Drafts from a second, smaller bundle with the same tokenizer (a small model of the same
    family, or the same model quantized): its greedy tokens, from its own cache, which is cut back
    to the taken prefix after each verification and fed what it has not read yet."""

    def __init__(self, draft, k: int):
        super().__init__(k)
        self.gen = draft
        self.seq: Sequence | None = None
        self.seconds = 0.0

    def start(self, prompt: list[int], capacity: int) -> None:
        super().start(prompt, capacity)
        t0 = time.perf_counter()
        self.seq = Sequence(self.gen, capacity)
        self.seq.forward(prompt, last_only=True)
        self.seconds += time.perf_counter() - t0

    def propose(self, context: list[int], room: int) -> list[int]:
        t0 = time.perf_counter()
        draft: list[int] = []
        pending = context[self.seq.cached:]
        while len(draft) < min(self.width, room):
            pending = [int(np.argmax(self.seq.forward(pending, last_only=True)[-1]))]
            draft.append(pending[0])
        self.seconds += time.perf_counter() - t0
        return draft

    def taken(self, context: list[int], draft: list[int], n: int) -> None:
        super().taken(context, draft, n)
        self.seq.keep(len(context) + n)  # what it read of the context and the taken drafts


def same_tokenizer(target, draft) -> None:
    """The draft must speak the target's token ids: same vocabulary size and, where both ship
    tokenizer.json, the same vocabulary and added tokens."""
    import json

    if target.vocab_size != draft.vocab_size:
        raise RuntimeInputError(f"the draft bundle's vocabulary has {draft.vocab_size} tokens, the model's "
                                f"{target.vocab_size}", "pass a draft model with the same tokenizer")
    files = [g.folder / "tokenizer.json" for g in (target, draft)]
    if all(f.is_file() for f in files):
        a, b = (json.loads(f.read_text(encoding="utf-8")) for f in files)
        if a.get("model", {}).get("vocab") != b.get("model", {}).get("vocab") or \
                [t.get("content") for t in a.get("added_tokens", [])] != [t.get("content") for t in b.get("added_tokens", [])]:
            raise RuntimeInputError("the draft bundle's tokenizer differs from the model's (another vocabulary)",
                                    "pass a draft model with the same tokenizer")


def prompt_lookup(gen, prompt: list[int], max_new_tokens: int, eos: list[int], k: int = 8, ngram: int = 3,
                  on_token=None, drafter=None) -> tuple[list[int], dict]:
    """Greedy tokens for one prompt with speculative drafts, verified `k` at most a forward:
    prompt-lookup drafts, or `drafter`'s (a DraftModel); (tokens, stats)."""
    drafter = drafter or PromptLookup(k, ngram)
    capacity = len(prompt) + max_new_tokens
    seq = Sequence(gen, capacity)
    eos = set(eos)
    t0 = time.perf_counter()
    out = [int(np.argmax(seq.forward(prompt, last_only=True)[-1]))]
    prefill_ms = (time.perf_counter() - t0) * 1000
    if on_token:
        on_token(0, out[0])
    calls, drafted, accepted = 0, 0, 0
    t1 = time.perf_counter()
    drafter.start(prompt, capacity)
    while len(out) < max_new_tokens and out[-1] not in eos:
        context = prompt + out
        draft = drafter.propose(context, max_new_tokens - len(out) - 1) if max_new_tokens - len(out) > 1 else []
        preds = np.argmax(seq.forward([out[-1], *draft]), axis=-1).tolist()
        calls += 1
        n = 0
        while n < len(draft) and draft[n] == preds[n]:
            n += 1
        used = 0
        for tok in [*draft[:n], int(preds[n])]:  # stop at the budget and at EOS, as plain decoding does
            if len(out) >= max_new_tokens:
                break
            out.append(tok)
            used += 1
            if on_token:
                on_token(0, tok)
            if tok in eos:
                break
        drafted, accepted = drafted + len(draft), accepted + min(n, used)
        drafter.taken(context, draft, n)
        seq.keep(len(context) + n)  # the cache of the last token and the accepted drafts
    decode_ms = (time.perf_counter() - t1) * 1000
    return out, {"forwards": calls, "drafted": drafted, "accepted": accepted, "prefill_ms": prefill_ms,
                 "decode_ms": decode_ms, "decode_tokens": len(out) - 1, "draft_ms": drafter.seconds * 1000,
                 "tokens_per_forward": round((len(out) - 1) / calls, 3) if calls else 0.0}
