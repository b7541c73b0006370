"""Verify a split bundle: each graph against the matching PyTorch piece (embedding, each layer
pack for prefill and decode, head), then end to end: greedy tokens from the split runtime equal
the PyTorch model's."""

from __future__ import annotations

import numpy as np

from onnxport.bundle import Manifest
from onnxport.config import VerifyConfig
from onnxport.verify.compare import compare

E2E_PROMPT, E2E_NEW = 6, 8


def _verify_head(entry, module, feeds, got: dict, cfg: VerifyConfig) -> dict:
    """argmax / topk heads, by the logits rule: ORT's values and the reference logits at ORT's
    indices are within `spread` x the std of the reference row of the reference's best, so an
    index may differ from PyTorch's only where the logits tie within that bound."""
    import torch

    with torch.no_grad():
        logits = module.logits(torch.from_numpy(feeds["hidden_states"])).numpy()[0].astype(np.float64)
    bound = cfg.spread * float(logits.std())

    def within(measured: np.ndarray, ref: np.ndarray, tokens: str) -> dict:
        diff = float(np.max(np.abs(measured - ref)))
        return {"ok": bool(diff <= bound), "max_abs_diff": diff, "bound": bound, "cosine": 1.0,
                "greedy_equal": tokens, "row_std": float(logits.std())}

    if entry.head == "argmax":
        ref, tok = int(logits.argmax()), int(got["token"][0, 0])
        return {"token": within(logits[[tok]], logits[[ref]], f"{int(tok == ref)}/1")}
    k = got["values"].shape[-1]
    ref_vals = np.sort(logits)[::-1][:k]
    same = int(got["indices"][0, 0] == int(logits.argmax()))
    return {"values": within(got["values"][0].astype(np.float64), ref_vals, f"{same}/1"),
            # the logits at the indices ORT chose
            "indices": within(logits[got["indices"][0]], ref_vals, f"{same}/1")}


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
            outputs = _verify_head(entry, module, feeds, got, cfg)
        else:
            with torch.no_grad():
                ref = module(*[torch.from_numpy(feeds[i.name]) for i in entry.inputs])
            ref = ref if isinstance(ref, tuple) else (ref,)
            outputs = {n: compare(got[n], r.numpy(), cfg, logits=n == "logits") for n, r in zip(names, ref)}
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
        "tolerance": cfg.record(),
        "cases": cases,
    }


def verify_converted_split(loaded, folder, manifest: Manifest, split, export_cfg, cfg: VerifyConfig) -> dict:
    """A split bundle after --dtype: every graph and the greedy tokens end to end again, at the
    dtype's tolerances; VerificationError when they drift past them."""
    from onnxport.errors import VerificationError
    from onnxport.verify.decoder import first_failure

    dtype = export_cfg.dtype
    record = verify_split(loaded.recipe, loaded.model, folder, manifest, split, export_cfg, cfg.for_dtype(dtype))
    record["tolerance"]["dtype"] = dtype
    manifest.verification = manifest.part("decoder").verification = record
    if not record["ok"]:
        raise VerificationError(f"{dtype} split graphs drift past their tolerance: {first_failure(record)}",
                                "export the split layout in float32 (or --dtype bf16); nothing was written")
    return record
