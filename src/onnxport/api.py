"""The public Python API the CLI calls: export, export_encoder, export_module, verify, Generator.

`export` reads like the pipeline, one call per stage, each in its own room:

    load (checkpoint.py) -> plan (recipes/: one recipe per part) -> per part: load weights ->
    export (export/) -> optimize (optimize/, no passes yet) -> bundle (bundle/) -> verify (verify/)

A checkpoint yields every part its model_type has (qwen2_5_vl: a text decoder and a vision
encoder) into one bundle; `parts=` picks some.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from onnxport.bundle import (
    DECODER,
    ENCODER,
    GQA_ATTENTION,
    MODULES,
    MONOLITHIC,
    RIGHT_PADDING,
    SPLIT,
    ExportInfo,
    Layout,
    Manifest,
    ModelInfo,
    Part,
    Source,
    atomic_bundle,
    external_locations,
    read_manifest,
    record_files,
    write_manifest,
)
from onnxport.checkpoint import Checkpoint, open_checkpoint
from onnxport.config import ExportConfig, QuantConfig, SplitConfig, VerifyConfig
from onnxport.errors import CheckpointError, ExportError, InputError, VerificationError
from onnxport.recipes.base import DecoderLM
from onnxport.runtime import GenerationResult, Generator

log = logging.getLogger(__name__)

#: the one weights file the graphs of a split bundle share
SHARED_WEIGHTS = "weights.data"

__all__ = ["GenerationResult", "Generator", "export", "export_encoder", "export_module", "optimize", "quantize",
           "verify", "versions"]


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("onnxport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# --- the pipeline -------------------------------------------------------------------------------

def export(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(),
           verify_cfg: VerifyConfig = VerifyConfig(), split: SplitConfig | None = None,
           parts: tuple[str, ...] | None = None) -> Manifest:
    """Export every part of a local checkpoint (or `parts`) to a verified bundle at `out`.

    `split=None` writes the decoder as one graph; a SplitConfig writes the NPU split layout."""
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    if split is None and cfg.max_part_bytes is not None:
        split = _split_for_size(ckpt, parts, cfg)
    recipes = plan(ckpt, parts, split, cfg)
    with atomic_bundle(out, cfg.force) as tmp:
        manifest = new_manifest(ckpt, recipes, cfg, split)
        loaded: dict[str, object] = {}  # parts loaded by the same class share one model
        pipelines = []  # what recipes say about chaining the parts at run time
        for name, recipe in recipes.items():
            key = getattr(recipe, "model_class", "") or f"part:{name}"
            streamed = cfg.low_memory and isinstance(recipe, DecoderLM)
            if streamed:
                model = load_skeleton(recipe, ckpt, cfg, split)
            else:
                model = loaded[key] if key in loaded else load_model(recipe, ckpt, cfg)
                loaded = {key: model}
            if isinstance(recipe, DecoderLM):
                kv = export_decoder_part(recipe, model, ckpt, cfg, split, tmp, manifest)
                # optimize/: no passes yet (fusions, fp16, int4 come as passes there)
                write_manifest(tmp, manifest)  # the split runtime reads it during verification
                # the fp16 guard reads every value's range: the fp32 verification run records them
                ranges = _value_ranges() if cfg.dtype == "float16" and cfg.verify and not cfg.optimize else None
                if cfg.verify:
                    if streamed:  # the reference reads each module's weights when it runs
                        from onnxport.export.stream import streamed_reference

                        streamed_reference(model, ckpt, _torch_dtype(cfg.trace_dtype))
                    verify_decoder_part(recipe, model, kv, tmp, manifest, cfg, verify_cfg, split,
                                        observe=ranges.note if ranges is not None else None)
                if cfg.optimize:
                    optimize_decoder_graph(model, kv, tmp, manifest, cfg, verify_cfg)
                if cfg.dtype != "float32" and split is not None:
                    convert_split_precision(recipe, model, tmp, manifest, split, cfg, verify_cfg)
                elif cfg.dtype != "float32":
                    convert_decoder_precision(model, kv, tmp, manifest, cfg, verify_cfg,
                                              ranges.max if ranges is not None else None)
                if split is None:
                    add_optional_logits(tmp, manifest)
            else:
                export_encoder_part(name, recipe, model, cfg, verify_cfg, tmp, manifest)
            if callable(getattr(recipe, "write_files", None)):
                # files a part adds beside its graphs (Qwen2.5-Omni's speakers: a tensors-only
                # torch pickle, rewritten as safetensors); before the pipeline check reads them
                recipe.write_files(model, ckpt, tmp)
            if callable(getattr(recipe, "pipeline", None)):
                pipelines.append(check_pipeline(recipe, model, recipe.pipeline(model, manifest.graphs), ckpt, tmp,
                                                manifest, cfg))
            del model
        loaded.clear()
        manifest.pipeline = complete_pipeline(pipelines, manifest)
        manifest.source.files = copy_support_files(ckpt, tmp)
        record_files(tmp, manifest)
        manifest.export.seconds = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)
    return manifest


def _split_for_size(ckpt: Checkpoint, parts: tuple[str, ...] | None, cfg: ExportConfig) -> SplitConfig | None:
    """--max-part-size: a plain text decoder is cut by the split layout (layers per part);
    a decoder fed inputs_embeds stays one graph (only its encoder parts are cut)."""
    from onnxport.recipes import get_recipes

    recipes = get_recipes(ckpt.model_type, parts, ckpt.config)
    decoder = recipes.get(DECODER)
    if isinstance(decoder, DecoderLM) and not decoder.embeds_input:
        return SplitConfig(max_part_bytes=cfg.max_part_bytes)
    return None


def plan(ckpt: Checkpoint, parts: tuple[str, ...] | None, split: SplitConfig | None, cfg: ExportConfig) -> dict:
    """part name -> recipe, with the checks that need no model."""
    from onnxport.recipes import get_recipes

    recipes = get_recipes(ckpt.model_type, parts, ckpt.config)
    has_decoder = _text_decoder(recipes) is not None
    if split is not None and not has_decoder:
        raise InputError(f"--layout split applies to decoder LMs; {ckpt.model_type!r} has no text decoder part "
                         f"(its parts: {', '.join(recipes)})", "drop --layout/--static")
    if cfg.attention != "default" and (split is not None or not has_decoder):
        raise InputError(f"--attention {cfg.attention} applies to monolithic text decoders",
                         "drop --attention, or export the monolithic layout")
    if cfg.optimize and (split is not None or not has_decoder):
        raise InputError("--optimize applies to monolithic text decoders so far", "drop --optimize")
    if cfg.dtype != "float32" and split is not None and (cfg.bf16_compute or cfg.low_memory):
        raise InputError(f"--dtype {cfg.dtype} of a split layout: fp16, or bf16 weights (no --bf16-compute)",
                         "drop --bf16-compute, or export the monolithic layout")
    if split is not None and cfg.kv_naming != "optimum":
        raise InputError("--kv-naming seed applies to the monolithic layout only",
                         "split graphs name their cache past_key_values.{i}.key -> present.{i}.key")
    return recipes


def new_manifest(ckpt: Checkpoint, recipes: dict, cfg: ExportConfig, split: SplitConfig | None) -> Manifest:
    decoder = _text_decoder(recipes)
    task = decoder.task if decoder is not None else next(iter(recipes.values())).task
    kind = (SPLIT if split is not None else MONOLITHIC) if decoder is not None else MODULES
    return Manifest(
        task=task, versions=versions(),
        source=Source(str(ckpt.path.resolve()), ckpt.sha256()),
        model=ModelInfo(ckpt.model_type, "+".join(type(r).__name__ for r in recipes.values()),
                        ckpt.config.get("architectures")),
        export=ExportInfo("auto" if cfg.fallback and decoder is None else cfg.exporter, cfg.opset, cfg.dtype,
                          getattr(decoder, "attn_implementation", None)),
        layout=Layout(kind), graphs=[])


def _text_decoder(recipes: dict):
    """The decoder part's recipe when it is a text decoder LM; None without one, or when the
    `decoder` part is a module part (whisper's reads encoder states: module graphs)."""
    decoder = recipes.get(DECODER)
    return decoder if isinstance(decoder, DecoderLM) else None


def complete_pipeline(pipelines: list, manifest: Manifest):
    """The manifest's pipeline section: of those recipes proposed (`recipe.pipeline(model,
    graphs)`, called after its part is exported) whose graphs are all in the bundle, the one
    chaining the most graphs (Qwen2.5-Omni's any-to-any over its any-to-text), the first on a
    tie; None when parts it chains were not exported (`--part`)."""
    names = {g.name or g.file for g in manifest.graphs} | {g.file for g in manifest.graphs}
    for p in sorted((p for p in pipelines if p is not None), key=lambda p: -len(p.graphs)):
        if p is None:
            continue
        missing = [g for g in p.graphs.values() if g not in names]
        if not missing:
            return p
        log.info("no %s pipeline in the manifest: graph(s) %s not exported", p.kind, ", ".join(missing))
    return None


def check_pipeline(recipe, model, pipeline, ckpt: Checkpoint, folder: Path, manifest: Manifest,
                   cfg: ExportConfig):
    """Run the recipe's end-to-end check of the pipeline it proposes (`recipe.verify_pipeline(model,
    pipeline, folder, manifest)` returns the record or raises VerificationError) while its model
    is loaded, once every graph the pipeline chains is in the bundle; the record goes to
    `pipeline.verification`. The support files (tokenizer) are copied first: the check runs
    the bundle as the runtime will."""
    hook = getattr(recipe, "verify_pipeline", None)
    if pipeline is None or not cfg.verify or not callable(hook) or complete_pipeline([pipeline], manifest) is None:
        return pipeline
    copy_support_files(ckpt, folder)
    # runners read the bundle from disk: its manifest names this pipeline while it is checked
    previous, manifest.pipeline = manifest.pipeline, pipeline
    write_manifest(folder, manifest)
    try:
        pipeline.verification = hook(model, pipeline, folder, manifest)
    finally:
        manifest.pipeline = previous
    return pipeline


def _value_ranges():
    from onnxport.optimize.precision import ValueRanges

    return ValueRanges()


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(recipe, ckpt: Checkpoint, cfg: ExportConfig = ExportConfig()):
    """Check checkpoint shapes against the config (decoders), then load the part's model."""
    import torch

    _quiet_transformers()
    if isinstance(recipe, DecoderLM) and not ckpt.pickle_weights:
        import transformers

        from onnxport.export.weights import check_checkpoint_shapes

        try:
            config = transformers.AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError
            raise CheckpointError(f"transformers cannot read config.json: {str(e).splitlines()[0][:200]}",
                                  "check config.json against the model's documentation") from e
        cls = recipe.model_cls()
        check_checkpoint_shapes(ckpt, lambda: cls.from_config(config) if hasattr(cls, "from_config") else cls(config))
    return _load_or_explain(lambda: recipe.load_model(ckpt, getattr(torch, cfg.trace_dtype)))


def load_skeleton(recipe, ckpt: Checkpoint, cfg: ExportConfig, split: SplitConfig | None):
    """The decoder on the meta device for a bounded-memory export (`--low-memory`)."""
    import torch

    from onnxport.export.stream import skeleton_model

    if split is not None:
        raise InputError("--low-memory applies to the monolithic layout", "drop --layout split or --low-memory")
    from onnxport.hf.compat import require_transformers

    # 4.x rotary modules cannot run on the meta device (their scaling wrapper reads values)
    require_transformers(5, "--low-memory: the model is traced on the meta device")
    if ckpt.pickle_weights:
        raise InputError("--low-memory streams weights from safetensors; this checkpoint has pickle weights only",
                         "convert it to safetensors, or drop --low-memory")
    _quiet_transformers()
    model, buffers = _load_or_explain(lambda: skeleton_model(recipe, ckpt, getattr(torch, cfg.trace_dtype)))
    model._onnxport_buffers = buffers
    return model


def _load_or_explain(load):
    try:
        return load()
    except (CheckpointError, InputError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"loading the model failed: {str(e).strip().splitlines()[0][:300]}",
                              "the checkpoint does not match its config.json, or needs --model-class") from e


# --- decoder part -------------------------------------------------------------------------------

def export_decoder_part(recipe, model, ckpt: Checkpoint, cfg: ExportConfig, split: SplitConfig | None, folder: Path,
                        manifest: Manifest):
    """Export the text decoder (one graph, or the split layout) into `folder`, account for
    every weight, and fill the manifest's decoder sections. Returns the KV spec."""
    from dataclasses import asdict, replace

    from onnxport.export.decoder import export_decoder
    from onnxport.export.split import export_split
    from onnxport.export.weights import account_weights, onnx_arrays
    from onnxport.hf.compat import generate_pad_position, text_config

    kv = recipe.kv_spec(model)
    text = text_config(model.config)
    if split is not None and recipe.embeds_input:
        raise InputError(f"--layout split of {ckpt.model_type!r}: its decoder takes inputs_embeds (multimodal)",
                         "export the monolithic layout")
    if split is not None and (kv.has_states or kv.has_indexer):
        what = "recurrent states" if kv.has_states else "a sparse-attention indexer cache"
        raise InputError(f"--layout split needs a key/value cache; {type(model).__name__} keeps {what}",
                         "export it with the monolithic layout (drop --layout split)")
    bind = None
    if getattr(model, "_onnxport_buffers", None) is not None:  # --low-memory: weights streamed
        import torch

        from onnxport.export.decoder import WRAPPER_PREFIX
        from onnxport.export.stream import Binder, CheckpointWeights

        bind = Binder(CheckpointWeights(ckpt, model, model._onnxport_buffers, getattr(torch, cfg.trace_dtype)),
                      WRAPPER_PREFIX)
    io = {"embeds": recipe.embeds_input, "position_axes": recipe.position_axes,
          "hidden_output": recipe.hidden_output(model)}
    if split is None:
        try:
            graph, used = export_decoder(model, kv, cfg, folder / "model.onnx", bind=bind, **io)
        except ExportError as e:
            if not cfg.fallback or bind is not None:
                raise
            # --exporter auto: some architectures (encoder families used as decoders, say) fail
            # in torch.export but trace with TorchScript
            log.warning("dynamo failed on the decoder (%s); trying TorchScript", e.message[:200])
            ts = replace(cfg, exporter="torchscript", opset=min(cfg.opset, 20), fallback=False)
            try:
                graph, used = export_decoder(model, kv, ts, folder / "model.onnx", **io)
            except ExportError as e2:
                raise ExportError(f"{e.message}; TorchScript fallback: {e2.message}", e.hint) from e2
            graph.fallback_from = {"dynamo": e.message[:300]}
        graphs = [graph]
        if recipe.embeds_input:
            from onnxport.export.decoder import export_embedding

            embedding, read = export_embedding(recipe, model, cfg, folder / "embed_tokens.onnx", bind=bind)
            graphs.append(embedding)
            used = used | read
    else:
        if split.max_part_bytes is not None:
            from onnxport.export.split import pack_for_size

            split = replace(split, pack=pack_for_size(recipe, model, kv.num_layers, split.max_part_bytes))
            log.info("--max-part-size: %d layers per block graph", split.pack)
        graphs, used = export_split(recipe, model, kv, cfg, split, folder)
        manifest.layout = Layout(SPLIT, **asdict(split))
        if split.rope == "outside":
            rotary = recipe.base_model(model).rotary_emb
            manifest.layout.inv_freq = rotary.inv_freq.detach().float().tolist()
            manifest.layout.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if split is not None and split.share_weights:
        from onnxport.bundle.weights import share_weights

        stats = share_weights(folder, [g.file for g in graphs if g.file.endswith(".onnx")], SHARED_WEIGHTS)
        log.info("split weights shared: %s", stats)
    for g in graphs:
        g.part = DECODER
        g.external_data = sorted(set(external_locations(folder / g.file))) if g.file.endswith(".onnx") else []

    def graph_arrays() -> dict:
        return {f"{g.file}:{k}": v for g in graphs if g.file.endswith(".onnx")
                for k, v in onnx_arrays(folder / g.file).items()}

    weights = account_weights(model, set(ckpt.tensors), graph_arrays, used,
                              lambda unread: recipe.skipped_weights(model, unread))
    manifest.graphs = graphs + manifest.graphs
    manifest.kv_cache = kv_record(kv, cfg)
    manifest.weights = weights
    manifest.model.vocab_size, manifest.model.hidden_size = text.vocab_size, text.hidden_size
    manifest.model.num_layers = kv.num_layers
    manifest.model.max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    manifest.model.pad_position = generate_pad_position()
    manifest.parts.insert(0, Part(DECODER, DECODER, type(recipe).__name__, [g.file for g in graphs], weights=weights))
    return kv


def kv_record(kv, cfg: ExportConfig):
    from onnxport.bundle import KVCache
    from onnxport.spec import cache_dims, cache_entries

    entries = cache_entries(kv, cfg.kv_naming)
    layers = None if kv.is_uniform else [[x.key_heads, x.key_dim, x.value_heads, x.value_dim] for x in kv.layers]
    states = [[e.past, e.present, cache_dims(kv.layers[e.layer], e.what, cfg.kv_layout, None)[1:]]
              for e in entries if e.what not in ("key", "value", "indexer_key")] or None
    return KVCache(cfg.kv_layout, cfg.kv_naming, kv.num_layers, kv.num_kv_heads, kv.head_dim, cfg.trace_dtype,
                   [[e.past, e.present] for e in entries], layers, states, True if kv.has_states else None)


def verify_decoder_part(recipe, model, kv, folder: Path, manifest: Manifest, cfg: ExportConfig,
                        verify_cfg: VerifyConfig, split: SplitConfig | None, observe=None) -> dict:
    """ORT vs PyTorch for the decoder graphs; record it; raise VerificationError on a mismatch."""
    from onnxport.export.decoder import graph_wrapper
    from onnxport.verify.decoder import first_failure, verify_decoder, verify_embedding
    from onnxport.verify.split import verify_split

    if split is None:
        graph = manifest.graph("decoder")
        wrapper = graph_wrapper(model, kv, graph, manifest.kv_cache.layout)
        record = verify_decoder(wrapper, folder / graph.file, graph, manifest.model.vocab_size, verify_cfg,
                                reference=_reference_cache(model), observe=observe)
        embedding = next((g for g in manifest.graphs if g.role == "embedding" and g.part == DECODER), None)
        if embedding is not None:  # a decoder fed inputs_embeds: its token-embedding graph too
            embedding.verification = verify_embedding(recipe, model, folder / embedding.file, embedding,
                                                      manifest.model.vocab_size, verify_cfg)
            record["embedding"] = embedding.verification
            record["ok"] = record["ok"] and embedding.verification["ok"]
    else:
        record = verify_split(recipe, model, folder, manifest, split, cfg, verify_cfg)
    manifest.verification = record
    manifest.part(DECODER).verification = record
    if not record["ok"]:
        raise VerificationError(f"verification failed: {first_failure(record)}",
                                "ONNX Runtime disagrees with PyTorch for this model; nothing was written (see --debug)")
    return record


def convert_split_precision(recipe, model, folder: Path, manifest: Manifest, split: SplitConfig, cfg: ExportConfig,
                            verify_cfg: VerifyConfig) -> dict | None:
    """optimize/precision on every graph of a verified split bundle: fp16 compute (the guard
    keeps in fp32 the nodes past fp16's range on each graph's own sample inputs) or bf16-stored
    weights; graph I/O stays float32, so the split runtime chains the graphs as before. Shared
    weights are shared again. The bundle is then verified again with the dtype's tolerances
    (each graph against its PyTorch piece, and greedy tokens end to end)."""
    from onnxport.bundle.weights import share_weights
    from onnxport.export.split import example_feeds
    from onnxport.optimize.precision import to_bfloat16_weights, to_float16
    from onnxport.verify.decoder import first_failure
    from onnxport.verify.split import verify_split

    graphs = [g for g in manifest.graphs if g.file.endswith(".onnx")]
    for i, g in enumerate(graphs):
        path = folder / g.file
        if cfg.dtype == "float16":
            past = 4 if split.static else 9
            sizes = {"sequence_length": 7, "past_sequence_length": past,
                     "total_sequence_length": 7 if g.role == "block" else past + 1}
            sample = example_feeds(g, sizes, verify_cfg.seed + i, manifest.model.vocab_size,
                                   past if g.role == "block_cache" else 0)
            result = to_float16(path, [sample], None, keep_io=tuple(t.name for t in [*g.inputs, *g.outputs]),
                                headroom=cfg.fp16_headroom, external_threshold=cfg.external_data_threshold_bytes,
                                segment_bytes=verify_cfg.segment_bytes)
        else:
            result = to_bfloat16_weights(path, external_threshold=cfg.external_data_threshold_bytes)
        g.precision = result.record()
    if split.share_weights:
        share_weights(folder, [g.file for g in graphs], SHARED_WEIGHTS)
    for g in graphs:
        g.external_data = sorted(set(external_locations(folder / g.file)))
    if not cfg.verify:
        return None
    record = verify_split(recipe, model, folder, manifest, split, cfg, verify_cfg.for_dtype(cfg.dtype))
    record["tolerance"]["dtype"] = cfg.dtype
    manifest.verification = manifest.part(DECODER).verification = record
    if not record["ok"]:
        raise VerificationError(f"{cfg.dtype} split graphs drift past their tolerance: {first_failure(record)}",
                                "export the split layout in float32 (or --dtype bf16); nothing was written")
    return record


def convert_decoder_precision(model, kv, folder: Path, manifest: Manifest, cfg: ExportConfig,
                              verify_cfg: VerifyConfig, ranges: dict | None = None) -> dict:
    """optimize/precision: the verified fp32 decoder graph -> fp16 (guarded: each candidate is
    verified against the fp32 PyTorch model with the fp16 tolerances) or bf16-stored weights.
    The manifest's graph I/O, KV dtype, precision and verification records follow."""
    from onnxport.optimize.precision import to_bfloat16_compute, to_bfloat16_weights, to_float16
    from onnxport.spec import feeds
    from onnxport.verify.decoder import cases_for

    graph = manifest.graph(DECODER)
    path = folder / graph.file
    records: list[dict] = []  # one per candidate checked; the last is the accepted one
    check = _decoder_check(model, kv, manifest, graph, verify_cfg.for_dtype(cfg.dtype), records)

    if cfg.dtype == "float16":
        cases = cases_for(graph)
        samples = [feeds(graph.inputs, c.sizes, verify_cfg.seed + i, manifest.model.vocab_size, left_pad=c.left_pad,
                         right_pad=c.right_pad)
                   for i, c in enumerate(cases)]
        # logits stay fp32; so do inputs_embeds (the embedding graph and the pipelines hand them over)
        keep = tuple(n for n in ("logits", "inputs_embeds", "last_hidden_state")
                     if n in {t.name for t in [*graph.inputs, *graph.outputs]})
        result = to_float16(path, samples, check if cfg.verify else None, keep_io=keep, headroom=cfg.fp16_headroom,
                            external_threshold=cfg.external_data_threshold_bytes,
                            segment_bytes=verify_cfg.segment_bytes, ranges=ranges)
    elif cfg.bf16_compute:
        check = _decoder_check(model, kv, manifest, graph, verify_cfg.for_dtype("bfloat16-compute"), records)
        io = tuple(t.name for t in [*graph.inputs, *graph.outputs])
        result = to_bfloat16_compute(path, check if cfg.verify else None, keep_io=io,
                                     external_threshold=cfg.external_data_threshold_bytes)
    else:
        result = to_bfloat16_weights(path, external_threshold=cfg.external_data_threshold_bytes)
        if cfg.verify:
            ok, msg = check(path)
            if not ok:
                raise VerificationError(f"bf16 weights drift past their tolerance: {msg}",
                                        "export in float32; nothing was written")
    new = _with_io_dtypes(graph, path)
    graph.inputs, graph.outputs = new.inputs, new.outputs
    graph.external_data = sorted(set(external_locations(path)))
    graph.precision = result.record()
    if manifest.kv_cache is not None:
        manifest.kv_cache.dtype = next((t.dtype for t in graph.inputs if t.name in manifest.kv_cache.past_names),
                                       manifest.kv_cache.dtype)
    if records:
        records[-1]["float32_graph_ok"] = bool(manifest.verification and manifest.verification.get("ok"))
        manifest.verification = manifest.part(DECODER).verification = records[-1]
    return graph.precision


def optimize_decoder_graph(model, kv, folder: Path, manifest: Manifest, cfg: ExportConfig,
                           verify_cfg: VerifyConfig) -> list[dict]:
    """optimize/ passes on the verified decoder graph (ORT fusions, MatMul packing, reshape
    chains; for GroupQueryAttention graphs the rotary and packed q/k/v inside it), each kept
    only when it verifies again. A pass that makes the graph take right-padded batches is
    verified with right-padded cases and recorded as the graph's `padding`."""
    from dataclasses import replace

    from onnxport.optimize.fusions import RIGHT_PADDING_PASSES, run_pass
    from onnxport.optimize.logits_to_keep import NAME, remove_logits_to_keep

    graph = manifest.graph(DECODER)
    # passes fold or drop an overridable initializer: they run on the graph without it
    readd = NAME in (graph.optional_inputs or {}) and remove_logits_to_keep(folder / graph.file)
    if readd:
        graph.optional_inputs = {k: v for k, v in graph.optional_inputs.items() if k != NAME} or None
    done = []
    names = ["ort_fusions", "matmul_packing", "reshape_chains"]
    if graph.attention == GQA_ATTENTION and graph.padding is None:
        names.append("gqa_rotary")
    for name in names:
        records: list[dict] = []
        checked = replace(graph, padding=RIGHT_PADDING) if name in RIGHT_PADDING_PASSES else graph
        check = _decoder_check(model, kv, manifest, checked, verify_cfg, records) if cfg.verify else None
        rec = run_pass(folder / graph.file, name, check, cfg.external_data_threshold_bytes)
        if rec["applied"] and name in RIGHT_PADDING_PASSES:
            graph.padding = RIGHT_PADDING
        graph.optimization = [*(graph.optimization or []), rec]
        graph.external_data = sorted(set(external_locations(folder / graph.file)))
        if rec["applied"] and records:
            manifest.verification = manifest.part(DECODER).verification = records[-1]
        done.append(rec)
    if readd:
        add_optional_logits(folder, manifest)
    return done


def add_optional_logits(folder: Path, manifest: Manifest) -> dict:
    """optimize/logits_to_keep on the finished monolithic decoder graph: the optional input
    that lets a prompt's call compute the last position's logits only (the graph's outputs
    are unchanged when it is not fed). Recorded in the graph's `optional_inputs`."""
    from onnxport.optimize.logits_to_keep import add_logits_to_keep, optional_input_record

    graph = manifest.graph(DECODER)
    rec = add_logits_to_keep(folder / graph.file)
    if rec["applied"]:
        graph.optional_inputs = {**(graph.optional_inputs or {}), **optional_input_record()}
    else:
        log.info("logits_to_keep not added: %s", rec["result"])
    return rec


def _reverify_pipeline(recipe, model, folder: Path, manifest: Manifest) -> None:
    """`onnxport verify`: the chained pipeline's end-to-end check again, by the recipe that
    proposed it (its model is loaded now)."""
    hook = getattr(recipe, "verify_pipeline", None)
    propose = getattr(recipe, "pipeline", None)
    if manifest.pipeline is None or not callable(hook) or not callable(propose):
        return
    proposed = propose(model, manifest.graphs)
    if proposed is None or proposed.kind != manifest.pipeline.kind:
        return
    manifest.pipeline.verification = hook(model, manifest.pipeline, folder, manifest)


def _verify_bf16_compute(recipe, model, folder: Path, manifest: Manifest, verify_cfg: VerifyConfig) -> dict:
    """Re-verify a bf16-compute decoder on its CPU emulation twin (written beside the graph,
    removed after)."""
    from onnxport.optimize.precision import emulate_bf16

    graph = manifest.graph(DECODER)
    twin = folder / f".{Path(graph.file).stem}.emulated.onnx"
    records: list[dict] = []
    try:
        emulate_bf16(folder / graph.file, twin)
        check = _decoder_check(model, recipe.kv_spec(model), manifest, graph, verify_cfg.for_dtype("bfloat16-compute"),
                               records)
        ok, msg = check(twin)
    finally:
        twin.unlink(missing_ok=True)
    manifest.verification = manifest.part(DECODER).verification = {**records[-1], "checked_on": "CPU emulation"}
    if not ok:
        raise VerificationError(f"verification failed: {msg}", "the bf16-compute graph drifts; re-export it")
    return records[-1]


def _reference_cache(model) -> dict:
    """PyTorch outputs per verification case, kept on the model: the fp32 check, fusions and
    the fp16 guard's attempts compare against the same reference, computed once (a streamed
    7B reference costs a full read of the checkpoint per case)."""
    if getattr(model, "_onnxport_reference", None) is None:
        model._onnxport_reference = {}
    return model._onnxport_reference


def _decoder_check(model, kv, manifest: Manifest, graph, vcfg: VerifyConfig, records: list):
    """check(candidate file) -> (ok, message): the decoder verification against PyTorch of a
    rewritten graph (its I/O dtypes read from the file), each record appended to `records`."""
    from onnxport.export.decoder import graph_wrapper
    from onnxport.verify.decoder import first_failure, verify_decoder

    wrapper = graph_wrapper(model, kv, graph, manifest.kv_cache.layout)

    def check(candidate: Path) -> tuple[bool, str]:
        g = _with_io_dtypes(graph, candidate)
        records.append(verify_decoder(wrapper, candidate, g, manifest.model.vocab_size, vcfg,
                                      reference=_reference_cache(model)))
        return records[-1]["ok"], first_failure(records[-1]) or _worst(records[-1])

    return check


def _with_io_dtypes(graph, onnx_file: Path):
    """`graph` with the I/O dtypes of the saved file (a conversion changes float ones)."""
    from dataclasses import replace

    import onnx

    m = onnx.load(str(onnx_file), load_external_data=False)
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
             for v in [*m.graph.input, *m.graph.output]}
    return replace(graph, inputs=[replace(t, dtype=types.get(t.name, t.dtype)) for t in graph.inputs],
                   outputs=[replace(t, dtype=types.get(t.name, t.dtype)) for t in graph.outputs])


def _worst(record: dict) -> str:
    """'logits: max|diff| 9.4e-03 (bound 6.4e-02), min cosine 0.99998' over all cases."""
    logits = [c["outputs"]["logits"] for c in record["cases"] if "logits" in c["outputs"]]
    if not logits:
        return "ok"
    r = max(logits, key=lambda x: x["max_abs_diff"] / x["bound"])
    return (f"logits: max|diff| {r['max_abs_diff']:.3g} (bound {r['bound']:.3g}), "
            f"min cosine {min(x['cosine'] for x in logits):.6f}")


# --- encoder / module parts ---------------------------------------------------------------------

def _exporters(cfg: ExportConfig) -> list[str]:
    return ["dynamo", "torchscript"] if cfg.fallback else [cfg.exporter]


def export_encoder_part(name: str, recipe, model, cfg: ExportConfig, verify_cfg: VerifyConfig, folder: Path,
                        manifest: Manifest) -> None:
    """Export (and unless --no-verify, verify) the graphs of one encoder-like part."""
    parts = recipe.parts(model)
    graphs = export_module_parts(parts, folder, cfg, verify_cfg, part_name=name)
    if cfg.dtype != "float32":
        for part, graph in zip(parts, graphs):
            convert_module_precision(part, graph, folder, cfg, verify_cfg)
    if cfg.max_part_bytes is not None:
        for part, graph in zip(parts, graphs):
            cut_module_graph(part, graph, folder, cfg, verify_cfg)
    manifest.graphs += graphs
    record = None
    if cfg.verify:
        record = {"ok": all(g.verification["ok"] for g in graphs), "graphs": [g.name for g in graphs]}
    manifest.parts.append(Part(name, ENCODER, type(recipe).__name__, [g.file for g in graphs], record))
    if manifest.layout.kind == MODULES:
        manifest.verification = _modules_summary(manifest)


def cut_module_graph(part, graph, folder: Path, cfg: ExportConfig, verify_cfg: VerifyConfig) -> list | None:
    """optimize/partition: a verified module graph past --max-part-size becomes consecutive part
    graphs under it, and the chain is verified against PyTorch end to end."""
    from onnxport.optimize.partition import cut_graph
    from onnxport.runtime.segments import ChainSession
    from onnxport.verify.module import verify_part

    chain = cut_graph(folder / graph.file, cfg.max_part_bytes)
    if len(chain) < 2:
        return None
    graph.file, graph.chain = chain[0]["file"], chain
    graph.external_data = sorted({loc for c in chain for loc in external_locations(folder / c["file"])})
    log.info("%s cut into %d parts under %d bytes", graph.name, len(chain), cfg.max_part_bytes)
    if cfg.verify:
        vcfg = verify_cfg.for_dtype(cfg.dtype)
        session = ChainSession(folder, chain, [t.name for t in graph.inputs])
        record = verify_part(part, folder / graph.file, vcfg, session=session)
        graph.verification = {**record, "chain": f"{len(chain)} part graphs run in turn"}
    return chain


def convert_module_precision(part, graph, folder: Path, cfg: ExportConfig, verify_cfg: VerifyConfig) -> dict:
    """optimize/precision on a verified encoder / module graph: fp16 compute (guarded: every
    candidate verified against the PyTorch module at every size with the fp16 tolerances) or
    bf16-stored weights. Inputs and outputs stay float32, so runners feed what they fed."""
    from onnxport.optimize.precision import to_bfloat16_weights, to_float16
    from onnxport.verify.module import verify_part

    path = folder / graph.file
    vcfg = verify_cfg.for_dtype(cfg.dtype)
    records: list[dict] = []

    def check(candidate: Path) -> tuple[bool, str]:
        try:
            records.append(verify_part(part, candidate, vcfg))
        except VerificationError as e:
            return False, e.message
        worst = max(records[-1]["results"], key=lambda r: r["max_abs_diff"] / max(r["bound"], 1e-30))
        return True, f"{worst['output']}: max|diff| {worst['max_abs_diff']:.3g} (bound {worst['bound']:.3g})"

    io = tuple(t.name for t in [*graph.inputs, *graph.outputs])
    if cfg.dtype == "float16":
        samples = []
        for sizes in part.sizes:
            inputs, _ = part.case(sizes)
            samples.append({s.name: t.numpy() for s, t in zip(part.inputs, inputs)})
        result = to_float16(path, samples, check if cfg.verify else None, keep_io=io, headroom=cfg.fp16_headroom,
                            external_threshold=cfg.external_data_threshold_bytes,
                            segment_bytes=verify_cfg.segment_bytes)
    else:
        result = to_bfloat16_weights(path, external_threshold=cfg.external_data_threshold_bytes)
        if cfg.verify:
            ok, msg = check(path)
            if not ok:
                raise VerificationError(f"{graph.name}: bf16 weights drift past their tolerance: {msg}",
                                        "export in float32; nothing was written")
    graph.precision = result.record()
    graph.external_data = sorted(set(external_locations(path)))
    if records:
        graph.verification = {**records[-1], "dtype": cfg.dtype}
    return graph.precision


def _modules_summary(manifest: Manifest) -> dict | None:
    checked = [g for g in manifest.named_graphs() if g.verification is not None]
    if not checked:
        return None
    return {"ok": all(g.verification["ok"] for g in checked), "graphs": [g.name for g in checked]}


def export_module_parts(parts: list, folder: Path, cfg: ExportConfig, verify_cfg: VerifyConfig,
                        part_name: str | None = None) -> list:
    """Export each ModulePart into `folder` (each candidate graph proven by verify/ unless
    --no-verify); return the graph entries."""
    from onnxport.export.module import export_part
    from onnxport.verify.module import part_check

    check = part_check(verify_cfg, cfg.skip_patches) if cfg.verify else None
    return [export_part(p, folder, _exporters(cfg), cfg.opset, check, cfg.external_data_threshold_bytes,
                        cfg.skip_patches, part_name=part_name) for p in parts]


def export_encoder(model_dir: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(exporter="auto"),
                   verify_cfg: VerifyConfig = VerifyConfig()) -> Manifest:
    """Export the encoder-like parts of a checkpoint (vision tower, audio encoder, codec)."""
    from onnxport.recipes import parts_for

    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    names = tuple(p for p in parts_for(ckpt.model_type, ckpt.config) if p != DECODER)
    if not names:
        plan(ckpt, None, None, cfg)  # unknown types: the registry's error
        raise InputError(f"model_type {ckpt.model_type!r} is a decoder LM", "use onnxport export")
    return export(model_dir, out, cfg, verify_cfg, parts=names)


def copy_support_files(ckpt: Checkpoint, folder: Path) -> list[str]:
    """config.json, tokenizer files and the feature extractor's settings, so the bundle is
    self-contained."""
    names = []
    extra = [f for f in [ckpt.path / "preprocessor_config.json"] if f.is_file()]
    for f in [ckpt.path / "config.json", *ckpt.tokenizer_files(), *extra]:
        shutil.copy2(f, folder / f.name)
        names.append(f.name)
    return names


# --- export-module ------------------------------------------------------------------------------

def export_module(model_dir: str | Path, out: str | Path, module_path: str, inputs: list[str],
                  cfg: ExportConfig = ExportConfig(exporter="auto"), verify_cfg: VerifyConfig = VerifyConfig(),
                  outputs: list[str] | None = None, method: str = "forward", verify_dims: list[str] | None = None,
                  model_class: str | None = None, trust_remote_code: bool = False) -> Manifest:
    """Export the submodule at `module_path` of the checkpoint's model with the given input
    specs (`NAME:DTYPE[DIMS]`, named dims dynamic), applying the rewrites; verified against
    PyTorch at the example sizes and at a second set (`verify_dims`, default: each named dim
    grown)."""
    from onnxport.recipes.parts import module_part

    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir, allow_pickle=cfg.allow_pickle)
    with atomic_bundle(out, cfg.force) as tmp:
        _quiet_transformers()
        model = _load_or_explain(lambda: _load_any(ckpt, cfg.trace_dtype, model_class, trust_remote_code))
        part = module_part(model, module_path, inputs, outputs, method, verify_dims)
        graphs = export_module_parts([part], tmp, cfg, verify_cfg)
        manifest = Manifest(
            task="module", versions=versions(), source=Source(str(ckpt.path.resolve()), ckpt.sha256()),
            model=ModelInfo(ckpt.model_type, "export-module", getattr(model.config, "architectures", None),
                            module=module_path, method=method),
            export=ExportInfo("auto" if cfg.fallback else cfg.exporter, cfg.opset, cfg.dtype),
            layout=Layout(MODULES), graphs=graphs,
            parts=[Part(part.name, ENCODER, "export-module", [g.file for g in graphs])])
        manifest.verification = manifest.parts[0].verification = _modules_summary(manifest)
        manifest.source.files = copy_support_files(ckpt, tmp)
        record_files(tmp, manifest)
        manifest.export.seconds = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)
    return manifest


def _load_any(ckpt: Checkpoint, dtype: str, model_class: str | None, trust_remote_code: bool):
    """The checkpoint's own architecture class (so module paths match the checkpoint's names),
    or `model_class`; remote code only when asked for."""
    import torch
    import transformers

    from onnxport.recipes.base import from_pretrained

    auto_map = ckpt.config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise CheckpointError("this checkpoint's model class is remote code (auto_map in config.json)",
                              "pass --trust-remote-code if you trust its source")
    if model_class:
        if not hasattr(transformers, model_class):
            raise InputError(f"transformers has no class {model_class!r}", "e.g. --model-class AutoModel")
        cls = getattr(transformers, model_class)
    elif auto_map:
        cls = transformers.AutoModel
    else:
        archs = [a for a in ckpt.config.get("architectures") or [] if hasattr(transformers, a)]
        cls = getattr(transformers, archs[0]) if archs else transformers.AutoModel
    try:
        return from_pretrained(cls, ckpt, getattr(torch, dtype), "eager", trust_remote_code)
    except (TypeError, ValueError):  # remote-code classes that take no attn_implementation
        return from_pretrained(cls, ckpt, getattr(torch, dtype), None, trust_remote_code)


# --- optimize -----------------------------------------------------------------------------------

def optimize(bundle: str | Path, out: str | Path, model_dir: str | Path | None = None, check: bool = True,
             verify_cfg: VerifyConfig = VerifyConfig(), force: bool = False, allow_pickle: bool = False) -> Manifest:
    """`onnxport optimize`: the optimize/ passes (what `export --optimize` runs) on the decoder
    of an exported float32 bundle, written as a new bundle at `out`. Each pass is verified
    against the source checkpoint (the export's, or `model_dir`) and rolled back when it
    breaks parity; the manifest lists every pass with its fused-op counts."""
    from onnxport.recipes import get_recipes

    src = Path(bundle)
    manifest = read_manifest(src)
    if manifest.kv_cache is None or manifest.is_split or manifest.kv_cache.step_only:
        raise InputError("onnxport optimize takes a monolithic decoder bundle",
                         "export one with onnxport export (the default layout)")
    graph = manifest.graph(DECODER)
    if (manifest.export.dtype or "float32") != "float32" or graph.quantization:
        raise InputError(f"the bundle is {'quantized' if graph.quantization else manifest.export.dtype}: passes run on "
                         "the float32 graph", "optimize the float32 bundle, then convert or quantize it")
    if graph.optimization:
        raise InputError(f"{src} is already optimized ({', '.join(r['name'] for r in graph.optimization)})",
                         "optimize the bundle written by onnxport export")
    recipe = ckpt = None
    if check:  # the passes are verified against the checkpoint the bundle came from
        ckpt = open_checkpoint(Path(model_dir) if model_dir else Path(manifest.source.path), allow_pickle=allow_pickle)
        if model_dir is None and ckpt.sha256() != manifest.source.sha256:
            raise CheckpointError(f"the checkpoint at {manifest.source.path} changed since the export (sha256 "
                                  "differs)", "pass --model with the checkpoint the bundle was exported from")
        recipe = _text_decoder(get_recipes(ckpt.model_type, (DECODER,), ckpt.config))
        if recipe is None:
            raise InputError(f"{ckpt.model_type!r} has no text decoder part to optimize", "check the bundle's source")
    with atomic_bundle(out, force) as tmp:
        for f in src.iterdir():
            if f.name != "manifest.json":
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        model = load_model(recipe, ckpt) if check else None
        kv = recipe.kv_spec(model) if check else None
        optimize_decoder_graph(model, kv, tmp, manifest, ExportConfig(verify=check, optimize=True), verify_cfg)
        del model
        record_files(tmp, manifest)
        write_manifest(tmp, manifest)
    return manifest


# --- quantize -----------------------------------------------------------------------------------

def quantize(bundle: str | Path, out: str | Path, cfg: QuantConfig = QuantConfig()) -> Manifest:
    """Weight-only int4/int8 (MatMulNBits) of a monolithic fp32 decoder bundle into a new
    bundle at `out`, gated: the held-out perplexity and greedy agreement of the quantized graph
    against the source bundle must meet `cfg`; the most sensitive layers move to int8 until
    they do, else nothing is written. onnxruntime + numpy only."""
    import math
    from dataclasses import replace

    from onnxport.optimize.quantize import (
        ESCALATION,
        QuantSpec,
        awq_scales,
        calibrate,
        module_names,
        quantize_graph,
        sensitivity,
    )
    from onnxport.verify.quality import calibration_split, greedy_agreement, perplexity

    t0 = time.perf_counter()
    src = Path(bundle)
    manifest = read_manifest(src)
    if manifest.kv_cache is None or manifest.is_split or manifest.kv_cache.step_only:
        raise InputError("onnxport quantize takes a monolithic text-decoder bundle",
                         "export one with onnxport export (the default layout)")
    if (manifest.export.dtype or "float32") != "float32" or manifest.graph(DECODER).quantization:
        raise InputError(f"the bundle is already {manifest.export.dtype if manifest.export.dtype != 'float32' else 'quantized'}",
                         "quantize the float32 bundle")
    graph = manifest.graph(DECODER)
    text = Path(cfg.calib).read_text(encoding="utf-8") if cfg.calib else _default_calibration_text()
    reference = Generator(src)
    calib, held, prompts = calibration_split(text, reference.tokenizer)
    if len(calib) < 16 or len(held) < 64:
        raise InputError(f"the calibration text gives {len(calib) + len(held)} tokens; at least 80 are needed",
                         "pass a longer --calib text")
    spec = QuantSpec(cfg.bits, cfg.block_size, cfg.symmetric, cfg.accuracy_level)
    acts = calibrate(src / graph.file, reference.prefill_feeds(calib))
    scales = awq_scales(src / graph.file, acts, spec) if cfg.method == "awq" else None
    errors = sensitivity(src / graph.file, acts, spec, scales)
    del acts
    if not errors:
        raise InputError("the decoder graph has no MatMul with a constant weight to quantize",
                         "export the bundle with onnxport export (dynamo exporter)")
    ppl_fp = perplexity(reference, held)
    attempts = []
    with atomic_bundle(out, cfg.force) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in {graph.file, *graph.external_data, "manifest.json"}:
                shutil.copy2(f, tmp / f.name)
        steps = ESCALATION if cfg.bits == 4 and cfg.escalate else (0.0,)
        for frac in steps:
            over = [n for n, e in errors.items() if cfg.max_error is not None and e > cfg.max_error and cfg.bits == 4]
            int8 = list(dict.fromkeys(list(errors)[: math.ceil(frac * len(errors))] + over))
            if attempts and len(int8) == attempts[-1]["int8_layers"]:
                continue  # --max-error already moved these
            for f in (tmp / graph.file, tmp / (graph.file + ".data")):
                f.unlink(missing_ok=True)
            folded = quantize_graph(src / graph.file, tmp / graph.file, spec, int8, cfg.external_data_threshold_bytes,
                                    scales, cfg.embedding)
            q = replace(graph, external_data=sorted(set(external_locations(tmp / graph.file))), files=None)
            qm = replace(manifest, graphs=[q if g is graph else g for g in manifest.graphs])
            write_manifest(tmp, qm)
            gen = Generator(tmp)
            ppl_q = perplexity(gen, held)
            agree = greedy_agreement(gen, reference, prompts, cfg.agreement_tokens)
            ok = ppl_q <= ppl_fp * (1 + cfg.max_ppl_increase) and (cfg.min_agreement is None or
                                                                   agree["fraction"] >= cfg.min_agreement)
            attempts.append({"int8_layers": len(int8), "perplexity": round(ppl_q, 4),
                             "agreement": agree["fraction"], "ok": ok})
            log.info("quantize: %d layers int8 -> ppl %.3f (fp %.3f), agreement %.3f", len(int8), ppl_q, ppl_fp,
                     agree["fraction"])
            del gen
            if ok:
                break
        if not attempts[-1]["ok"]:
            raise VerificationError(
                f"int{cfg.bits} quality gate not met: held-out perplexity {ppl_q:.3f} vs {ppl_fp:.3f} "
                f"(max +{cfg.max_ppl_increase:.0%}), greedy agreement {agree['fraction']:.2f}"
                + (f" (min {cfg.min_agreement})" if cfg.min_agreement is not None else "")
                + (f" with {len(int8)} of {len(errors)} layers at int8" if int8 else ""),
                "loosen --max-ppl-increase / --min-agreement, use --bits 8 or a smaller --block-size; nothing was written")
        bits = {n: (8 if n in set(int8) else cfg.bits) for n in errors}
        fallback = None
        if int8 and cfg.bits == 4:
            first = attempts[0]
            fallback = {"int8_layers": len(int8), "of": len(errors),
                        "why": (f"with {first['int8_layers']} layers at int8 the held-out perplexity was "
                                f"{first['perplexity']:.3f} vs the source's {ppl_fp:.3f} "
                                f"({first['perplexity'] / ppl_fp - 1:+.1%}; allowed +{cfg.max_ppl_increase:.0%})"
                                + (f" and greedy agreement {first['agreement']:.2f} (min {cfg.min_agreement})"
                                   if cfg.min_agreement is not None else "")
                                if not first["ok"] else
                                f"their relative output error exceeds --max-error {cfg.max_error}")}
            if len(int8) == len(errors) and not cfg.allow_fallback:
                raise VerificationError(
                    f"--bits 4: the quality gate moved all {len(errors)} layers to int8: {fallback['why']}",
                    "pass --allow-fallback to write the int8 result, or try --method awq, --asymmetric, a smaller "
                    "--block-size or a looser --max-ppl-increase; nothing was written")
        modules = module_names(src / graph.file)
        q.quantization = {
            "method": cfg.method, "bits": cfg.bits, "block_size": cfg.block_size, "symmetric": cfg.symmetric,
            "fallback": fallback,
            "accuracy_level": cfg.accuracy_level or None, "format": "com.microsoft.MatMulNBits",
            "embedding": f"int{cfg.bits} GatherBlockQuantized" if cfg.embedding else "float32",
            "awq": {"scaled_groups": len(scales), "applied_as": "Mul by 1/s before each group, W * s packed"}
            if scales is not None else None,
            "layers": {f"int{b}": sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
            "bias_adds_folded": folded,
            "per_layer": [{"node": n, "module": modules.get(n), "bits": bits[n], "relative_error": round(e, 5)}
                          for n, e in errors.items()],
            "perplexity": {"source": round(ppl_fp, 4), "quantized": round(ppl_q, 4), "heldout_tokens": len(held)},
            "greedy_agreement": agree,
            "gate": {"max_ppl_increase": cfg.max_ppl_increase, "min_agreement": cfg.min_agreement,
                     "max_error": cfg.max_error,
                     "calibration": cfg.calib or "onnxport/data/calib.txt", "calibration_tokens": len(calib),
                     "attempts": attempts},
        }
        # the source's PyTorch comparison does not describe the quantized graph: its gate does
        qm.verification = {"ok": True, "kind": "quality gate against the source bundle",
                           "perplexity": q.quantization["perplexity"], "greedy_agreement": agree}
        qm.parts = [replace(p, verification=qm.verification) if p.name == DECODER else p for p in qm.parts]
        qm.export.seconds = round(time.perf_counter() - t0, 2)
        record_files(tmp, qm)
        write_manifest(tmp, qm)
    return qm


def _default_calibration_text() -> str:
    from importlib import resources

    return resources.files("onnxport").joinpath("data/calib.txt").read_text(encoding="utf-8")


# --- verify -------------------------------------------------------------------------------------

def verify(bundle: str | Path, model_dir: str | Path | None = None, verify_cfg: VerifyConfig = VerifyConfig(),
           allow_pickle: bool = False) -> Manifest:
    """Re-run verification of every part of a bundle against its source checkpoint. The
    manifest is rewritten only when every part passes (a failing run leaves it as it was)."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    if any(g.quantization for g in manifest.graphs):
        raise InputError("a quantized bundle is checked by its quality gate when it is written",
                         "verify the source bundle, or re-run onnxport quantize")
    if manifest.task == "module":
        raise InputError("export-module bundles are verified when they are written",
                         "re-run onnxport export-module to re-check against the checkpoint")
    src = Path(model_dir) if model_dir else Path(manifest.source.path)
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    if model_dir is None and ckpt.sha256() != manifest.source.sha256:
        raise CheckpointError(f"the checkpoint at {src} changed since the export (sha256 differs)",
                              "pass --model with the checkpoint the bundle was exported from")
    from onnxport.recipes import get_recipes
    from onnxport.verify.module import verify_part

    recipes = get_recipes(ckpt.model_type, None, ckpt.config)
    cfg = ExportConfig(opset=manifest.export.opset, exporter=manifest.export.exporter if manifest.export.exporter
                       in ("dynamo", "torchscript") else "auto",
                       kv_layout=manifest.kv_cache.layout if manifest.kv_cache else "bhsd",
                       kv_naming=manifest.kv_cache.naming if manifest.kv_cache else "optimum")
    split = SplitConfig(**manifest.layout.split_options()) if manifest.is_split else None
    verify_cfg = verify_cfg.for_dtype(manifest.export.dtype or "float32")
    pending = {g.name: g for g in manifest.named_graphs()}
    for name, recipe in recipes.items():
        if isinstance(recipe, DecoderLM) and manifest.kv_cache is not None:
            model = load_model(recipe, ckpt)
            precision = manifest.graph(DECODER).precision if manifest.has_decoder and not split else None
            if precision and precision.get("compute") == "bfloat16":
                _verify_bf16_compute(recipe, model, folder, manifest, verify_cfg)
            else:
                verify_decoder_part(recipe, model, recipe.kv_spec(model), folder, manifest, cfg, verify_cfg, split)
        elif not isinstance(recipe, DecoderLM) and pending:
            model = load_model(recipe, ckpt)
            for part in recipe.parts(model):
                g = pending.pop(part.name, None)
                if g is not None:
                    session = None
                    if g.chain:  # cut under --max-part-size: the chain is what runs
                        from onnxport.runtime.segments import ChainSession

                        session = ChainSession(folder, g.chain, [t.name for t in g.inputs])
                    g.verification = verify_part(part, folder / g.file, verify_cfg, session=session)
                    p = manifest.part(g.part)
                    if p is not None:
                        p.verification = {"ok": True, "graphs": [x.name for x in manifest.graphs_of(g.part)]}
            manifest.verification = _modules_summary(manifest) if manifest.kv_cache is None else manifest.verification
        else:
            continue
        _reverify_pipeline(recipe, model, folder, manifest)
        del model
    if pending:
        raise VerificationError(f"no recipe of {ckpt.model_type!r} makes the graph(s) {', '.join(pending)}",
                                "verify the bundle with the onnxport version that wrote it")
    write_manifest(folder, manifest)
    return manifest
