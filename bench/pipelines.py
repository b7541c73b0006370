"""Pipeline benchmark: export time and per-part latency of multimodal bundles at real sizes.

Random weights in real model shapes (nothing is downloaded):

- `whisper-base`: Whisper-base's config (d_model 512, 6 + 6 layers, 80 mels, 51865 tokens, a
  30 s window); a 10 s clip, 32 new tokens.
- `qwen2.5-vl`: Qwen2.5-VL's vision tower as the 3B / 7B checkpoints ship it (32 blocks, hidden
  1280, window attention, full attention at blocks 7 / 15 / 23 / 31) on a Qwen2-0.5B-sized text
  decoder (hidden 896, 24 layers); one 448x448 image, a 16-token prompt, 32 new tokens.

Each: `onnxport export` (verified) wall time, then the torch-free pipeline's stages timed
separately (preprocessing, each graph, prefill, decode tokens/s), median of --runs. Prints
JSON; `--save FILE` also writes it.

    python bench/pipelines.py [--models whisper-base,qwen2.5-vl] [--save bench/results/pipelines.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "src" / "onnxport" / "demo_model"


def make_whisper(out: Path) -> None:
    import torch
    import transformers as T

    cfg = T.WhisperConfig(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                          decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                          vocab_size=51865, max_source_positions=1500, max_target_positions=448,
                          decoder_start_token_id=50258, pad_token_id=50257, bos_token_id=50257, eos_token_id=50257)
    torch.manual_seed(0)
    model = T.WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = T.GenerationConfig(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257, max_length=448,
        no_timestamps_token_id=50363, suppress_tokens=[1, 2, 7, 8, 9, 10, 14, 25, 26, 27], begin_suppress_tokens=[220, 50257],
        lang_to_id={"<|en|>": 50259}, task_to_id={"translate": 50358, "transcribe": 50359}, is_multilingual=True,
        forced_decoder_ids=[[1, 50259], [2, 50359], [3, 50363]])
    model.save_pretrained(out)
    T.WhisperFeatureExtractor(feature_size=80).save_pretrained(out)


def make_qwen_vl(out: Path) -> None:
    import torch
    import transformers as T

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=896, fullatt_block_indexes=[7, 15, 23, 31],
                  in_channels=3)
    text = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                # head_dim 64: the mrope sections cover its 32 rotary frequencies (the 3B / 7B
                # checkpoints' [16, 24, 24] cover head_dim 128's 64)
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0})
    config = T.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                                vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = T.Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))


def timed(fn, runs: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def bench_whisper(tmp: Path, runs: int) -> dict:
    import numpy as np

    from onnxport.api import export
    from onnxport.runtime.tasks import open_task

    ckpt, bundle = tmp / "whisper-ckpt", tmp / "whisper"
    make_whisper(ckpt)
    t0 = time.perf_counter()
    export(ckpt, bundle)
    export_s = time.perf_counter() - t0
    stt = open_task(bundle)
    audio = (np.random.default_rng(0).standard_normal(16000 * 10) * 0.1).astype(np.float32)
    feats_ms, feats = timed(lambda: stt._features([audio], 16000), runs)
    enc_ms, states = timed(lambda: stt.audio.run({"input_features": feats}), runs)
    cross_ms, _ = timed(lambda: stt.cross.run({"encoder_hidden_states": next(iter(states.values()))}), runs)
    total_ms, res = timed(lambda: stt.generate(audio, max_new_tokens=32, language="en"), runs)
    n = len(res.tokens[0]) if hasattr(res, "tokens") else 32
    return {"export_seconds": round(export_s, 1), "log_mel_ms": round(feats_ms, 1), "audio_encoder_ms": round(enc_ms, 1),
            "cross_kv_ms": round(cross_ms, 1), "generate_ms": round(total_ms, 1), "new_tokens": n,
            "decoder_ms_per_token": round((total_ms - feats_ms - enc_ms - cross_ms) / max(n, 1), 1),
            "graph_bytes": sum(f.stat().st_size for f in bundle.glob("*.onnx*"))}


def bench_qwen_vl(tmp: Path, runs: int) -> dict:
    import numpy as np

    from onnxport.api import export
    from onnxport.runtime.tasks import open_task

    ckpt, bundle = tmp / "vl-ckpt", tmp / "vl"
    make_qwen_vl(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / f, ckpt / f)
    t0 = time.perf_counter()
    export(ckpt, bundle)
    export_s = time.perf_counter() - t0
    pipe = open_task(bundle)
    image = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    prompt = [151652, 151655, 151653, *range(100, 113)]
    pre_ms, out = timed(lambda: pipe.processor([image]), runs)
    grid = np.asarray(out["image_grid_thw"], dtype=np.int64)
    vis_ms, feats = timed(lambda: pipe.vision(out["pixel_values"], grid), runs)
    res = None

    def run():
        nonlocal res
        res = pipe.generate(prompt, images=[image], max_new_tokens=32, eos_token_id=None)
        return res

    total_ms, _ = timed(run, runs)
    return {"export_seconds": round(export_s, 1), "image": "448x448", "image_tokens": int(grid.prod() // 4),
            "preprocess_ms": round(pre_ms, 1), "vision_ms": round(vis_ms, 1), "prefill_ms": round(res.prefill_ms, 1),
            "decode_tokens_per_s": round(res.decode_tokens_per_s, 2), "generate_ms": round(total_ms, 1),
            "graph_bytes": sum(f.stat().st_size for f in bundle.glob("*.onnx*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="whisper-base,qwen2.5-vl")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"running {name} ...", file=sys.stderr)
            fn = {"whisper-base": bench_whisper, "qwen2.5-vl": bench_qwen_vl}[name]
            sub = Path(tmp) / name
            sub.mkdir()
            results[name] = fn(sub, args.runs)
            shutil.rmtree(sub, ignore_errors=True)
            print(json.dumps({name: results[name]}), file=sys.stderr)
    text = json.dumps(results, indent=1)
    print(text)
    if args.save:
        args.save.write_text(text + "\n")


if __name__ == "__main__":
    main()
