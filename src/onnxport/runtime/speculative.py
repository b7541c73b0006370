"""Prompt-lookup speculative decoding, greedy-exact (`generate --speculative K`).

No second model: the draft is up to K tokens that followed the most recent earlier occurrence of
the sequence's last n-gram (n = 3, 2, 1), in the prompt or in what was generated; its length
adapts (doubled after a draft fully taken, cut to one past the taken prefix after a miss), so a
text that does not repeat itself costs few wasted positions. One forward
verifies them all: the graph reads the last accepted token and the draft at once over the cache,
each position's argmax is what plain greedy decoding would have produced there, the draft is
kept up to its first disagreement, and the model's own token at that position comes free. The
cache is cut back to the kept positions (the default graph's present = past + the new tokens, so
cutting it is a slice). Output is plain greedy decoding's, token for token; what changes is how
many forwards it takes. Input-grounded text (code edits, summaries, extraction, chat that quotes
the prompt) repeats spans of its context, which is where drafts are accepted.
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


def prompt_lookup(gen, prompt: list[int], max_new_tokens: int, eos: list[int], k: int = 8, ngram: int = 3,
                  on_token=None) -> tuple[list[int], dict]:
    """Greedy tokens for one prompt with prompt-lookup drafts; (tokens, stats)."""
    if gen.split is not None or gen.step_only or not gen.past_names or gen.shared_buffer or gen.rows_alone \
            or gen.embed_session is not None:
        raise RuntimeInputError("speculative decoding needs a monolithic decoder graph with a concatenated cache "
                                "(the default export)", "drop --speculative, or export without --attention gqa")
    axis = 2 if gen.kv_layout == "bhsd" else 1
    eos = set(eos)
    t0 = time.perf_counter()
    outs = gen.session.run(gen.prefill_feeds(prompt))
    out = [int(np.argmax(outs["logits"][0, -1]))]
    past = {p: outs[q] for p, q in zip(gen.past_names, gen.present_names)}
    prefill_ms = (time.perf_counter() - t0) * 1000
    if on_token:
        on_token(0, out[0])
    calls, drafted, accepted, width = 0, 0, 0, k
    t1 = time.perf_counter()
    while len(out) < max_new_tokens and out[-1] not in eos:
        context = prompt + out
        draft = find_draft(context, min(width, max_new_tokens - len(out) - 1), ngram) \
            if max_new_tokens - len(out) > 1 else []
        ids = np.asarray([[out[-1], *draft]], dtype=np.int64)
        cached = len(context) - 1
        mask = np.ones((1, cached + ids.shape[1]), dtype=np.int64)
        positions = np.arange(cached, cached + ids.shape[1], dtype=np.int64)[None]
        outs = gen.session.run(gen._feeds(ids, mask, positions, past), check=False)
        calls += 1
        preds = np.argmax(outs["logits"][0], axis=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == preds[n]:
            n += 1
        new = [*draft[:n], int(preds[n])]
        used = 0
        for tok in new:  # stop at the budget and at EOS, as plain decoding does
            if len(out) >= max_new_tokens:
                break
            out.append(tok)
            used += 1
            if on_token:
                on_token(0, tok)
            if tok in eos:
                break
        drafted, accepted = drafted + len(draft), accepted + min(n, used)
        if draft:  # draft as far as drafts have lately been taken: longer after a full hit, shorter after a miss
            width = min(k, 2 * width) if n == len(draft) else max(1, n + 1)
        keep = cached + 1 + n  # the cache of the last token and the accepted drafts
        cut = keep < cached + ids.shape[1]  # a rejected tail to drop (else the present is the next past)
        past = {p: np.take(outs[q], np.arange(keep), axis=axis) if cut else outs[q]
                for p, q in zip(gen.past_names, gen.present_names)}
    decode_ms = (time.perf_counter() - t1) * 1000
    return out, {"forwards": calls, "drafted": drafted, "accepted": accepted, "prefill_ms": prefill_ms,
                 "decode_ms": decode_ms, "decode_tokens": len(out) - 1,
                 "tokens_per_forward": round((len(out) - 1) / calls, 3) if calls else 0.0}
