"""Base recipes. A recipe loads the model and describes its graph contract; the export driver
(onnxport.export) does the torch.onnx work. Subclasses override only the hook that differs."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from onnxport.spec import KVSpec

if TYPE_CHECKING:
    import torch

    from onnxport.checkpoint import Checkpoint


def torch_scalar(value: float, dtype):
    import torch

    return torch.tensor(value, dtype=dtype)


def torch_tanh(x):
    import torch

    return torch.tanh(x)


def from_pretrained(cls, ckpt: Checkpoint, dtype, attn_implementation: str | None = "eager",
                    trust_remote_code: bool = False, **extra):
    """`cls.from_pretrained` on a local checkpoint, in eval mode: safetensors unless the
    checkpoint only has (explicitly allowed) pickle weights, no remote code unless asked.

    Every parameter must come from the checkpoint: transformers fills a tensor the checkpoint
    lacks with random values and only logs it, so two exports of one checkpoint would differ
    and verification (PyTorch has the same random tensor) could not notice. Missing tensors
    fail here, by name; tied weights are not missing (transformers ties them itself)."""
    from onnxport.errors import CheckpointError
    from onnxport.hf.compat import dtype_kwarg

    kwargs = dict(use_safetensors=not ckpt.pickle_weights, trust_remote_code=trust_remote_code, **dtype_kwarg(dtype),
                  **extra)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model, info = cls.from_pretrained(str(ckpt.path), output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(
            f"{len(missing)} weight(s) the model needs are not in the checkpoint: {', '.join(missing[:4])}"
            + (" ..." if len(missing) > 4 else ""),
            "the checkpoint is incomplete or belongs to another config; onnxport never exports random weights")
    # transformers renames legacy checkpoint keys on load (5.x: `model.embed_tokens` ->
    # `model.language_model.embed_tokens`); what it did not use is only known here
    model._onnxport_unused_checkpoint_keys = sorted(info.get("unexpected_keys") or [])
    return model.eval()


def _has_experts(config: dict) -> bool:
    """An MoE config (num_local_experts, n_routed_experts, moe_num_experts, ..., nested too)."""
    for k, v in config.items():
        if isinstance(v, dict) and _has_experts(v):
            return True
        if "experts" in k and not isinstance(v, bool) and isinstance(v, int) and v > 1:
            return True
    return False


#: submodule names of the non-text parts multimodal checkpoints keep beside their decoder
OTHER_PART_MODULES = {"visual", "vision_tower", "vision_model", "image_encoder", "vision_encoder", "audio_tower",
                      "audio_encoder", "multi_modal_projector", "mm_projector", "visual_projection", "vqmodel",
                      # phi4_multimodal: model.embed_tokens_extend.{image,audio}_embed
                      "image_embed", "audio_embed"}


class Recipe:
    """What to export for one model family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: which part of a checkpoint this recipe exports (decoder, vision, audio, codec, ...)
    part: ClassVar[str] = "decoder"
    task: ClassVar[str] = ""
    family: ClassVar[str] = ""
    #: the oldest transformers major whose model code this recipe's hooks rely on
    min_transformers_major: ClassVar[int] = 4

    def __init__(self, model_type: str):
        self.model_type = model_type

    @classmethod
    def present_in(cls, config: dict) -> bool:
        """Whether a checkpoint with this config.json has the part at all (Qwen2.5-Omni without
        speech output has no talker); a part that is absent is not offered or exported."""
        return True

    @property
    def name(self) -> str:
        return self.family or self.model_type


class DecoderLM(Recipe):
    """A transformers causal LM exported through its own forward with a flat KV cache. The base
    class is the generic decoder: it needs no file per model_type. Family files override only
    the hook that differs (the model class, embedding scale, which weights a part leaves out)."""

    task: ClassVar[str] = "text-generation"
    #: attention implementation used for export and for the PyTorch reference. "eager" is the
    #: most exporter-friendly and matches every family; override when a family needs another.
    attn_implementation: ClassVar[str] = "eager"
    #: transformers class that loads the checkpoint ("" = AutoModelForCausalLM)
    model_class: ClassVar[str] = ""
    #: the decoder graph takes inputs_embeds (a multimodal model's text decoder: image /
    #: audio features are placed among the token embeddings on the host) and an `embedding`
    #: graph maps token ids; the monolithic layout only
    embeds_input: ClassVar[bool] = False
    #: position_ids axes: 1 ([batch, seq]) or 3 (multimodal rotary: [3, batch, seq])
    position_axes: ClassVar[int] = 1

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class or "AutoModelForCausalLM")

    def load_model(self, ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
        cls = self.model_cls()
        extra = {}
        if _has_experts(ckpt.config):
            # transformers' default MoE dispatch loops over the experts a batch hits
            # (`nonzero`, data-dependent); `batched_mm` gathers each token's expert weights
            # instead, which the exporters trace (same math, one op order)
            extra["experts_implementation"] = "batched_mm"
        try:
            return from_pretrained(cls, ckpt, dtype, self.attn_implementation, **extra)
        except (TypeError, ValueError) as e:
            if not extra or "experts_implementation" not in str(e):
                raise
            return from_pretrained(cls, ckpt, dtype, self.attn_implementation)

    def kv_spec(self, model) -> KVSpec:
        """Per-layer cache shapes, read from what the model itself returns for a short input
        (so MLA's different key/value widths, per-layer head counts and skipped layers are
        whatever the model does, not what a config field suggests)."""
        from onnxport.hf.compat import probe_cache

        return probe_cache(model)

    # --- hooks for split layouts: the pieces of the model's forward, one by one -----------------

    def base_model(self, model):
        return model.model

    def decoder_layers(self, model) -> list:
        return list(self.base_model(model).layers)

    def embedding_scale(self, model) -> float:
        """Factor the model applies to token embeddings before the first layer."""
        return 1.0

    def embed(self, model, input_ids):
        emb = model.get_input_embeddings()(input_ids)
        scale = self.embedding_scale(model)
        return emb if scale == 1.0 else emb * torch_scalar(scale, emb.dtype)

    def rotary(self, model, hidden_states, position_ids):
        """(cos, sin) for `position_ids`, as the model's layers expect them."""
        return self.base_model(model).rotary_emb(hidden_states, position_ids)

    def sliding_window(self, model, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx` (None: full causal attention)."""
        attn = self.decoder_layers(model)[layer_idx].self_attn
        window = getattr(attn, "sliding_window", None)
        return int(window) if window else None

    def final_logits(self, model, hidden_states):
        """Final norm and LM head (and any logit post-processing the model applies)."""
        logits = model.get_output_embeddings()(self.base_model(model).norm(hidden_states))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch_tanh(logits / cap) * cap
        return logits

    def hidden_output(self, model) -> bool:
        """Whether the decoder graph also outputs `last_hidden_state` (the final norm's output),
        for a pipeline that reads the hidden states beside the logits."""
        return False

    def skipped_weights(self, model, unread: set[str]) -> dict[str, str]:
        """Of the parameters the decoder graph does not read (`unread`), those that are
        legitimately left out, with the reason. Anything unread and not returned here fails
        the export. The generic rules: cross-attention of a decoder used without an encoder,
        and modules outside the text path (another part of the checkpoint, a multi-token
        prediction head) when the model keeps them beside the decoder."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        inside = set()
        if decoder is not None:
            inside = {id(p) for p in decoder.parameters()}
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                inside |= {id(p) for p in emb.parameters()}
        params = dict(model.named_parameters(remove_duplicate=False))
        out = {}
        for name in unread:
            parts = name.split(".")
            if any(k in name for k in ("encoder_attn", "crossattention", "cross_attn")):
                out[name] = "cross-attention: reads encoder states, which a decoder-only graph has none of"
            elif "pooler" in parts:
                out[name] = "pooling head of an encoder family: not used to generate text"
            elif any(p in OTHER_PART_MODULES for p in parts):
                owner = ".".join(parts[:parts.index(next(p for p in parts if p in OTHER_PART_MODULES)) + 1])
                out[name] = f"belongs to {owner}, another part of the checkpoint (a decoder-only graph takes text)"
            elif decoder is not None and id(params[name]) not in inside:
                owner = ".".join(name.split(".")[:2])
                out[name] = f"belongs to {owner}, not to the text decoder (another part, or unused for text)"
        return out
