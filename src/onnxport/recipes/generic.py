"""The generic decoder: every transformers causal LM without a family file (llama, mistral,
qwen2/3, phi3, granite, olmo, deepseek, mixtral, ...) exports through its own forward with a
flat KV cache. This file registers nothing: `parts_for` falls back to it."""

from __future__ import annotations

from onnxport.recipes.base import DecoderLM


class GenericDecoder(DecoderLM):
    family = "generic"
