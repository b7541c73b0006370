"""Base recipes. A recipe loads the model and describes its graph contract; the export driver
(onnxport.export) does the torch.onnx work. Subclasses override only the hook that differs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from onnxport.checkpoint import Checkpoint


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

        from onnxport.export.compat import dtype_kwarg

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(ckpt.path),
            attn_implementation=self.attn_implementation,
            use_safetensors=not ckpt.pickle_weights,
            trust_remote_code=False,
            **dtype_kwarg(dtype),
        )
        model.eval()
        return model

    def kv_spec(self, config) -> KVSpec:
        from onnxport.export.compat import text_config

        text = text_config(config)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return KVSpec(text.num_hidden_layers, kv_heads, head_dim)

    def tied_weights(self, model) -> dict[str, str]:
        """Checkpoint weights that are legitimately absent from the graph, with the reason."""
        from onnxport.export.compat import text_config

        cfg = text_config(model.config)
        if getattr(cfg, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False):
            return {"lm_head.weight": "tied to model.embed_tokens.weight"}
        return {}
