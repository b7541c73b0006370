"""onnxport: export PyTorch / Hugging Face models to ONNX that deploys, and prove it.

`from onnxport import Generator` needs only onnxruntime, numpy and tokenizers; `export` and
`verify` import torch lazily when called."""

from onnxport.runtime import GenerationResult, Generator

__version__ = "0.1.0"


def call_api(name: str, *args, **kwargs):
    """Call `onnxport.api.<name>` (for the `onnxport.export` package, which shadows the function)."""
    from onnxport import api

    return getattr(api, name)(*args, **kwargs)


def __getattr__(name):
    if name in ("export", "verify"):
        from onnxport import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["GenerationResult", "Generator", "__version__", "export", "verify"]
