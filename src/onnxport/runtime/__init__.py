"""ONNX Runtime side. Depends on onnxruntime, numpy and tokenizers (Pillow for images, jinja2 for
chat templates) only: never imports torch."""

from onnxport.runtime.encoder import EncoderRunner
from onnxport.runtime.generator import GenerationResult, Generator

__all__ = ["EncoderRunner", "GenerationResult", "Generator"]
