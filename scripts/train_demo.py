"""Train the embedded demo model (reproducible, offline, CPU).

The demo model is a tiny Llama trained on the documentation text that ships with CPython
(`pydoc_data.topics`), with a byte-level BPE tokenizer trained on the same text. It is small
enough to live inside the package (weights stored as float16, < 5 MB) and good enough to
continue a prompt with readable, Python-documentation-flavoured English.

    python scripts/train_demo.py --out src/onnxport/demo_model --steps 600

Everything is seeded; the same torch / tokenizers versions give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def corpus() -> list[str]:
    return [topics[k] for k in sorted(topics)]


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="src/onnxport/demo_model")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    docs = corpus()
    tok = train_tokenizer(docs, vocab_size=1024)
    eos_id = tok.token_to_id(EOS)
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.long)
    print(f"corpus tokens: {len(ids)}")

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 50

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s : s + args.seq] for s in starts])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None
    )
    fast.save_pretrained(out)
    (out / "TRAINING.json").write_text(
        json.dumps(
            {
                "script": "scripts/train_demo.py",
                "corpus": "pydoc_data.topics (CPython standard library documentation)",
                "corpus_tokens": len(ids),
                "steps": args.steps,
                "batch": args.batch,
                "seq": args.seq,
                "seed": args.seed,
                "final_loss": round(loss.item(), 4),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
