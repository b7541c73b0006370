"""Quality of a lossy bundle (quantized) against its source bundle, with ONNX Runtime only:
held-out perplexity and greedy-token agreement."""

from __future__ import annotations

import numpy as np

from onnxport.runtime.sampling import log_softmax


def perplexity(gen, ids: list[int], window: int = 256) -> float:
    """exp(mean NLL) of `ids` under the bundle, in non-overlapping windows."""
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        chunk = ids[a:a + window + 1]
        if len(chunk) < 2:
            break
        logp = log_softmax(gen.logits(chunk[:-1]))
        target = np.asarray(chunk[1:])
        nll -= float(logp[np.arange(len(target)), target].sum())
        n += len(target)
    return float(np.exp(nll / max(n, 1)))


def logits_agreement(gen, ref, ids: list[int], window: int = 256) -> dict:
    """`gen`'s logits against `ref`'s on the same text, teacher-forced (both read `ids`, in the
    perplexity's windows): the fraction of positions whose argmax agrees, the mean KL(ref || gen)
    of the next-token distributions, and the mean and lowest cosine of the logit rows. Unlike
    free-running greedy agreement, one early flip does not decide every later position."""
    top1 = kl = 0.0
    cos: list[float] = []
    n = 0
    for a in range(0, len(ids) - 1, window):
        chunk = ids[a:a + window]
        if len(chunk) < 2:
            break
        x, y = gen.logits(chunk).astype(np.float64), ref.logits(chunk).astype(np.float64)
        top1 += float((x.argmax(-1) == y.argmax(-1)).sum())
        lx, ly = log_softmax(x), log_softmax(y)
        kl += float((np.exp(ly) * (ly - lx)).sum())
        cos.extend((x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30))
        n += len(chunk)
    return {"positions": n, "top1_agreement": round(top1 / max(n, 1), 4), "kl_mean": round(kl / max(n, 1), 5),
            "cosine_mean": round(float(np.mean(cos)), 5), "cosine_min": round(float(np.min(cos)), 5)}


def greedy_tokens(gen, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """`gen`'s greedy tokens for each prompt alone (no EOS)."""
    return [list(gen.generate_ids([p], max_new_tokens=new_tokens, eos_token_id=None).tokens[0]) for p in prompts]


def greedy_agreement(gen, ref, prompts: list[list[int]], new_tokens: int) -> dict:
    """Tokens of `gen` equal to those of `ref`, one prompt at a time: `ref` a Generator, or its
    `greedy_tokens` for these prompts computed once (a gate that tries several graphs)."""
    wanted = greedy_tokens(ref, prompts, new_tokens) if hasattr(ref, "generate_ids") else ref
    equal, total, prefix = 0, 0, []
    for a, b in zip(greedy_tokens(gen, prompts, new_tokens), wanted):
        equal += sum(x == y for x, y in zip(a, b))
        total += len(b)
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix.append(k)
    return {"tokens_equal": equal, "tokens": total, "fraction": round(equal / max(total, 1), 4), "equal_prefix": prefix}


def calibration_split(text: str, tokenizer, calib_tokens: int = 384, heldout_tokens: int = 1024,
                      prompts: int = 4, prompt_len: int = 16) -> tuple[list[int], list[int], list[list[int]]]:
    """(calibration ids, held-out ids, agreement prompts) from one text: the first part (up to
    `calib_tokens`) calibrates, the next `heldout_tokens` are held out (prompts are taken from
    them); a text shorter than both keeps a quarter of itself for the held-out part."""
    ids = tokenizer.encode(text)
    held_n = min(heldout_tokens, max(len(ids) - calib_tokens, len(ids) // 4))
    calib = ids[:min(calib_tokens, len(ids) - held_n)]
    held = ids[len(calib):len(calib) + held_n]
    step = max(len(held) // max(prompts, 1), prompt_len)
    starts = [i * step for i in range(prompts) if i * step + prompt_len <= len(held)]
    return calib, held, [held[s:s + prompt_len] for s in starts]


__all__ = ["calibration_split", "greedy_agreement", "greedy_tokens", "logits_agreement", "perplexity"]
