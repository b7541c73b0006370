"""Verify a decoder graph: ONNX Runtime against the PyTorch model on several shape sets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from onnxport.bundle import GQA_ATTENTION, RIGHT_PADDING, Graph
from onnxport.config import VerifyConfig
from onnxport.export.decoder import wrapper_args
from onnxport.progress import update as report
from onnxport.spec import (
    DECODER_CASES,
    FULL_CASES,
    GQA_CASES,
    GQA_RIGHT_CASES,
    PAST,
    SEQ,
    STEP_CASES,
    TOTAL,
    ShapeCase,
    feeds,
)
from onnxport.verify.compare import compare, describe

log = logging.getLogger(__name__)


def verify_decoder(
    wrapper, onnx_file: Path, graph: Graph, vocab_size: int, cfg: VerifyConfig, cases=None,
    reference: dict | None = None, observe=None, streamed: bool = False,
) -> dict:
    """Run `wrapper` (a FlatCacheDecoder) and the ONNX graph on each case; compare every output.
    Default cases: DECODER_CASES, STEP_CASES for a one-token-per-call graph (recurrent state),
    FULL_CASES for a graph without a cache.

    `reference` caches the PyTorch outputs per case across calls (candidates of one graph:
    the fp16 guard's attempts, fusions), so a streamed reference runs once. `observe(name,
    array)` sees every value ONNX Runtime computes (runtime/segments.run_feeds). `streamed`: the
    PyTorch model reads its weights from the checkpoint as it runs (--low-memory).

    Returns the manifest's `verification` record; `ok` is False if any output at any shape
    breaks the tolerance. Callers decide whether that raises."""
    import torch

    from onnxport.runtime.segments import run_feeds, segment_budget

    if cases is None:
        cases = cases_for(graph)
    out_names = graph.output_names
    right = graph.padding == RIGHT_PADDING
    xs = []
    for i, case in enumerate(cases):
        x = feeds(graph.inputs, case.sizes, cfg.seed + i, vocab_size, left_pad=case.left_pad, right_pad=case.right_pad)
        if case.past and not _step_graph(graph):
            x.update(model_made_past(wrapper, graph, case, cfg.seed + i, vocab_size, reference))
        xs.append(x)
    # all cases through ONNX Runtime first: a graph past the memory budget runs segment by
    # segment, each segment's weights loaded once for every case
    got_all, ran = run_feeds(onnx_file, out_names, xs, segment_budget(cfg.segment_bytes, streamed), observe=observe)
    results = []
    for i, (case, x, got) in enumerate(zip(cases, xs, got_all)):
        report("verifying against PyTorch", i, len(cases))
        # spec.feeds draws the same values whatever a graph's float dtype: one reference per shape
        key = (case.label, cfg.seed + i)
        if reference is not None and key in reference:
            ref = reference[key]
        else:
            # the PyTorch reference runs in float32 whatever the graph's cache dtype
            t = {k: torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v) for k, v in x.items()}
            with torch.no_grad():
                ref = [e.numpy() for e in wrapper(*wrapper_args(graph.inputs, t))]
            if reference is not None:
                reference[key] = ref
        outputs = {}
        mask = x.get("attention_mask") if case.padded else None
        for name, e in zip(out_names, ref):
            a = got[name]
            if mask is not None and mask.ndim == 2:
                bshd = getattr(wrapper, "bshd", False)
                a, e = unpadded(name, a, mask, bshd, compact=right), unpadded(name, e, mask, bshd)
            outputs[name] = compare(a, e, cfg, logits=name == "logits")
        record = {"shape": case.label, "ok": all(r["ok"] for r in outputs.values()), "outputs": outputs}
        if mask is not None:
            record["compared"] = "unpadded positions"
        results.append(record)
        log.info("verify %s: %s", case.label, "ok" if results[-1]["ok"] else "FAILED")
        report("verifying against PyTorch", i + 1, len(cases))
    checks = {"onnxruntime": ran,
              "pytorch": "streamed: each module's weights read from the checkpoint when it runs, then dropped"
              if streamed else "model in memory"}
    return {
        "ok": all(r["ok"] for r in results),
        "tolerance": cfg.record(),
        "checks": checks,
        "cases": results,
    }


def model_made_past(wrapper, graph: Graph, case: ShapeCase, seed: int, vocab_size: int,
                    reference: dict | None = None) -> dict:
    """The past cache of `case` as the model itself makes it: PyTorch runs `case.past` random
    tokens (the first past columns of the case's mask) from an empty cache, and its presents
    become the case's past inputs, at fp16 precision like every other feed.

    Standard-normal past keys are nothing a trained model writes: against a trained model's
    queries they make attention sharply peaked on arbitrary slots, so a rounding difference
    moves the logits by O(10) (SmolLM2-135M in fp16: 35, with the same graph exact on its own
    caches). A cache the model wrote is what the graph reads in use."""
    import torch

    dtypes = {t.name: np.dtype(t.dtype) for t in graph.inputs}
    key = ("past", case.label, seed)
    if reference is not None and key in reference:  # fp16-exact float32 values; cast per graph
        return {n: v.astype(dtypes[n]) for n, v in reference[key].items()}
    names = [t.name for t in graph.inputs]
    lead = 3 if "position_ids" in names else 2
    sizes = {**case.sizes, SEQ: case.past, PAST: 0, TOTAL: case.past}
    # the prefix's mask is the case's first past columns (a right-padded row's pad slots end
    # its past: the compact cache of a `padding: right` graph keeps real slots first)
    x = feeds(graph.inputs, sizes, seed + 7919, vocab_size, left_pad=min(case.left_pad, case.past),
              right_pad=case.right_pad if case.seq == 1 else 0)
    t = {k: torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v) for k, v in x.items()}
    with torch.no_grad():
        outs = wrapper(*wrapper_args(graph.inputs, t))
    presents = outs[len(outs) - len(names[lead:]):]
    past = {n: np.clip(p.float().numpy(), -65504, 65504).astype(np.float16).astype(np.float32)
            for n, p in zip(names[lead:], presents)}
    if reference is not None:
        reference[key] = past
    return {n: v.astype(dtypes[n]) for n, v in past.items()}


def _step_graph(graph: Graph) -> bool:
    """A one-token-per-call graph (recurrent state): its past is a fixed-size state."""
    return graph.inputs[0].dims[1] == 1


def verify_embedding(recipe, model, onnx_file: Path, graph: Graph, vocab_size: int, cfg: VerifyConfig) -> dict:
    """The token-embedding graph against the recipe's `embed` on random ids (two shapes)."""
    import torch

    from onnxport.runtime.segments import run_feeds

    cases = [ShapeCase(1, 1, 0), ShapeCase(2, 9, 0)]
    xs = [feeds(graph.inputs, c.sizes, cfg.seed + i, vocab_size) for i, c in enumerate(cases)]
    got, _ = run_feeds(onnx_file, graph.output_names, xs, cfg.segment_bytes)
    results = []
    for case, x, g in zip(cases, xs, got):
        with torch.no_grad():
            ref = recipe.embed(model, torch.from_numpy(x["input_ids"])).float().numpy()
        out = compare(g[graph.output_names[0]], ref, cfg)
        results.append({"shape": case.label, "ok": out["ok"], "outputs": {graph.output_names[0]: out}})
    return {"ok": all(r["ok"] for r in results), "cases": results}


def cases_for(graph: Graph) -> list[ShapeCase]:
    """DECODER_CASES; STEP_CASES for a one-token-per-call graph (recurrent state); FULL_CASES
    for a graph without a cache; GQA_CASES for GroupQueryAttention graphs (GQA_RIGHT_CASES when
    the rotary is inside: `padding: right`)."""
    step = _step_graph(graph)
    no_cache = not any(i.name.startswith(("past_", "past_key")) for i in graph.inputs)
    if graph.attention == GQA_ATTENTION:
        return GQA_RIGHT_CASES if graph.padding == RIGHT_PADDING else GQA_CASES
    return STEP_CASES if step else FULL_CASES if no_cache else DECODER_CASES


def unpadded(name: str, a, mask, bshd: bool, compact: bool = False):
    """The part of an output at real (unpadded) positions: padded slots hold whatever the
    model computes for a query that may attend nothing, which no later step reads (attention
    masks them, the generator ignores their logits) and transformers leaves arbitrary too.

    `compact`: a `padding: right` graph's cache keeps each row's real slots first (GQA writes
    the new keys at slot seqlens_k), so its presents' real part is the first sum(mask) slots
    of the row, in order; the reference keeps them where the mask is 1."""
    cache = name.endswith((".key", ".value")) or name.startswith(("past_key", "past_value"))
    if name in ("logits", "last_hidden_state") or name.endswith("indexer_key"):
        axis = 1
    elif cache:
        axis = 1 if bshd else 2
    else:
        return a  # fixed-size states: compared whole
    n = a.shape[axis]
    if a.shape[0] != mask.shape[0] or n > mask.shape[1]:
        return a
    keep = mask[:, mask.shape[1] - n:].astype(bool)  # [batch, n]
    if compact and cache:
        keep = np.arange(n)[None, :] < mask.sum(axis=1)[:, None]
    moved = a.swapaxes(1, axis) if axis != 1 else a
    return moved[keep]


def first_failure(record: dict) -> str | None:
    """'logits at batch=2,seq=7,past=5: max|diff| 0.31 = 0.1 x the row's std 3.1 (bound 0.01 x
    std), cosine 0.99 (min 0.9999), greedy tokens 11/12 equal' for the first failure."""
    for case in record["cases"]:
        for name, r in case["outputs"].items():
            if not r["ok"]:
                return describe(f"{name} at {case['shape']}", r, record["tolerance"]["min_cosine"])
    return None




# --- the verify stage of a decoder part -----------------------------------------------------------

def with_io_dtypes(graph: Graph, onnx_file: Path) -> Graph:
    """`graph` with the I/O dtypes of the saved file (a conversion changes float ones)."""
    from dataclasses import replace

    import onnx

    m = onnx.load(str(onnx_file), load_external_data=False)
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
             for v in [*m.graph.input, *m.graph.output]}
    return replace(graph, inputs=[replace(t, dtype=types.get(t.name, t.dtype)) for t in graph.inputs],
                   outputs=[replace(t, dtype=types.get(t.name, t.dtype)) for t in graph.outputs])


def worst(record: dict) -> str:
    """'logits: max|diff| 9.4e-03 (bound 6.4e-02), min cosine 0.99998' over all cases."""
    logits = [c["outputs"]["logits"] for c in record["cases"] if "logits" in c["outputs"]]
    if not logits:
        return "ok"
    r = max(logits, key=lambda x: x["max_abs_diff"] / x["bound"])
    return (f"logits: max|diff| {r['max_abs_diff']:.3g} (bound {r['bound']:.3g}), "
            f"min cosine {min(x['cosine'] for x in logits):.6f}")


class DecoderCheck:
    """ONNX Runtime against PyTorch for a monolithic decoder graph and every rewrite of it
    (fusions, fp16 / bf16 candidates): the PyTorch reference of each case is computed once
    (`loaded.reference`) and shared by every check."""

    def __init__(self, loaded, kv, manifest, vcfg: VerifyConfig):
        from onnxport.export.decoder import graph_wrapper

        self.loaded, self.kv, self.manifest, self.vcfg = loaded, kv, manifest, vcfg
        self.graph_wrapper = graph_wrapper

    def run(self, candidate: Path, graph: Graph, vcfg: VerifyConfig | None = None, observe=None) -> dict:
        """The verification record of `candidate` checked as `graph` (its I/O dtypes read from
        the file)."""
        g = with_io_dtypes(graph, candidate)
        wrapper = self.graph_wrapper(self.loaded.model, self.kv, graph, self.manifest.kv_cache.layout)
        return verify_decoder(wrapper, candidate, g, self.manifest.model.vocab_size, vcfg or self.vcfg,
                              reference=self.loaded.reference, observe=observe, streamed=self.loaded.streamed)

    def tolerance(self, dtype: str):
        """check(candidate, graph) -> (ok, message, record) at `dtype`'s tolerances (a pass's
        Verified wrapper calls it)."""
        vcfg = self.vcfg.for_dtype(dtype)

        def check(candidate: Path, graph: Graph) -> tuple[bool, str, dict]:
            record = self.run(candidate, graph, vcfg)
            return record["ok"], first_failure(record) or worst(record), record

        return check


def verify_decoder_part(loaded, kv, folder: Path, manifest, export_cfg, vcfg: VerifyConfig, split,
                        observe=None) -> dict:
    """ORT vs PyTorch for the decoder graphs as exported (each graph of a split layout against
    its PyTorch piece, and greedy tokens end to end); record it; raise VerificationError on a
    mismatch."""
    from onnxport.errors import VerificationError
    from onnxport.verify.split import verify_split

    if split is None:
        graph = manifest.graph("decoder")
        record = DecoderCheck(loaded, kv, manifest, vcfg).run(folder / graph.file, graph, observe=observe)
        embedding = next((g for g in manifest.graphs if g.role == "embedding" and g.part == "decoder"), None)
        if embedding is not None:  # a decoder fed inputs_embeds: its token-embedding graph too
            embedding.verification = verify_embedding(loaded.recipe, loaded.model, folder / embedding.file, embedding,
                                                      manifest.model.vocab_size, vcfg)
            record["embedding"] = embedding.verification
            record["ok"] = record["ok"] and embedding.verification["ok"]
    else:
        record = verify_split(loaded.recipe, loaded.model, folder, manifest, split, export_cfg, vcfg)
    manifest.verification = manifest.part("decoder").verification = record
    if not record["ok"]:
        where = locate(loaded, kv, manifest, folder, vcfg) if split is None else ""
        raise VerificationError(f"verification failed: {first_failure(record)}{where}",
                                "ONNX Runtime disagrees with PyTorch for this model; nothing was written "
                                "(onnxport bisect BUNDLE prints the per-module table)")
    return record


def locate(loaded, kv, manifest, folder: Path, vcfg: VerifyConfig) -> str:
    """'; first divergence: ...' from a module-by-module bisect of the failing graph ('' when
    the graph has no module metadata or the bisect itself fails: the failure stands as it is)."""
    from onnxport.verify.bisect import bisect_pytorch, describe_culprit

    try:
        record = bisect_pytorch(loaded, kv, manifest, folder, dtype=vcfg.dtype or "float32")
    except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the failure it explains
        log.info("bisect after the failure did not run: %s", e)
        return ""
    return f"; first divergence: {describe_culprit(record)}" if record["culprit"] else ""
