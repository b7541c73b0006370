"""onnxport: export PyTorch / Hugging Face models to ONNX that deploys, and prove it.

`from onnxport import Generator` needs only onnxruntime, numpy and tokenizers; `export` and
`verify` import torch lazily when called."""

from onnxport.runtime import GenerationResult, Generator

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("export", "verify"):
        from onnxport import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["GenerationResult", "Generator", "__version__", "export", "verify"]
