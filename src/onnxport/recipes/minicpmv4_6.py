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
