"""Image + text -> text in ONNX Runtime: MiniCPM-V 4.6.

    numpy image processor (runtime/image_processor.py: transformers' MiniCPM-V 4.6 processor:
      a source image, plus a grid of slices when the image is larger than scale_resolution**2)
      -> vision.onnx once per slice (NaViT position ids and window order on the host)
      -> merger.onnx once per slice (its tokens reshaped to the 2x2 merge grid)
      -> the features placed at the image tokens of the embedded prompt (embed_tokens.onnx)
      -> model.onnx with plain positions (cumsum of the mask, as any text decoder), greedy or
         sampled decoding.

Each image placeholder in the prompt (the tokenizer's `image_token`, once per image, as
transformers' processor expects) becomes what the processor writes for it:
`<image_id>N</image_id>` (N counts the images of the prompt), `<image>` + one image token per
merged token of the source image + `</image>`, then per row of slices
`<slice>...</slice>` for each slice, rows joined by a newline. Text and chat prompts are
expanded as text and tokenized whole, as the processor does; token-id prompts get the
tokenized replacement spliced in at each placeholder id. onnxruntime + numpy + Pillow +
tokenizers (+ jinja2 for chats); no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxport.errors import BundleError, RuntimeInputError
from onnxport.runtime.tasks import register_task
from onnxport.runtime.tasks.image_text_to_text import as_batch, open_embeds_decoder
from onnxport.runtime.tasks.media import PromptsWithMedia

KIND = "image-text-to-text/minicpmv"


@register_task(KIND)
class MiniCPMVImageTextToText(PromptsWithMedia):
    """Generate text from images and text with an onnxport MiniCPM-V bundle.

    >>> pipe = MiniCPMVImageTextToText("minicpmv/")                # doctest: +SKIP
    >>> pipe.generate("Describe <|image_pad|>", images=[img]).texts  # the tokenizer's image_token
    """

    def __init__(self, bundle: str | Path, threads: int | None = None):
        from onnxport.runtime.encoder import EncoderRunner
        from onnxport.runtime.image_processor import MiniCPMVImageProcessor

        self.folder = Path(bundle)
        self.generator, pipeline = open_embeds_decoder(bundle, threads, (KIND,), "a MiniCPM-V image-text",
                                                       positions_3d=False)
        cfg = pipeline.config
        self.config = cfg
        self.vision = EncoderRunner(self.folder, pipeline.graphs.get("vision", "vision"), threads)
        self.merger = EncoderRunner(self.folder, pipeline.graphs.get("merger", "merger"), threads)
        self.processor = MiniCPMVImageProcessor(cfg.get("image_processor") or {})
        if self.processor.config.downsample_mode != "16x":
            raise BundleError("the bundle's image processor uses downsample_mode 4x; onnxport's MiniCPM-V graphs "
                              "apply the 16x merge", "set downsample_mode to 16x in preprocessor_config.json")
        self.image_token_id = int(cfg["image_token_id"])
        self.merge_h, self.merge_w = (int(k) for k in cfg.get("merge_kernel_size", (2, 2)))
        #: the ViT's window merger (k x k patches -> 1 token) before the merger
        self.window = int((self.vision.entry.meta or {}).get("window_kernel_size", 2))
        tok = self.tokenizer
        tokens = dict(cfg.get("tokens") or {})
        if not tokens.get("image_token"):
            tokens["image_token"] = tok.id_to_token(self.image_token_id)
        pc = self.processor.config
        for name, text in tokens.items():
            unused = (name.startswith("image_id") and not pc.use_image_id) or (name.startswith("slice")
                                                                                and not pc.slice_mode)
            if not unused and (text is None or tok.token_to_id(text) is None):
                raise BundleError(f"the bundle's tokenizer has no {name} {text!r}, which MiniCPM-V's prompts need",
                                  "export the checkpoint with its own tokenizer files")
        self.tokens = tokens
        self.image_token = tokens["image_token"]

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    # --- prompts --------------------------------------------------------------------------------

    def placeholder(self, target_sizes: np.ndarray, grid: list[int], index: int | None = None) -> str:
        """What the processor writes for one image: `target_sizes` [1 + slices, 2] in patches
        (source first), `grid` [rows, cols] ([0, 0]: not sliced), `index` its number in the prompt
        (None: no `<image_id>` tag, the processor's use_image_id=False)."""
        t = self.tokens
        per_token = self.window ** 2 * self.merge_h * self.merge_w  # patches per LLM token
        counts = [int(h) * int(w) // per_token for h, w in np.asarray(target_sizes).tolist()]
        text = "" if index is None else f"{t['image_id_start_token']}{index}{t['image_id_end_token']}"
        text += t["image_start_token"] + self.image_token * counts[0] + t["image_end_token"]
        rows, cols = grid
        if rows > 0 and cols > 0 and self.processor.config.slice_mode:
            text += "\n".join("".join(t["slice_start_token"] + self.image_token * n + t["slice_end_token"]
                                      for n in counts[1 + r * cols:1 + (r + 1) * cols]) for r in range(rows))
        return text

    def prompt_ids(self, prompt, replacements: list[str], chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of one prompt with its placeholders expanded (`replacements`, one per
        image): text as the processor tokenizes it, chat messages rendered with the bundle's chat
        template (transformers-style messages, {"type": "image"} entries included), or ids."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            self._check_count(ids.count(self.image_token_id), len(replacements))
            out, it = [], iter(replacements)
            for t in ids:
                out += self.tokenizer.encode(next(it), add_special_tokens=False) if t == self.image_token_id else [t]
            return out
        add_special = None  # a plain text prompt: the tokenizer's own special tokens, as the processor
        if chat or not isinstance(prompt, str):
            from onnxport.runtime.chat import ChatTemplate, as_conversations

            messages = ([{"role": "user", "content": [*({"type": "image"} for _ in replacements),
                                                      {"type": "text", "text": prompt}]}]
                        if isinstance(prompt, str) else list(prompt))
            (conversation,) = as_conversations([messages], system)
            prompt = ChatTemplate.from_folder(self.folder).render(conversation, add_generation_prompt=True)
            add_special = False  # the template writes bos itself
        pieces = prompt.split(self.image_token)
        self._check_count(len(pieces) - 1, len(replacements))
        text = pieces[0] + "".join(r + p for r, p in zip(replacements, pieces[1:]))
        return self.tokenizer.encode(text, add_special_tokens=add_special)

    def _check_count(self, placeholders: int, images: int) -> None:
        if placeholders != images:
            raise RuntimeInputError(
                f"the prompt has {placeholders} image placeholder(s) ({self.image_token}) for {images} image(s)",
                "write the image placeholder once per image (the chat template does it for {'type': 'image'})")

    # --- images ---------------------------------------------------------------------------------

    def image_features(self, pixel_values: np.ndarray, target_sizes: np.ndarray) -> np.ndarray:
        """LLM embeddings [tokens, hidden] of processed slices, in order. The vision graph runs
        once per slice: its packed attention is block-diagonal per slice anyway, and one call
        per slice keeps the [patches, patches] mask small."""
        p = self.processor.config.patch_size
        out, start = [], 0
        for h, w in np.asarray(target_sizes).tolist():
            n = h * w
            pixels = pixel_values[..., start * p:(start + n) * p]
            tokens = self.vision(pixels, np.asarray([[h, w]], dtype=np.int64))["vision_embeds"][0]
            # after the ViT's window merge: (h/k) x (w/k) tokens, merged again kh x kw
            th, tw = h // self.window, w // self.window
            grid = tokens.reshape(th // self.merge_h, self.merge_h, tw // self.merge_w, self.merge_w, -1)
            out.append(self.merger(hidden_states=grid)["image_embeds"])
            start += n
        return np.concatenate(out)

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts, images=None, max_new_tokens: int = 32, chat: bool = False, system: str | None = None,
                 on_token=None, **sampling):
        """`prompts`: one prompt or a list (a batch); `images`: the images of one prompt (a list),
        or per prompt a list of images, in placeholder order. Returns the Generator's result."""
        prompts, images = as_batch(prompts, images)
        use_id = self.processor.config.use_image_id
        rows, features = [], []
        for prompt, imgs in zip(prompts, images):
            replacements = []
            if imgs:
                out = self.processor(imgs)
                sizes = np.split(out["target_sizes"], np.cumsum(out["num_patches_per_image"])[:-1])
                replacements = [self.placeholder(s, g, i if use_id else None)
                                for i, (s, g) in enumerate(zip(sizes, out["grids"]))]
                features.append(self.image_features(out["pixel_values"], out["target_sizes"]))
            rows.append(self.prompt_ids(prompt, replacements, chat, system))
        prefill = self.prefill(rows, np.concatenate(features) if features else None)
        res = self.generator.generate_ids(rows, max_new_tokens=max_new_tokens, on_token=on_token, prefill=prefill,
                                          **sampling)
        res.texts = [self.tokenizer.decode(t) for t in res.tokens]
        return res

    def prefill(self, rows: list[list[int]], features: np.ndarray | None) -> dict:
        """The decoder's first-call inputs for the left-padded batch of `rows` (as
        Generator.generate_ids pads it): token embeddings with the image features at the image
        tokens, in order (transformers' masked_scatter); positions are the Generator's own."""
        gen = self.generator
        batch, longest = len(rows), max(len(r) for r in rows)
        ids = np.full((batch, longest), gen.pad_feed, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=bool)
        for r, p in enumerate(rows):
            ids[r, longest - len(p):] = p
            mask[r, longest - len(p):] = True
        embeds = gen.embed(ids)
        is_image = (ids == self.image_token_id) & mask
        n, m = int(is_image.sum()), 0 if features is None else features.shape[0]
        if n != m:
            raise RuntimeInputError(f"{n} image tokens but {m} image features",
                                    "write the image token only as the image placeholder, once per image")
        if n:
            embeds = embeds.copy()
            embeds[is_image] = features.astype(embeds.dtype)
        return {"inputs_embeds": embeds}
