from onnxport.recipes import register_recipe
from onnxport.recipes.base import DecoderLM


@register_recipe("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo", "olmo2", "helium", "smollm3")
class LlamaLike(DecoderLM):
    """Llama code path: RMSNorm, rotary embedding, GQA attention, gated MLP.

    Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm), Phi-3 (fused qkv / gate_up) and the other
    types listed run the same forward contract in transformers, so one recipe serves them all.
    """

    family = "llama"
