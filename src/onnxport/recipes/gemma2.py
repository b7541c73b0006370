from onnxport.recipes import register_recipe
from onnxport.recipes.base import DecoderLM, torch_scalar


@register_recipe("gemma", "gemma2", part="decoder")
class Gemma(DecoderLM):
    """Gemma / Gemma-2: scaled embeddings, (1 + w) RMSNorm, attention logit soft-capping and
    alternating sliding-window layers. Soft-capping is only implemented by the eager attention."""

    family = "gemma"
    attn_implementation = "eager"

    def embedding_scale(self, model) -> float:
        return float(model.config.hidden_size) ** 0.5

    def embed(self, model, input_ids):
        embed = self.base_model(model).embed_tokens
        if hasattr(embed, "embed_scale"):  # transformers 5.x: the embedding module scales itself
            return embed(input_ids)
        # transformers 4.x scales in the model forward, in the activation dtype
        emb = embed(input_ids)
        return emb * torch_scalar(self.embedding_scale(model), emb.dtype)
