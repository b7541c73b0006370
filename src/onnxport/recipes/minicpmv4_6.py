"""MiniCPM-V 4.6 vision: NaViT-packed SigLIP-style tower with a window-attention merger inserted
after `insert_layer_id` (2x2 tokens -> 1), then the MLP merger into the LLM's width.

Two graphs. `vision.onnx`: the tower; its grid-dependent index maps (nearest position ids, the
2x2 window order and boundaries) come from `onnxport.runtime.preprocess.minicpmv4_6_vision`, the
packed attention runs through `varlen_attention_as_mask` with the mask built in-graph from the
per-image `target_sizes` (plain tensor arithmetic). `merger.onnx`: the MLP merger for ONE image,
whose tokens the runtime reshapes to [merged_height, 2, merged_width, 2, D] (the original loops
over images with Python ints; the reshape is free outside the graph). Dims: `num_patches`,
`num_patches_div4` (tokens after the ViT merge), `merged_height`, `merged_width`."""

from __future__ import annotations

import torch

from onnxport.recipes import register_recipe
from onnxport.recipes.base import DecoderLM
from onnxport.recipes.encoder import EncoderRecipe


class VisionTowerGraph(torch.nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values, target_sizes, position_ids, window_index, cu_window_seqlens):
        out = self.tower(pixel_values, target_sizes=target_sizes, position_ids=position_ids, window_index=window_index,
                         cu_window_seqlens=cu_window_seqlens, max_seqlen=0)
        return out.last_hidden_state


class MergerGraph(torch.nn.Module):
    """One image: tokens [merged_h, kh, merged_w, kw, D] -> LLM embeddings [merged_h*merged_w, E]."""

    def __init__(self, merger):
        super().__init__()
        self.merger = merger

    def forward(self, hidden_states):
        kh, kw = self.merger.merge_kernel_size
        d = hidden_states.shape[-1]
        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(-1, kh * kw * d)
        return self.merger.mlp[0](x)


@register_recipe("minicpmv4_6", part="vision")
class MiniCPMV46Vision(EncoderRecipe):
    family = "minicpmv4_6"
    model_class = "MiniCPMV4_6ForConditionalGeneration"
    #: per-image patch grids (h, w) to verify at; all divisible by 4 (window merge, then merger)
    images = ([[8, 8]], [[12, 16]], [[8, 8], [4, 12]])

    def parts(self, model):
        from onnxport.hf.compat import require_transformers
        from onnxport.recipes.parts import ModulePart, TensorSpec
        from onnxport.runtime.preprocess import minicpmv4_6_vision

        require_transformers(5, "precomputed vision position ids / window order as kwargs")
        base = model.model
        tower, merger = base.vision_tower, base.merger
        if merger.merger_times != 1 or base.config.downsample_mode == "4x":
            raise NotImplementedError("onnxport's MiniCPM-V 4.6 recipe covers merger_times=1 in 16x mode")
        vcfg = tower.config
        p = vcfg.patch_size
        meta = {"num_patches_per_side": vcfg.image_size // p, "window_kernel_size": vcfg.window_kernel_size[0],
                "patch_size": p, "merge_kernel_size": list(merger.merge_kernel_size)}
        inputs = [
            TensorSpec("pixel_values", "float32", (1, vcfg.num_channels, p, "num_patches_x_patch")),
            TensorSpec("target_sizes", "int64", ("num_images", 2)),
            TensorSpec("position_ids", "int64", ("num_patches",)),
            TensorSpec("window_index", "int64", ("num_patches",)),
            TensorSpec("cu_window_seqlens", "int64", ("num_windows_plus_1",)),
        ]

        def pixels_for(sizes):
            n = int(sum(h * w for h, w in sizes))
            g = torch.Generator().manual_seed(n)
            return torch.randn(1, vcfg.num_channels, p, n * p, generator=g), torch.tensor(sizes)

        def vision_case(sizes):
            pixels, ts = pixels_for(sizes["target_sizes"])
            feeds = minicpmv4_6_vision(pixels.numpy(), ts.numpy(), meta)
            with torch.no_grad():
                expected = tower(pixels, target_sizes=ts).last_hidden_state
            return [torch.from_numpy(feeds[i.name]) for i in inputs], [expected]

        vision_sizes = []
        for images in self.images:
            n = sum(h * w for h, w in images)
            vision_sizes.append({"target_sizes": images, "num_patches_x_patch": n * p, "num_images": len(images),
                                 "num_patches": n, "num_patches_div4": n // 4, "num_windows_plus_1": n // 4 + 1})
        kh, kw = merger.merge_kernel_size
        merger_in = TensorSpec("hidden_states", "float32", ("merged_height", kh, "merged_width", kw, vcfg.hidden_size))

        def merger_case(sizes):
            h, w = sizes["merged_height"] * kh, sizes["merged_width"] * kw  # tokens per side after the ViT merge
            g = torch.Generator().manual_seed(h * 100 + w)
            tokens = torch.randn(1, h * w, vcfg.hidden_size, generator=g)
            with torch.no_grad():
                (expected,) = merger(tokens, torch.tensor([[h, w]]))
            x = tokens[0].reshape(sizes["merged_height"], kh, sizes["merged_width"], kw, vcfg.hidden_size)
            return [x], [expected]

        merger_sizes = [{"merged_height": 2, "merged_width": 3}, {"merged_height": 4, "merged_width": 2}]
        return [
            ModulePart("vision", VisionTowerGraph(tower), inputs, ["vision_embeds"], vision_sizes,
                       output_dims={"vision_embeds": [1, "num_patches_div4", vcfg.hidden_size]},
                       make_case=vision_case, preprocess="minicpmv4_6_vision", meta=meta),
            ModulePart("merger", MergerGraph(merger), [merger_in], ["image_embeds"], merger_sizes,
                       output_dims={"image_embeds": ["num_image_tokens", base.config.text_config.hidden_size]},
                       make_case=merger_case, meta={"merge_kernel_size": [kh, kw]}),
        ]

    def pipeline(self, model, graphs):
        """Vision + merger + text decoder chained (when every part was exported)."""
        return image_text_pipeline(model, getattr(model, "name_or_path", None) or
                                   getattr(model.config, "_name_or_path", None))


#: the processor's marker tokens (tokenizer attributes) and MiniCPM-V's own spelling of them,
#: used when the checkpoint's tokenizer_config.json does not name them
MARKER_TOKENS = {"image_start_token": "<image>", "image_end_token": "</image>", "slice_start_token": "<slice>",
                 "slice_end_token": "</slice>", "image_id_start_token": "<image_id>",
                 "image_id_end_token": "</image_id>"}


def image_text_pipeline(model, checkpoint_dir=None):
    """The image-text-to-text pipeline of a MiniCPM-V 4.6 checkpoint: which graphs chain, the
    placeholder token and the markers transformers' processor expands it into, and the image
    processor's settings (the checkpoint's preprocessor_config.json when there is one, else
    transformers' defaults with this vision tower's patch size)."""
    import json
    from pathlib import Path

    from onnxport.bundle import Pipeline

    cfg = model.config
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def read(name):
        f = folder / name if folder is not None else None
        return json.loads(f.read_text()) if f is not None and f.is_file() else {}

    processor = read("preprocessor_config.json")
    processor.setdefault("patch_size", cfg.vision_config.patch_size)
    processor.setdefault("downsample_mode", cfg.downsample_mode)
    # transformers 5.x tokenizers carry the processor's tokens as named extra special tokens
    named = read("tokenizer_config.json").get("extra_special_tokens")
    named = named if isinstance(named, dict) else {}
    tokens = {k: named.get(k, v) for k, v in MARKER_TOKENS.items()}
    tokens["image_token"] = named.get("image_token")  # None: the runtime reads image_token_id's token
    config = {
        "image_token_id": cfg.image_token_id,
        "tokens": tokens,
        "merge_kernel_size": list(cfg.merge_kernel_size),
        "position_ids": {"rule": "cumsum(attention_mask) - 1", "axes": ["sequence"]},
        "features": {"vision": "vision_embeds", "merger": "image_embeds",
                     "placed_at": "image_token_id, in order: each image's source, then its slices row-major"},
        "image_processor": processor,
    }
    return Pipeline("image-text-to-text/minicpmv", {"embedding": "embed_tokens.onnx", "decoder": "model.onnx",
                                                    "vision": "vision", "merger": "merger"}, config)


@register_recipe("minicpmv4_6", part="decoder")
class MiniCPMV46Text(DecoderLM):
    """The language model of a MiniCPM-V 4.6 checkpoint (Qwen3.5 or Qwen3 text), through the
    conditional-generation class so checkpoint names (`model.language_model.*`, `lm_head`)
    match: `model.onnx` takes inputs_embeds (the pipeline places the merger's image features
    at the image tokens) and plain 1-D positions; `embed_tokens.onnx` maps token ids (the
    embedding is not scaled)."""

    family = "minicpmv4_6"
    model_class = "MiniCPMV4_6ForConditionalGeneration"
    #: image features are placed among the token embeddings by the pipeline
    embeds_input = True

    def base_model(self, model):
        return model.model.language_model
