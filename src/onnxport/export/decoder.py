"""Export a transformers causal LM as one ONNX graph with a flat, well-named KV cache.

The graph contract (names follow optimum / onnxruntime-genai):

    inputs   input_ids        int64 [batch_size, sequence_length]
             attention_mask   int64 [batch_size, total_sequence_length]
             position_ids     int64 [batch_size, sequence_length]
             past_key_values.{i}.key / .value   [batch_size, kv_heads, past_sequence_length, head_dim]
    outputs  logits           float [batch_size, sequence_length, vocab_size]
             present.{i}.key / .value           [batch_size, kv_heads, total_sequence_length, head_dim]
             (last_hidden_state                 [batch_size, sequence_length, hidden] after the logits,
              when a pipeline reads it: Qwen2.5-Omni's talker)

`kv_layout="bshd"` swaps the heads and sequence axes of every cache tensor; `kv_naming="seed"`
uses past_key_in{i} / past_value_in{i} -> past_key{i} / past_value{i}.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from onnxport.bundle import GQA_ATTENTION, Graph
from onnxport.config import ExportConfig
from onnxport.errors import ExportError
from onnxport.export.graph import export_graph
from onnxport.hf.compat import (
    build_dynamic_cache,
    build_state_cache,
    cache_kwarg,
    cache_pairs,
    output_cache,
    state_cache_tensors,
    text_config,
)
from onnxport.spec import (
    BATCH,
    FULL_TRACE_CASE,
    PAST,
    SEQ,
    STEP_TRACE_CASE,
    TOTAL,
    TRACE_CASE,
    KVSpec,
    TensorSpec,
    cache_dims,
    cache_entries,
    feeds,
)

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "model."  # FlatCacheDecoder.model
#: the optional output beside the logits: the hidden states after the final norm
LAST_HIDDEN = "last_hidden_state"


def io_spec(kv: KVSpec, vocab_size: int, cfg: ExportConfig, takes_position_ids: bool = True,
            embeds_hidden: int | None = None, position_axes: int = 1, hidden_output: int | None = None
            ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs. A model with recurrent state takes one token per call
    (sequence_length is 1): transformers' own single-token path, which the host runs token by
    token for a prompt too. `embeds_hidden`: the graph takes `inputs_embeds` [batch, seq,
    hidden] instead of token ids (multimodal decoders: image / audio features are placed
    among the token embeddings on the host; the `embedding` graph maps ids). `position_axes`
    3: multimodal rotary (mrope) position ids [3, batch, seq] (temporal, height, width).
    `hidden_output`: the graph also outputs `last_hidden_state` [batch, seq, hidden] (the final
    norm's output), for a pipeline that reads it beside the logits (Qwen2.5-Omni's talker)."""
    seq = 1 if kv.has_states else SEQ
    first = (TensorSpec("inputs_embeds", cfg.trace_dtype, (BATCH, seq, embeds_hidden)) if embeds_hidden
             else TensorSpec("input_ids", "int64", (BATCH, seq)))
    # without a cache the mask covers just the (whole) input sequence
    inputs = [first, TensorSpec("attention_mask", "int64", (BATCH, SEQ if kv.is_empty else TOTAL))]
    if takes_position_ids:
        inputs.append(TensorSpec("position_ids", "int64", (BATCH, seq) if position_axes == 1
                                 else (position_axes, BATCH, seq)))
    outputs = [TensorSpec("logits", cfg.trace_dtype, (BATCH, seq, vocab_size))]
    if hidden_output:
        outputs.append(TensorSpec(LAST_HIDDEN, cfg.trace_dtype, (BATCH, seq, hidden_output)))
    for e in cache_entries(kv, cfg.kv_naming):
        layer = kv.layers[e.layer]
        inputs.append(TensorSpec(e.past, cfg.trace_dtype, tuple(cache_dims(layer, e.what, cfg.kv_layout, PAST))))
        outputs.append(TensorSpec(e.present, cfg.trace_dtype, tuple(cache_dims(layer, e.what, cfg.kv_layout, TOTAL))))
    return inputs, outputs


class FlatCacheDecoder(torch.nn.Module):
    """Wraps a causal LM so its cache crosses the graph boundary as flat tensors."""

    def __init__(self, model: torch.nn.Module, kv: KVSpec, kv_layout: str = "bhsd", mask_4d: bool = False,
                 gqa: bool = False, embeds: bool = False, hidden: bool = False):
        super().__init__()
        #: also output the last hidden state (hidden_states[-1]: the final norm's output)
        self.hidden = hidden
        #: the first input is inputs_embeds, not token ids
        self.embeds = embeds
        #: attention as com.microsoft.GroupQueryAttention (export/attention.py)
        self.gqa = gqa
        self.model = model
        self.kv = kv
        self.num_layers = kv.num_layers
        #: with GQA, the model's standard rotary as com.microsoft.RotaryEmbedding (or None)
        self.rotary = None
        if gqa and kv.layers:
            from onnxport.export.attention import prepare_rotary

            text = text_config(model.config)
            self.rotary = prepare_rotary(model, kv.head_dim,
                                         int(getattr(text, "max_position_embeddings", 0) or 4096))
        #: (layer, what) of each flat cache tensor, in graph order
        self.entries = [(e.layer, e.what) for e in cache_entries(kv)]
        self.bshd = kv_layout == "bshd"
        #: build the additive [B, 1, S, T] mask here instead of in transformers. transformers
        #: 4.5x builds it with torch.vmap, which the TorchScript exporter cannot trace; both
        #: majors use a 4D mask as given.
        self.mask_4d = mask_4d
        self.cache_kwarg = cache_kwarg(model.forward)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        return self.run(input_ids, attention_mask, position_ids, past_key_values)

    def run(self, input_ids, attention_mask, position_ids, past_key_values):
        tensors = {}
        for (i, what), t in zip(self.entries, past_key_values):
            tensors[(i, what)] = t.transpose(1, 2) if self.bshd and what in ("key", "value") else t
        tokens = {"inputs_embeds" if self.embeds else "input_ids": input_ids}
        if self.hidden:
            tokens["output_hidden_states"] = True
        if self.kv.is_empty:
            positions = {} if position_ids is None else {"position_ids": position_ids}
            out = self.model(**tokens, attention_mask=attention_mask, **positions, return_dict=True)
            return (out.logits, out.hidden_states[-1]) if self.hidden else (out.logits,)
        layered = self.kv.has_states or self.kv.has_indexer  # 5.x layer objects beyond key/value
        if layered:
            cache = build_state_cache(self.kv, tensors)
            if not any(layer.has_kv for layer in self.kv.layers):
                # no attention layer reads the history: the mask covers the new token only
                # (mamba multiplies its hidden states by the mask, as `generate` passes it)
                attention_mask = attention_mask[:, -input_ids.shape[1]:]
        elif self.gqa:
            from onnxport.export.attention import gqa_cache

            cache = gqa_cache([(tensors[(i, "key")], tensors[(i, "value")]) for i in range(self.num_layers)],
                              attention_mask)
        else:
            cache = build_dynamic_cache([(tensors[(i, "key")], tensors[(i, "value")]) for i in range(self.num_layers)],
                                        self.kv.encoder_decoder)
        if self.mask_4d:
            attention_mask = additive_causal_mask(attention_mask, input_ids.shape[1], self.model.dtype)
        positions = {} if position_ids is None else {"position_ids": position_ids}
        with self._attention(cache, position_ids):
            out = self.model(
                **tokens,
                attention_mask=attention_mask,
                use_cache=True,
                **positions,
                return_dict=True,
                **{self.cache_kwarg: cache},
            )
        flat = [out.logits, out.hidden_states[-1]] if self.hidden else [out.logits]
        if self.gqa:
            new = [t for i in range(self.num_layers) for t in cache.onnxport_present[i]]
        elif layered:
            new = state_cache_tensors(output_cache(out), self.kv)
        else:
            new = [t for kv in cache_pairs(output_cache(out)) for t in kv]
        for (_, what), t in zip(self.entries, new):
            flat.append(t.transpose(1, 2) if self.bshd and what in ("key", "value") else t)
        return tuple(flat)


    def _attention(self, cache, position_ids=None):
        import contextlib

        stack = contextlib.ExitStack()
        if self.gqa:
            from onnxport.export.attention import deferred_rotary, gqa_attention

            stack.enter_context(gqa_attention(self.model, cache))
            stack.enter_context(deferred_rotary(self.rotary, cache, position_ids))
        return stack


class FlatCacheDecoderNoPositions(FlatCacheDecoder):
    """For models whose forward takes no position_ids (ALiBi models such as bloom/mpt derive
    positions from the mask)."""

    def forward(self, input_ids, attention_mask, past_key_values: list[torch.Tensor]):
        return self.run(input_ids, attention_mask, None, past_key_values)


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def flat_cache_wrapper(model, kv: KVSpec, kv_layout: str, mask_4d: bool = False, gqa: bool = False,
                       embeds: bool = False, hidden: bool = False) -> FlatCacheDecoder:
    cls = FlatCacheDecoder if takes_position_ids(model) else FlatCacheDecoderNoPositions
    return cls(model, kv, kv_layout, mask_4d=mask_4d, gqa=gqa, embeds=embeds, hidden=hidden).eval()


def graph_wrapper(model, kv: KVSpec, graph: Graph, kv_layout: str) -> FlatCacheDecoder:
    """The wrapper whose inputs and outputs are those of the decoder `graph` (token ids or
    embeddings; with or without the last hidden state)."""
    return flat_cache_wrapper(model, kv, kv_layout, embeds=graph.inputs[0].name == "inputs_embeds",
                              hidden=LAST_HIDDEN in graph.output_names)


class TokenEmbedding(torch.nn.Module):
    """input_ids -> the embeddings the decoder's first layer reads (the recipe's `embed`:
    the embedding table, and a family's scale such as Gemma's sqrt(hidden))."""

    def __init__(self, recipe, model):
        super().__init__()
        self.recipe, self.model = recipe, model

    def forward(self, input_ids):
        return self.recipe.embed(self.model, input_ids)


def export_embedding(recipe, model, cfg: ExportConfig, out_file: Path, bind=None) -> tuple[Graph, set[str]]:
    """The token-embedding graph of a decoder that takes inputs_embeds: input_ids
    [batch, seq] -> inputs_embeds [batch, seq, hidden]."""
    text = text_config(model.config)
    inputs = [TensorSpec("input_ids", "int64", (BATCH, SEQ))]
    outputs = [TensorSpec("inputs_embeds", cfg.trace_dtype, (BATCH, SEQ, text.hidden_size))]
    example = feeds(inputs, TRACE_CASE.sizes, vocab_size=text.vocab_size)
    device = next(model.parameters()).device
    args = (torch.from_numpy(example["input_ids"]).to(device),)
    used, applied = export_graph(TokenEmbedding(recipe, model), args, inputs, outputs, out_file, cfg.exporter,
                                 cfg.opset, cfg.external_data_threshold_bytes, param_prefix="model.", bind=bind)
    return Graph("embedding", out_file.name, inputs, outputs, part="decoder", exporter=cfg.exporter, opset=cfg.opset,
                 patches=applied), used


def wrapper_args(inputs: list[TensorSpec], tensors: dict) -> tuple:
    """Positional arguments of the wrapper from named tensors: the leading inputs, then the
    flat cache as one list."""
    names = [i.name for i in inputs]
    lead = 3 if "position_ids" in names else 2
    return (*[tensors[n] for n in names[:lead]], [tensors[n] for n in names[lead:]])


def additive_causal_mask(mask_2d: torch.Tensor, seq_len, dtype) -> torch.Tensor:
    """[B, T] 0/1 padding mask -> [B, 1, S, T] additive mask for the last S query positions."""
    total = mask_2d.shape[1]
    k = torch.arange(total, device=mask_2d.device)
    q = k[-seq_len:] if isinstance(seq_len, int) else torch.arange(total - seq_len, total, device=mask_2d.device)
    allowed = (k[None, :] <= q[:, None])[None, None] & mask_2d[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def uses_sliding_window(model) -> bool:
    cfg = text_config(model.config)
    types = getattr(cfg, "layer_types", None) or []
    return any("sliding" in t for t in types) or (
        getattr(cfg, "sliding_window", None) is not None and cfg.model_type in ("gemma2", "gemma3_text")
    )


def export_decoder(model, kv: KVSpec, cfg: ExportConfig, out_file: Path, bind=None, embeds: bool = False,
                   position_axes: int = 1, hidden_output: bool = False) -> tuple[Graph, set[str]]:
    """Export `model` to `out_file` (+ `model.onnx.data` when large). A model on the meta
    device is traced with meta inputs and its weights come from `bind` (`export.stream`).

    Returns the graph entry and the names of the model parameters the exported graph reads."""
    text = text_config(model.config)
    vocab = text.vocab_size
    inputs, outputs = io_spec(kv, vocab, cfg, takes_position_ids(model),
                              embeds_hidden=text.hidden_size if embeds else None, position_axes=position_axes,
                              hidden_output=text.hidden_size if hidden_output else None)
    # TorchScript cannot trace transformers 4.5x's vmap mask builder; build the mask in the
    # wrapper (sliding-window models keep transformers' per-layer masks: not needed on 5.x).
    mask_4d = cfg.exporter == "torchscript" and not uses_sliding_window(model) and takes_position_ids(model)
    gqa = cfg.attention == "gqa"
    if gqa:
        check_gqa(kv, cfg)
    translations = None
    if gqa:
        from onnxport.export.attention import TRANSLATIONS

        translations = TRANSLATIONS
    io = {"embeds_hidden": text.hidden_size if embeds else None, "position_axes": position_axes,
          "hidden_output": text.hidden_size if hidden_output else None}

    def trace(traced_kv: KVSpec, binder, stamp=None, early=None, template=None) -> tuple[set[str], list[str]]:
        traced_in, traced_out = io_spec(traced_kv, vocab, cfg, takes_position_ids(model), **io)
        wrapper = flat_cache_wrapper(model, traced_kv, cfg.kv_layout, mask_4d, gqa, embeds, hidden_output)
        case = STEP_TRACE_CASE if kv.has_states else FULL_TRACE_CASE if kv.is_empty else TRACE_CASE
        example = feeds(traced_in, case.sizes, vocab_size=vocab)
        device = next(model.parameters()).device
        args = wrapper_args(traced_in, {k: torch.from_numpy(v).to(device) for k, v in example.items()})
        return export_graph(wrapper, args, traced_in, traced_out, out_file, cfg.exporter, cfg.opset,
                            cfg.external_data_threshold_bytes, param_prefix=WRAPPER_PREFIX, bind=binder,
                            translations=translations, expand=stamp.expand if stamp else None,
                            final_io=(inputs, outputs) if stamp else None, early=early, template=template)

    stamped = None
    if cfg.stamp:
        from onnxport.export import stamp as stamping

        planned = stamping.plan(model, kv, cfg)
        why = planned if isinstance(planned, str) else None
        if why is None:
            from onnxport.export.stream import Binder, ModuleWeights

            path, first = planned
            binder = bind or Binder(ModuleWeights(model), WRAPPER_PREFIX)
            binder.unbound_buffers = path + "."
            stamp = stamping.Stamp(path, first, kv, cfg.kv_naming, WRAPPER_PREFIX, binder)
            early = early_weights(model, binder, path, embeds, out_file, cfg)
            template = template_cache(cfg)
            try:
                with stamping.truncated(model, path, stamp.traced):
                    used, applied = trace(KVSpec(kv.layers[:stamp.traced], kv.encoder_decoder), binder, stamp, early,
                                          template)
                stamped = {"traced_layers": stamp.traced, "stamped_layers": kv.num_layers - stamp.traced}
                if early is not None:
                    stamped["early_weights"] = early.record()
                if template is not None and template.outcome:
                    stamped["template"] = template.outcome
            except stamping.StampError as e:
                why = str(e)
            except ExportError as e:  # the short trace failed: the whole model's is the judge
                why = f"the {stamp.traced}-layer trace failed: {e.message[:200]}"
            finally:
                binder.unbound_buffers = None
                if early is not None:
                    early.close()
        if why is not None:
            log.info("tracing all %d layers (no stamping: %s)", kv.num_layers, why)
            stamped = {"traced_layers": kv.num_layers, "stamped_layers": 0, "why_not": why}
    if not (stamped or {}).get("stamped_layers"):
        used, applied = trace(kv, bind)
    graph = Graph("decoder", out_file.name, inputs, outputs, part="decoder", exporter=cfg.exporter, opset=cfg.opset,
                  patches=applied, attention=GQA_ATTENTION if gqa else None, stamped=stamped)
    return graph, used


def template_cache(cfg: ExportConfig):
    """The kept traced templates (export/template.py), None when disabled."""
    from onnxport.export.template import TemplateCache, cache_folder

    folder = cache_folder() if cfg.template_cache and cfg.exporter == "dynamo" else None
    return TemplateCache(folder) if folder is not None else None


def early_weights(model, binder, layers_path: str, embeds: bool, out_file: Path, cfg: ExportConfig):
    """Start writing the weights a stamped graph will read (bundle.weights.EarlyWeights) while
    it is traced; None when the graph embeds its weights or no prediction can be made."""
    from onnxport.bundle.weights import EarlyWeights
    from onnxport.export.stream import predicted_readers

    if not cfg.early_weights:
        return None
    try:
        readers = predicted_readers(model, binder.weights, layers_path, embeds)
    except Exception as e:  # a prediction only saves time: the binding reports real problems
        log.debug("no early weights: %s", e)
        return None
    if sum(r.nbytes for r in readers) <= cfg.external_data_threshold_bytes:
        return None
    try:
        return EarlyWeights(out_file.with_name(out_file.name + ".data"), readers)
    except OSError as e:  # the save writes them, and meets a real disk problem there
        log.debug("no early weights: %s", e)
        return None


def check_gqa(kv: KVSpec, cfg: ExportConfig) -> None:
    """The caches GroupQueryAttention can hold: one key/value pair per layer, of one width."""
    from onnxport.errors import InputError

    why = None
    if kv.has_states or kv.has_indexer or kv.is_empty or kv.encoder_decoder:
        why = "its cache is not one key/value pair per layer"
    elif any(x.key_dim != x.value_dim or not x.has_kv for x in kv.layers):
        why = "its keys and values differ in width (MLA) or some layers keep none"
    elif cfg.kv_layout != "bhsd":
        why = "GroupQueryAttention keeps its cache as [batch, heads, seq, head_dim] (--kv-layout bhsd)"
    if why:
        raise InputError(f"--attention gqa does not fit this model: {why}", "drop --attention gqa")
