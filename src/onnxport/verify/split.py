"""Verify a split bundle: each graph against the matching PyTorch piece (embedding, each layer
pack for prefill and decode, head), then end to end: greedy tokens from the split runtime equal
the PyTorch model's."""

from __future__ import annotations

import numpy as np

from onnxport.bundle import Manifest
from onnxport.config import VerifyConfig
from onnxport.verify.compare import compare

E2E_PROMPT, E2E_NEW = 6, 8


def _verify_head(entry, module, feeds, got: dict, atol: float) -> dict:
    """argmax/topk heads: indices may differ from PyTorch only where logits tie within atol."""
    import torch

    with torch.no_grad():
        logits = module.logits(torch.from_numpy(feeds["hidden_states"])).numpy()[0]
    if entry.head == "argmax":
        ref, tok = int(logits.argmax()), int(got["token"][0, 0])
        gap = float(logits[ref] - logits[tok])
        return {"token": {"ok": gap <= atol, "max_abs_diff": gap, "cosine": 1.0 if tok == ref else float("nan")}}
    k = got["values"].shape[-1]
    ref_vals = np.sort(logits)[::-1][:k][None]
    out = {"values": compare(got["values"], ref_vals, atol, 0.9999)}
    picked = logits[got["indices"][0]][None]  # the logits at the indices ORT chose
    out["indices"] = compare(picked, ref_vals, atol, 0.9999)
    return out


def verify_split(recipe, model, folder, manifest: Manifest, split, export_cfg, cfg: VerifyConfig) -> dict:
    import torch

    from onnxport.export.split import example_feeds, module_for
    from onnxport.runtime import Generator
    from onnxport.runtime.session import make_session

    rng = np.random.default_rng(cfg.seed)
    vocab = manifest.model.vocab_size
    cases = []
    for entry in manifest.graphs:
        if entry.role == "embedding_table":
            continue
        module = module_for(entry, recipe, model, export_cfg, split).eval()
        past = 4 if split.static else 9
        sizes = {"sequence_length": 7, "past_sequence_length": past, "total_sequence_length": past + 1}
        if entry.role == "block":
            sizes["total_sequence_length"] = 7
        feeds = example_feeds(entry, sizes, cfg.seed + len(cases), vocab, past if entry.role == "block_cache" else 0)
        sess = make_session(folder / entry.file)
        names = entry.output_names
        got = dict(zip(names, sess.run(names, feeds)))
        if entry.role == "lm_head" and entry.head != "logits":
            outputs = _verify_head(entry, module, feeds, got, cfg.atol)
        else:
            with torch.no_grad():
                ref = module(*[torch.from_numpy(feeds[i.name]) for i in entry.inputs])
            ref = ref if isinstance(ref, tuple) else (ref,)
            outputs = {n: compare(got[n], r.numpy(), cfg.atol, cfg.min_cosine, cfg.rtol) for n, r in zip(names, ref)}
        label = entry.file + ("" if split.static else
                              (f" (seq=7,past={past})" if entry.role == "block_cache" else " (seq=7)"))
        cases.append({"shape": label, "ok": all(o["ok"] for o in outputs.values()), "outputs": outputs})

    prompt = rng.integers(0, vocab, size=E2E_PROMPT).tolist()
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, E2E_PROMPT, dtype=torch.long),
                             max_new_tokens=E2E_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_tokens = ref[0, E2E_PROMPT:].tolist()
    ours = Generator(folder).generate_ids([prompt], max_new_tokens=E2E_NEW, eos_token_id=None).tokens[0]
    same = ours == ref_tokens
    e2e = {"ok": same, "max_abs_diff": 0.0 if same else float(sum(a != b for a, b in zip(ours, ref_tokens))),
           "cosine": 1.0 if same else 0.0}
    if not same:
        e2e["error"] = f"greedy tokens differ: onnx {ours} vs torch {ref_tokens}"
    cases.append({"shape": f"end-to-end greedy {E2E_NEW} tokens", "ok": same, "outputs": {"tokens": e2e}})
    return {
        "ok": all(c["ok"] for c in cases),
        "tolerance": {"atol": cfg.atol, "rtol": cfg.rtol, "min_cosine": cfg.min_cosine, "dtype": "float32"},
        "cases": cases,
    }
