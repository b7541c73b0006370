"""genai_config.json: what onnxruntime-genai's `og.Model(bundle)` needs to run a decoder bundle as
it is, written beside the graph when genai's config can describe the bundle, and the reason in
the manifest (`interop["onnxruntime-genai"]`) when it cannot.

The fields follow what genai's own model builder writes (`make_genai_config` in
onnxruntime_genai/models/builders/base.py): the decoder's file, heads and layers, the input and
output names (`past_key_values.%d.key` -> `present.%d.key`), the special tokens and the search
defaults of the checkpoint's generation_config.json. `past_present_share_buffer` follows the
graph: a GroupQueryAttention graph writes into a preallocated cache (true); the default graph
concatenates its cache and so needs genai to hand it a fresh one per step (false).
"""

from __future__ import annotations

import json
from pathlib import Path

from onnxport.bundle.manifest import MONOLITHIC, Manifest

FILE = "genai_config.json"
KEY = "onnxruntime-genai"
#: genai model types (0.18) written as themselves: its plain decoder-only model, tested with our
#: graphs (llama, qwen2, gemma2 in tests/test_genai.py; mistral and qwen3 take the same path).
#: Every other type is written as genai's generic "decoder", which runs these graphs the same way
TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2"})
GQA = "com.microsoft.GroupQueryAttention"
#: generation_config.json's search fields and genai's defaults for them
SEARCH = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
          "num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}


def _read(folder: Path, name: str) -> dict:
    p = folder / name
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def _why_not(m: Manifest) -> str | None:
    """The reason genai's config cannot describe this bundle, or None when it can."""
    if m.kv_cache is None:
        return "not a decoder bundle"
    if m.pipeline is not None:
        return f"a {m.pipeline.kind} pipeline chains {len(m.pipeline.graphs)} graphs; genai's config here describes one decoder"
    if m.layout.kind != MONOLITHIC:
        return f"{m.layout.kind} layout: genai runs one decoder graph"
    decoders = [g for g in m.graphs if g.role == "decoder"]
    if len(decoders) != 1 or len(m.graphs_of("decoder")) != 1:
        return "the decoder part has more than one graph"
    g = decoders[0]
    if g.chain:
        return f"the decoder graph is cut into {len(g.chain)} files (--max-graph-size); genai loads one file"
    kv = m.kv_cache
    if kv.layout != "bhsd":
        return f"{kv.layout} cache layout; genai's cache is [batch, heads, sequence, head_dim] (export with --kv-layout bhsd)"
    if kv.num_layers < 1:
        return "the model has no KV cache"
    if kv.states or kv.step_only:
        return "recurrent states (mamba / linear attention) have no genai form"
    if kv.layers:
        return "layers differ in cache heads or dims; genai's config gives one shape for every layer"
    want = [[f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"] for i in range(kv.num_layers) for kind in ("key", "value")]
    if [list(p) for p in kv.names] != want:
        return ("cache names are not genai's past_key_values.%d.key -> present.%d.key pattern "
                "(export with --kv-naming optimum; recurrent or cross-attention caches have no genai form)")
    names = {t.name for t in g.inputs}
    plain = {"input_ids", "attention_mask", "position_ids"} | {n for pair in kv.names for n in pair[:1]}
    extra = sorted(names - plain - set(g.optional_inputs or {}))
    if "input_ids" not in names:
        return "the decoder takes inputs_embeds, not input_ids"
    if extra:
        return f"the decoder needs input(s) genai does not feed: {', '.join(extra)}"
    pos = next((t for t in g.inputs if t.name == "position_ids"), None)
    if pos is not None and len(pos.dims) != 2:
        return f"position_ids has {len(pos.dims)} dims (multimodal rope); genai feeds [batch, sequence]"
    if not m.model.max_positions:
        return "the checkpoint gives no context length (max_position_embeddings)"
    if "logits" not in {t.name for t in g.outputs}:
        return "the decoder has no logits output (a token head: --head argmax / topk)"
    return None


def genai_config(folder: Path, m: Manifest) -> tuple[dict | None, str | None]:
    """(genai_config, None), or (None, the reason genai cannot run this bundle as it is)."""
    reason = _why_not(m)
    if reason:
        return None, reason
    cfg, gen = _read(folder, "config.json"), _read(folder, "generation_config.json")
    cfg = cfg.get("text_config") or cfg
    g, kv = m.graph("decoder"), m.kv_cache
    names = {t.name for t in g.inputs}
    inputs = {n: n for n in ("input_ids", "attention_mask", "position_ids") if n in names}
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}

    def token(name: str):
        return gen[name] if gen.get(name) is not None else cfg.get(name)

    eos = token("eos_token_id")
    pad = token("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or kv.num_kv_heads
    search = {k: gen[k] if gen.get(k) is not None else d for k, d in SEARCH.items()}
    model_type = m.model.model_type if m.model.model_type in TYPES else "decoder"
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}, "filename": g.file,
               "head_size": kv.head_dim, "hidden_size": m.model.hidden_size, "inputs": inputs, "outputs": outputs,
               "num_attention_heads": heads, "num_hidden_layers": kv.num_layers,
               "num_key_value_heads": kv.num_kv_heads}
    model = {"bos_token_id": token("bos_token_id"), "context_length": m.model.max_positions, "decoder": decoder,
             "eos_token_id": eos, "pad_token_id": pad, "type": model_type, "vocab_size": m.model.vocab_size}
    model = {k: v for k, v in model.items() if v is not None}  # genai refuses null: a token not named is left out
    return {
        "model": model,
        "search": {**search, "early_stopping": True, "max_length": m.model.max_positions, "min_length": 0,
                   "num_return_sequences": 1, "past_present_share_buffer": g.attention == GQA},
    }, None


def write_genai_config(folder: Path, m: Manifest) -> dict:
    """Write (or remove a stale) genai_config.json; the manifest's record of what was done."""
    path = folder / FILE
    cfg, reason = genai_config(folder, m)
    if cfg is None:
        if path.is_file() and not path.is_symlink():
            path.unlink()  # copied from a source bundle this one no longer matches
        return {"file": None, "reason": reason}
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return {"file": FILE, "type": cfg["model"]["type"],
            "past_present_share_buffer": cfg["search"]["past_present_share_buffer"]}

