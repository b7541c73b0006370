"""Qwen2.5-VL vision encoder: patch embed, 2D rotary, window attention with a few full-attention
blocks, patch merger. Everything that depends on the image grid (rotary position ids, the window
order, the packed-attention masks) is computed outside the graph by
`onnxport.runtime.preprocess.qwen2_5_vl_vision` and fed in; `varlen_attention_as_mask` makes the
`cu_seqlens` attention one masked attention. Dims: `num_patches` (after patchify) and
`num_merged_patches` (= num_patches / spatial_merge_size**2, the image tokens the LLM sees)."""

from __future__ import annotations

import torch

from onnxport.recipes import register_recipe
from onnxport.recipes.base import DecoderLM
from onnxport.recipes.encoder import EncoderRecipe


class QwenVisionGraph(torch.nn.Module):
    """The visual tower with its grid-dependent tensors as inputs (transformers 5.x pops
    precomputed `position_ids`, `cu_seqlens`, `window_index`, `cu_window_seqlens` from kwargs)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, position_ids, window_index, attention_mask, window_attention_mask):
        out = self.visual(pixel_values, grid_thw=None, position_ids=position_ids, cu_seqlens=attention_mask,
                          max_seqlen=0, window_index=window_index, cu_window_seqlens=window_attention_mask,
                          max_window_seqlen=0)
        return out.pooler_output


@register_recipe("qwen2_5_vl", part="vision")
class Qwen25VLVision(EncoderRecipe):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    #: (t, h, w) patch grids to verify at: two image sizes, and two images packed together
    grids = ([[1, 8, 8]], [[1, 12, 16]], [[1, 8, 8], [1, 4, 12]])

    def visual(self, model):
        return model.model.visual

    def parts(self, model):
        from onnxport.hf.compat import require_transformers
        from onnxport.recipes.parts import ModulePart, TensorSpec

        require_transformers(5, "precomputed vision position ids / windows / cu_seqlens as kwargs")
        from onnxport.runtime.preprocess import qwen2_5_vl_vision

        visual = self.visual(model)
        cfg = visual.config
        meta = {"spatial_merge_size": cfg.spatial_merge_size, "window_size": cfg.window_size,
                "patch_size": cfg.patch_size, "temporal_patch_size": cfg.temporal_patch_size,
                "in_channels": cfg.in_channels}
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        inputs = [
            TensorSpec("pixel_values", "float32", ("num_patches", patch_dim)),
            TensorSpec("position_ids", "int64", ("num_patches", 2)),
            TensorSpec("window_index", "int64", ("num_merged_patches",)),
            TensorSpec("attention_mask", "float32", (1, 1, "num_patches", "num_patches")),
            TensorSpec("window_attention_mask", "float32", (1, 1, "num_patches", "num_patches")),
        ]
        unit = cfg.spatial_merge_size ** 2

        def make_case(sizes):
            grid = torch.tensor(sizes["grid_thw"])
            n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
            g = torch.Generator().manual_seed(n)
            pixels = torch.randn(n, patch_dim, generator=g)
            feeds = qwen2_5_vl_vision(pixels.numpy(), grid.numpy(), meta)
            with torch.no_grad():
                expected = visual(pixels, grid_thw=grid).pooler_output
            return [torch.from_numpy(feeds[i.name]) for i in inputs], [expected]

        sizes = []
        for grid in self.grids:
            n = sum(t * h * w for t, h, w in grid)
            sizes.append({"grid_thw": grid, "num_patches": n, "num_merged_patches": n // unit})
        return [ModulePart("vision", QwenVisionGraph(visual), inputs, ["image_embeds"], sizes,
                           output_dims={"image_embeds": ["num_merged_patches", cfg.out_hidden_size]},
                           make_case=make_case, preprocess="qwen2_5_vl_vision", meta=meta)]

    def pipeline(self, model, graphs):
        """Vision + text decoder chained (when both parts were exported)."""
        return image_text_pipeline(model, getattr(model, "name_or_path", None) or
                                   getattr(model.config, "_name_or_path", None))

    def verify_pipeline(self, model, pipeline, folder, manifest) -> dict:
        """End to end: one image and a few text tokens through the ONNX pipeline (numpy
        processor, vision graph, features placed at the image tokens, host mrope ids) against
        transformers' generate on the same pixels and ids, 8 greedy tokens."""
        return check_image_text(model, folder)


def image_text_pipeline(model, checkpoint_dir=None):
    """The image-text-to-text pipeline of a Qwen2.5-VL checkpoint: which graphs chain, the
    placeholder tokens, the mrope rule and the image processor's settings (the checkpoint's
    preprocessor_config.json when there is one, else transformers' defaults for this vision
    tower's patch / merge sizes)."""
    import json
    from pathlib import Path

    from onnxport.bundle import Pipeline

    cfg = model.config
    vision = cfg.vision_config
    processor = {}
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "preprocessor_config.json").is_file():
        processor = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
    processor.setdefault("patch_size", vision.patch_size)
    processor.setdefault("temporal_patch_size", vision.temporal_patch_size)
    processor.setdefault("merge_size", vision.spatial_merge_size)
    config = {
        "image_token_id": cfg.image_token_id,
        "video_token_id": getattr(cfg, "video_token_id", None),
        "vision_start_token_id": getattr(cfg, "vision_start_token_id", None),
        "image_placeholder": "<|vision_start|><|image_pad|><|vision_end|>",
        "spatial_merge_size": vision.spatial_merge_size,
        "tokens_per_second": getattr(vision, "tokens_per_second", None),
        "position_ids": {"rule": "mrope", "axes": ["temporal", "height", "width"],
                         "runtime": "onnxport.runtime.tasks.image_text_to_text:rope_index"},
        "features": {"vision": "image_embeds", "placed_at": "image_token_id, row-major, one row per merged patch"},
        "image_processor": processor,
    }
    return Pipeline("image-text-to-text", {"embedding": "embed_tokens.onnx", "decoder": "model.onnx",
                                           "vision": "vision"}, config)


def check_image_text(model, folder, new_tokens: int = 8) -> dict:
    """The chained pipeline against the PyTorch model (see Qwen25VLVision.verify_pipeline)."""
    import numpy as np

    from onnxport.errors import VerificationError
    from onnxport.runtime.tasks.image_text_to_text import ImageTextToText

    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    if not 0 <= cfg.image_token_id < vocab or any(p.device.type == "meta" for p in model.parameters()):
        return {"ok": None, "skipped": "the image token lies outside the vocabulary, or the model was not loaded"}
    pipe = ImageTextToText(folder)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    special = {cfg.image_token_id, getattr(cfg, "video_token_id", None), getattr(cfg, "vision_start_token_id", None),
               getattr(cfg, "vision_end_token_id", None)}
    text = [t for t in range(3, 3 + 16) if t not in special][:6]
    ids = [*text[:3], cfg.image_token_id, *text[3:]]
    out = pipe.processor([image])
    grids = [list(map(int, g)) for g in out["image_grid_thw"]]
    rows = pipe._expand(ids, grids)
    got = pipe.generate(ids, images=[image], max_new_tokens=new_tokens, eos_token_id=None).padded[0].tolist()
    input_ids = torch.tensor([rows])
    with torch.no_grad():
        ref = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values=torch.from_numpy(out["pixel_values"]),
                             image_grid_thw=torch.tensor(grids), mm_token_type_ids=(input_ids == cfg.image_token_id).int(),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)[0, len(rows):].tolist()
    equal = sum(a == b for a, b in zip(got, ref))
    record = {"ok": got == ref, "case": f"one 40x56 image ({len(rows)} prompt tokens), {new_tokens} greedy tokens",
              "tokens_equal": equal, "tokens": new_tokens}
    if got != ref:
        raise VerificationError(f"the image-text pipeline gives {equal} of {new_tokens} of transformers' greedy tokens",
                                "report the model family; each graph verified alone, the chain did not")
    return record


@register_recipe("qwen2_5_vl", part="decoder")
class Qwen25VLText(DecoderLM):
    """The language model of a Qwen2.5-VL checkpoint, through the conditional-generation class
    so checkpoint names match: `model.onnx` takes inputs_embeds and 3-D mrope position ids
    [3, batch, seq] (the image-text pipeline places the vision tower's features among the
    token embeddings and computes the positions on the host), `embed_tokens.onnx` maps token
    ids. Text alone is the same graph with equal ids on the three axes."""

    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    #: image / video features are placed among the token embeddings by the pipeline
    embeds_input = True
    #: mrope: temporal / height / width position ids
    position_axes = 3
