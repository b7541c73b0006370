from onnxport.recipes import register_recipe
from onnxport.recipes.base import DecoderLM


@register_recipe("gemma", "gemma2")
class Gemma(DecoderLM):
    """Gemma / Gemma-2: scaled embeddings, (1 + w) RMSNorm, attention logit soft-capping and
    alternating sliding-window layers. Soft-capping is only implemented by the eager attention."""

    family = "gemma"
    attn_implementation = "eager"
