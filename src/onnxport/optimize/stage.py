"""The optimize stage of an export: which passes run on which graphs, in which order, each
candidate checked by verify/ (through `passes.Verified`) before it is kept.

- a monolithic decoder: fusions (`--optimize`), then precision (`--dtype`), then the optional
  `logits_to_keep` input;
- split graphs: precision per graph (then verified again as a whole by the caller);
- encoder / module graphs: precision, then cutting under `--max-graph-size`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from onnxport.bundle import DECODER, Manifest, external_locations
from onnxport.config import ExportConfig, SplitConfig, VerifyConfig
from onnxport.optimize.passes import GraphFile, Verified

log = logging.getLogger(__name__)


def decoder_graph(folder: Path, manifest: Manifest) -> GraphFile:
    return GraphFile(folder, manifest.graph(DECODER))


def _record_check(manifest: Manifest, verification: dict | None) -> None:
    if verification is not None:
        manifest.verification = manifest.part(DECODER).verification = verification


def run_fusions(folder: Path, manifest: Manifest, checker, external_threshold: int = 1 << 30) -> list[dict]:
    """optimize/fusions on the verified decoder graph (ORT fusions, MatMul packing, reshape
    chains; for GroupQueryAttention graphs the rotary and packed q/k/v inside it), each kept
    only when it verifies again at the fp32 tolerances. Passes fold or drop an overridable
    initializer, so an exported graph's `logits_to_keep` is taken out first and put back."""
    from onnxport.optimize.logits_to_keep import LogitsToKeep, WithoutLogitsToKeep
    from onnxport.optimize.passes import fusion_passes

    graph = decoder_graph(folder, manifest)
    readd = WithoutLogitsToKeep()(graph).modified
    check = checker.tolerance("float32") if checker is not None else None
    done = []
    for p in fusion_passes(graph.entry, external_threshold):
        result = Verified(p, check)(graph)
        graph.entry.optimization = [*(graph.entry.optimization or []), result.record]
        if result.modified:
            _record_check(manifest, result.verification)
        done.append(result.record)
    if readd:
        LogitsToKeep()(graph)
    return done


def convert_decoder(folder: Path, manifest: Manifest, cfg: ExportConfig, vcfg: VerifyConfig, checker,
                    ranges: dict | None = None) -> dict:
    """optimize/precision on the verified fp32 decoder graph: fp16 (guarded: each candidate
    verified against the fp32 PyTorch model with the fp16 tolerances), bf16 compute (checked on
    its CPU emulation twin) or bf16-stored weights. The manifest's graph I/O, KV dtype,
    precision and verification records follow."""
    from onnxport.optimize.precision import Bfloat16Compute, Bfloat16Weights, Float16
    from onnxport.spec import feeds
    from onnxport.verify.decoder import cases_for, with_io_dtypes

    graph = decoder_graph(folder, manifest)
    entry = graph.entry
    threshold = cfg.external_data_threshold_bytes
    if cfg.dtype == "float16":
        samples = [feeds(entry.inputs, c.sizes, vcfg.seed + i, manifest.model.vocab_size, left_pad=c.left_pad,
                         right_pad=c.right_pad) for i, c in enumerate(cases_for(entry))]
        # logits stay fp32; so do inputs_embeds (the embedding graph and the pipelines hand them over)
        keep = tuple(n for n in ("logits", "inputs_embeds", "last_hidden_state")
                     if n in {t.name for t in [*entry.inputs, *entry.outputs]})
        conversion, tolerance = Float16(samples, keep, cfg.fp16_headroom, threshold, vcfg.segment_bytes, ranges), "float16"
    elif cfg.bf16_compute:
        io = tuple(t.name for t in [*entry.inputs, *entry.outputs])
        conversion, tolerance = Bfloat16Compute(io, threshold), "bfloat16-compute"
    else:
        conversion, tolerance = Bfloat16Weights(threshold), "bfloat16"
    check = checker.tolerance(tolerance) if cfg.verify and checker is not None else None
    result = Verified(conversion, check, required=True)(graph)
    new = with_io_dtypes(entry, graph.path)
    entry.inputs, entry.outputs = new.inputs, new.outputs
    entry.precision = result.record
    if manifest.kv_cache is not None:
        manifest.kv_cache.dtype = next((t.dtype for t in entry.inputs if t.name in manifest.kv_cache.past_names),
                                       manifest.kv_cache.dtype)
    if result.verification is not None:
        result.verification["float32_graph_ok"] = bool(manifest.verification and manifest.verification.get("ok"))
        _record_check(manifest, result.verification)
    return entry.precision


def add_logits_to_keep(folder: Path, manifest: Manifest) -> dict:
    """The optional `logits_to_keep` input on the finished monolithic decoder graph."""
    from onnxport.optimize.logits_to_keep import LogitsToKeep

    return LogitsToKeep()(decoder_graph(folder, manifest)).record


def convert_split(folder: Path, manifest: Manifest, split: SplitConfig, cfg: ExportConfig, vcfg: VerifyConfig,
                  shared_weights: str) -> None:
    """optimize/precision on every graph of a verified split bundle: fp16 compute (the guard
    keeps in fp32 the nodes past fp16's range on each graph's own sample inputs) or bf16-stored
    weights; graph I/O stays float32, so the split runtime chains the graphs as before. Shared
    weights are shared again. The caller verifies the bundle again at the dtype's tolerances."""
    from onnxport.bundle.weights import share_weights
    from onnxport.export.split import example_feeds
    from onnxport.optimize.precision import Bfloat16Weights, Float16

    graphs = [g for g in manifest.graphs if g.file.endswith(".onnx")]
    for i, g in enumerate(graphs):
        if cfg.dtype == "float16":
            past = 4 if split.static else 9
            sizes = {"sequence_length": 7, "past_sequence_length": past,
                     "total_sequence_length": 7 if g.role == "block" else past + 1}
            sample = example_feeds(g, sizes, vcfg.seed + i, manifest.model.vocab_size,
                                   past if g.role == "block_cache" else 0)
            conversion = Float16([sample], tuple(t.name for t in [*g.inputs, *g.outputs]), cfg.fp16_headroom,
                                 cfg.external_data_threshold_bytes, vcfg.segment_bytes)
        else:
            conversion = Bfloat16Weights(cfg.external_data_threshold_bytes)
        g.precision = conversion(GraphFile(folder, g)).record
    if split.share_weights:
        share_weights(folder, [g.file for g in graphs], shared_weights)
    for g in graphs:
        g.external_data = sorted(set(external_locations(folder / g.file)))


def module_check(part, vcfg: VerifyConfig):
    """check(candidate, entry) for a module graph: verify/module against the PyTorch module at
    every size the part declares."""
    from onnxport.errors import VerificationError
    from onnxport.verify.module import verify_part

    def check(candidate: Path, entry) -> tuple[bool, str, dict | None]:
        try:
            record = verify_part(part, candidate, vcfg)
        except VerificationError as e:
            return False, e.message, None
        worst = max(record["results"], key=lambda r: r["max_abs_diff"] / max(r["bound"], 1e-30))
        return True, f"{worst['output']}: max|diff| {worst['max_abs_diff']:.3g} (bound {worst['bound']:.3g})", record

    return check


def convert_module(part, graph, folder: Path, cfg: ExportConfig, vcfg: VerifyConfig) -> dict:
    """optimize/precision on a verified encoder / module graph: fp16 compute (guarded: every
    candidate verified against the PyTorch module at every size with the fp16 tolerances) or
    bf16-stored weights. Inputs and outputs stay float32, so runners feed what they fed."""
    from onnxport.optimize.precision import Bfloat16Weights, Float16

    io = tuple(t.name for t in [*graph.inputs, *graph.outputs])
    if cfg.dtype == "float16":
        samples = []
        for sizes in part.sizes:
            inputs, _ = part.case(sizes)
            samples.append({s.name: t.numpy() for s, t in zip(part.inputs, inputs)})
        conversion = Float16(samples, io, cfg.fp16_headroom, cfg.external_data_threshold_bytes, vcfg.segment_bytes)
    else:
        conversion = Bfloat16Weights(cfg.external_data_threshold_bytes, label=f"{graph.name}: ")
    check = module_check(part, vcfg.for_dtype(cfg.dtype)) if cfg.verify else None
    result = Verified(conversion, check, required=True)(GraphFile(folder, graph))
    graph.precision = result.record
    if result.verification is not None:
        graph.verification = {**result.verification, "dtype": cfg.dtype}
    return graph.precision


def cut_module(part, graph, folder: Path, cfg: ExportConfig, vcfg: VerifyConfig) -> list | None:
    """optimize/partition: a verified module graph past --max-graph-size becomes consecutive
    graphs under it, and the chain is verified against PyTorch end to end."""
    from onnxport.optimize.partition import cut_graph
    from onnxport.runtime.segments import ChainSession
    from onnxport.verify.module import verify_part

    chain = cut_graph(folder / graph.file, cfg.max_graph_bytes)
    if len(chain) < 2:
        return None
    graph.file, graph.chain = chain[0]["file"], chain
    graph.external_data = sorted({loc for c in chain for loc in external_locations(folder / c["file"])})
    log.info("%s cut into %d graphs under %d bytes", graph.name, len(chain), cfg.max_graph_bytes)
    if cfg.verify:
        session = ChainSession(folder, chain, [t.name for t in graph.inputs])
        record = verify_part(part, folder / graph.file, vcfg.for_dtype(cfg.dtype), session=session)
        graph.verification = {**record, "chain": f"{len(chain)} graphs run in turn"}
    return chain


def optimize_module_part(exported, folder: Path, cfg: ExportConfig, vcfg: VerifyConfig) -> None:
    """Precision, then cutting, on each graph of an encoder-like part."""
    if cfg.dtype != "float32":
        for part, graph in zip(exported.parts, exported.graphs):
            convert_module(part, graph, folder, cfg, vcfg)
    if cfg.max_graph_bytes is not None:
        for part, graph in zip(exported.parts, exported.graphs):
            cut_module(part, graph, folder, cfg, vcfg)
