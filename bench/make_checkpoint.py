"""Write a random checkpoint of a real model's shape, in bounded memory.

The model is built on the meta device (no weights) for its parameter names and shapes; each
tensor is then drawn, cast to the storage dtype and written to safetensors shards of at most
`--shard-size` bytes with a `model.safetensors.index.json`, the way Hugging Face ships large
checkpoints. Peak memory is one shard, so a 13.5 GB Llama-2-7B-shaped bf16 checkpoint is
written on a 24 GB machine. Matrices ~ N(0, 0.02); norm weights 1 + N(0, 0.1); biases N(0, 0.02).

    python bench/make_checkpoint.py llama2-7b /tmp/llama2-7b-bf16 --dtype bf16
    python bench/make_checkpoint.py qwen2-0.5b /tmp/qwen2-0.5b-random --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

SHAPES = {
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # HuggingFaceTB/SmolLM2-135M: a small model with many layers (per-step overhead shows)
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                 tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def write_random_checkpoint(shape: str, out: Path, dtype: str = "bf16", shard_bytes: int = 2 << 30,
                            seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = SHAPES[shape]
    torch_dtype = getattr(torch, DTYPES[dtype])
    config = AutoConfig.for_model(model_type, **kw, dtype=DTYPES[dtype], bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied weights once
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards, shard, size, total = [], {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, size = {}, 0

    for name, dims in params:
        if name.endswith("norm.weight") or "layernorm" in name:
            t = 1 + 0.1 * torch.randn(dims, generator=gen)
        else:
            t = 0.02 * torch.randn(dims, generator=gen)
        t = t.to(torch_dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        for k in keys:
            index["weight_map"][k] = final
    if n == 1:
        (out / "model-00001-of-00001.safetensors").rename(out / "model.safetensors")
    else:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = [type(model).__name__]  # peers (the genai builder) dispatch on it
    config.save_pretrained(out)
    # a tokenizer for the text side: the demo model's 1024-token BPE, whose ids lie inside
    # every vocabulary here
    import onnxport

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(onnxport.__file__).parent / "demo_model" / f, out / f)
    return {"shape": shape, "dtype": DTYPES[dtype], "bytes": total, "shards": n, "tensors": len(params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--shard-size-gb", type=float, default=2.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = write_random_checkpoint(args.shape, args.out, args.dtype, int(args.shard_size_gb * (1 << 30)))
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
