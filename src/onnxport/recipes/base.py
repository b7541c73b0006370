"""Base recipes. A recipe loads the model and describes its graph contract; the export driver
(onnxport.export) does the torch.onnx work. Subclasses override only the hook that differs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

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
                    trust_remote_code: bool = False):
    """`cls.from_pretrained` on a local checkpoint, in eval mode: safetensors unless the
    checkpoint only has (explicitly allowed) pickle weights, no remote code unless asked."""
    from onnxport.export.compat import dtype_kwarg

    kwargs = dict(use_safetensors=not ckpt.pickle_weights, trust_remote_code=trust_remote_code, **dtype_kwarg(dtype))
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return cls.from_pretrained(str(ckpt.path), **kwargs).eval()


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int


class Recipe:
    """What to export for one model family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    task: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def __init__(self, model_type: str):
        self.model_type = model_type

    @property
    def name(self) -> str:
        return self.family or self.model_type


class DecoderLM(Recipe):
    """A transformers causal LM whose forward takes input_ids, attention_mask, position_ids and a
    DynamicCache (llama-like code path). Exported as one graph with a flat KV cache."""

    task: ClassVar[str] = "text-generation"
    #: attention implementation used for export and for the PyTorch reference. "eager" is the
    #: most exporter-friendly and matches every family; override when a family needs another.
    attn_implementation: ClassVar[str] = "eager"

    def load_model(self, ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
        import transformers

        return from_pretrained(transformers.AutoModelForCausalLM, ckpt, dtype, self.attn_implementation)

    def kv_spec(self, config) -> KVSpec:
        from onnxport.export.compat import text_config

        text = text_config(config)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return KVSpec(text.num_hidden_layers, kv_heads, head_dim)

    # --- hooks for split layouts: the pieces of the model's forward, one by one -----------------

    def base_model(self, model):
        return model.model

    def decoder_layers(self, model) -> list:
        return list(self.base_model(model).layers)

    def embedding_scale(self, model) -> float:
        """Factor the model applies to token embeddings before the first layer."""
        return 1.0

    def embed(self, model, input_ids):
        emb = self.base_model(model).embed_tokens(input_ids)
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
        logits = model.lm_head(self.base_model(model).norm(hidden_states))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch_tanh(logits / cap) * cap
        return logits

    def tied_weights(self, model) -> dict[str, str]:
        """Checkpoint weights that are legitimately absent from the graph, with the reason."""
        from onnxport.export.compat import text_config

        cfg = text_config(model.config)
        if getattr(cfg, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False):
            return {"lm_head.weight": "tied to model.embed_tokens.weight"}
        return {}
