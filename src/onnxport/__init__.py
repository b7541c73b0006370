"""onnxport: export PyTorch / Hugging Face models to ONNX that deploys, and prove it.

`from onnxport import Generator` needs only onnxruntime, numpy and tokenizers. Exporting,
verifying, optimizing and quantizing are `onnxport.api`'s functions (they import torch when
called); `onnxport.export`, `onnxport.verify` and `onnxport.optimize` are the packages of those
stages, not functions."""

from onnxport.runtime import GenerationResult, Generator

__version__ = "0.1.0"

__all__ = ["GenerationResult", "Generator", "__version__"]
