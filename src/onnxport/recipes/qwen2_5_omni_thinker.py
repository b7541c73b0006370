"""Qwen2.5-Omni (model_type `qwen2_5_omni`, the full model): the thinker's three parts.

- `decoder`: the thinker's text model on inputs_embeds with TMRoPE position ids [3, batch, seq]
  (Qwen2.5-VL's decoder contract; `embed_tokens.onnx` maps token ids);
- `vision`: the thinker's vision tower, through Qwen2.5-VL's vision graph (same windowed ViT,
  its grid-dependent tensors computed on the host);
- `audio`: the thinker's audio tower, through the `qwen2_5_omni_audio_encoder` recipe's graph
  (chunking, pooling indices and the chunk mask computed on the host).

The audio part proposes the `any-to-text` pipeline (runtime/tasks/omni.py) and checks it
end to end against the thinker's generate. The talker and token2wav (speech output) are the
parts of `qwen2_5_omni_speech.py`: the decoder graph lists their weights as another part's, and,
when the checkpoint has them, also outputs the thinker's last hidden state, which the talker
reads.

Every part loads the full model once (api.export shares one model between parts of one
`model_class`), wrapped as `OmniThinkerLM` so parameter names stay the checkpoint's
(`thinker.*`, `talker.*`, `token2wav.*`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from onnxport.recipes import register_recipe
from onnxport.recipes.base import DecoderLM
from onnxport.recipes.qwen2_5_omni import Qwen25OmniAudio
from onnxport.recipes.qwen2_5_vl import Qwen25VLVision

if TYPE_CHECKING:
    from onnxport.bundle import Pipeline
    from onnxport.checkpoint import Checkpoint

MODEL_CLASS = "Qwen2_5OmniForConditionalGeneration"
#: top-level modules of the full model that produce speech, not text
SPEECH_MODULES = {"talker": "the talker (text -> speech codes)", "token2wav": "token2wav (speech codes -> waveform)"}


class OmniThinkerLM(torch.nn.Module):
    """The full model's thinker as a causal LM. The full class has no forward (its generate
    chains thinker and talker); this module forwards to the thinker and keeps the talker and
    token2wav as children, so every checkpoint weight has its checkpoint name and the weight
    accounting sees the speech modules it must account for."""

    def __init__(self, full: torch.nn.Module):
        super().__init__()
        self.thinker = full.thinker
        for name in SPEECH_MODULES:
            if hasattr(full, name):
                setattr(self, name, getattr(full, name))
        self.config = full.thinker.config
        self.full_config = full.config
        self.name_or_path = getattr(full, "name_or_path", None)
        self._onnxport_unused_checkpoint_keys = getattr(full, "_onnxport_unused_checkpoint_keys", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.thinker.dtype

    def get_input_embeddings(self):
        return self.thinker.get_input_embeddings()

    def get_output_embeddings(self):
        return self.thinker.get_output_embeddings()

    # an explicit signature: the export wrapper reads `position_ids` from it, and finds no cache
    # keyword, so it passes the cache under this transformers version's name (5.24: `cache`)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        return self.thinker(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, **kwargs)


def load_thinker(ckpt: Checkpoint, dtype: torch.dtype, attn_implementation: str | None = "eager") -> OmniThinkerLM:
    """The full Qwen2.5-Omni model from a local checkpoint, wrapped as OmniThinkerLM."""
    import functools
    import types

    import transformers

    from onnxport.hf.compat import require_transformers
    from onnxport.recipes.base import from_pretrained

    require_transformers(5, "the thinker's encoders take precomputed grids / chunks as kwargs")
    cls = transformers.Qwen2_5OmniForConditionalGeneration
    # the class's own from_pretrained also reads spk_dict.pt (the talker's speaker embeddings, a
    # torch pickle) and, asked for loading info, calls load_speakers on the (model, info) tuple;
    # the thinker needs neither, so the generic PreTrainedModel loader runs instead
    loader = types.SimpleNamespace(
        from_pretrained=functools.partial(transformers.PreTrainedModel.from_pretrained.__func__, cls))
    return OmniThinkerLM(from_pretrained(loader, ckpt, dtype, attn_implementation))


class OmniCheckpoint:
    """What every `qwen2_5_omni` part's recipe shares: the whole checkpoint loaded once through
    `load_thinker` (api.export hands one loaded model to every part with this model_class)."""

    family = "qwen2_5_omni"
    model_class = MODEL_CLASS
    min_transformers_major = 5

    def load_model(self, ckpt: Checkpoint, dtype: torch.dtype) -> OmniThinkerLM:
        return load_thinker(ckpt, dtype, self.attn_implementation)


@register_recipe("qwen2_5_omni", part="decoder")
class Qwen25OmniThinkerText(OmniCheckpoint, DecoderLM):
    """The thinker's language model: `model.onnx` takes inputs_embeds and TMRoPE ids [3, batch,
    seq] (the any-to-text pipeline places image and audio features among the token embeddings
    and computes the positions on the host), `embed_tokens.onnx` maps token ids."""

    model_types: ClassVar[tuple[str, ...]] = ()
    embeds_input = True
    position_axes = 3

    def base_model(self, model):
        return model.thinker.model.language_model

    def hidden_output(self, model) -> bool:
        """The talker reads the thinker's last hidden states beside its tokens."""
        return hasattr(model, "talker")

    def skipped_weights(self, model, unread: set[str]) -> dict[str, str]:
        """The thinker's encoders are the vision and audio parts; talker and token2wav (speech
        output) are the talker and token2wav parts."""
        out = {}
        for name in unread:
            top = name.split(".")[0]
            if top in SPEECH_MODULES:
                out[name] = f"belongs to {SPEECH_MODULES[top]}, the speech output part {top!r} of the checkpoint"
            elif name.startswith("thinker.model.visual."):
                out[name] = "belongs to thinker.model.visual, the vision part of the checkpoint"
            elif name.startswith("thinker.model.audio_tower."):
                out[name] = "belongs to thinker.model.audio_tower, the audio part of the checkpoint"
        return out


@register_recipe("qwen2_5_omni", part="vision")
class Qwen25OmniVision(OmniCheckpoint, Qwen25VLVision):
    """Qwen2.5-VL's vision graph on the thinker's vision tower (the Omni class takes the same
    precomputed position ids / windows / cu_seqlens kwargs)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # the any-to-text pipeline comes from the audio part, exported after this one; Qwen2.5-VL's
    # image-text pipeline would leave the audio placeholders empty
    pipeline = None
    verify_pipeline = None

    def visual(self, model):
        return model.thinker.model.visual


@register_recipe("qwen2_5_omni", part="audio")
class Qwen25OmniThinkerAudio(OmniCheckpoint, Qwen25OmniAudio):
    """The audio-encoder graph on the thinker's audio tower; proposes and checks the pipeline."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def audio_tower(self, model):
        return model.thinker.model.audio_tower

    def pipeline(self, model, graphs) -> Pipeline:
        """Decoder + vision + audio chained (when all three parts were exported)."""
        return any_to_text_pipeline(model, model.name_or_path)

    def verify_pipeline(self, model, pipeline, folder, manifest) -> dict:
        """End to end: one image, one audio clip and a few text tokens through the ONNX pipeline
        against the thinker's generate on the same pixels, mel features and ids, 8 greedy tokens."""
        return check_any_to_text(model, folder)


#: the feature extractor's settings in preprocessor_config.json (WhisperFeatureExtractor's)
FEATURE_KEYS = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value", "dither")


def any_to_text_pipeline(model: OmniThinkerLM, checkpoint_dir=None) -> Pipeline:
    """The any-to-text pipeline of a Qwen2.5-Omni checkpoint: which graphs chain, the
    placeholder tokens, the TMRoPE rule and the image / audio preprocessing settings (the
    checkpoint's preprocessor_config.json when there is one, else transformers' defaults for
    these encoders)."""
    import json
    from pathlib import Path

    from onnxport.bundle import Pipeline

    cfg = model.config
    vision, audio = cfg.vision_config, cfg.audio_config
    processor = {}
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "preprocessor_config.json").is_file():
        processor = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
    images = {k: v for k, v in processor.items() if k not in FEATURE_KEYS}
    images.setdefault("patch_size", vision.patch_size)
    images.setdefault("temporal_patch_size", vision.temporal_patch_size)
    images.setdefault("merge_size", vision.spatial_merge_size)
    features = {k: processor[k] for k in FEATURE_KEYS if k in processor}
    features.setdefault("feature_size", audio.num_mel_bins)
    config = {
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "audio_token_id": cfg.audio_token_id,
        "vision_start_token_id": getattr(cfg, "vision_start_token_id", None),
        "vision_end_token_id": getattr(cfg, "vision_end_token_id", None),
        "audio_start_token_id": cfg.audio_start_token_id,
        "audio_end_token_id": cfg.audio_end_token_id,
        "image_placeholder": "<|vision_bos|><|IMAGE|><|vision_eos|>",
        "audio_placeholder": "<|audio_bos|><|AUDIO|><|audio_eos|>",
        "spatial_merge_size": vision.spatial_merge_size,
        "position_id_per_seconds": cfg.position_id_per_seconds,
        "position_ids": {"rule": "tmrope", "axes": ["temporal", "height", "width"],
                         "runtime": "onnxport.runtime.tasks.omni:rope_index"},
        "features": {"vision": "image_embeds", "audio": "audio_embeds",
                     "placed_at": "image_token_id: one row per merged patch; audio_token_id: one row per "
                                  "pooled audio frame; row-major over the batch"},
        "image_processor": images,
        "feature_extractor": features,
    }
    return Pipeline("any-to-text", {"embedding": "embed_tokens.onnx", "decoder": "model.onnx", "vision": "vision",
                                    "audio": "audio"}, config)


def check_any_to_text(model: OmniThinkerLM, folder, new_tokens: int = 8) -> dict:
    """The chained pipeline against the thinker (see Qwen25OmniThinkerAudio.verify_pipeline)."""
    import numpy as np

    from onnxport.errors import VerificationError
    from onnxport.runtime.tasks.omni import AnyToText

    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    special = [cfg.image_token_id, cfg.audio_token_id, cfg.audio_start_token_id, cfg.audio_end_token_id,
               getattr(cfg, "vision_start_token_id", None), getattr(cfg, "vision_end_token_id", None)]
    if (any(t is None or not 0 <= t < vocab for t in special)
            or any(p.device.type == "meta" for p in model.thinker.parameters())):
        return {"ok": None, "skipped": "a placeholder token lies outside the vocabulary, or the model was not loaded"}
    pipe = AnyToText(folder)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    clip = (0.1 * rng.standard_normal(pipe.sampling_rate // 2)).astype(np.float32)
    text = [t for t in range(3, 3 + 24) if t not in set(special) | {cfg.video_token_id}][:6]
    ids = [text[0], cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, text[1],
           cfg.audio_start_token_id, cfg.audio_token_id, cfg.audio_end_token_id, *text[2:]]
    got = pipe.generate(ids, images=[image], audio=[clip], max_new_tokens=new_tokens, eos_token_id=None)
    pixels = pipe.processor([image])
    mel = pipe.features([clip], sampling_rate=pipe.sampling_rate, return_attention_mask=True)
    rows = pipe.prepare(ids, images=[image], audio=[clip]).rows[0]
    input_ids = torch.tensor([rows])
    with torch.no_grad():
        ref = model.thinker.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.from_numpy(pixels["pixel_values"]), image_grid_thw=torch.from_numpy(
                np.asarray(pixels["image_grid_thw"], dtype=np.int64)),
            input_features=torch.from_numpy(mel["input_features"]),
            feature_attention_mask=torch.from_numpy(mel["attention_mask"]).long(),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            eos_token_id=None)[0, len(rows):].tolist()
    out = got.padded[0].tolist()
    equal = sum(a == b for a, b in zip(out, ref))
    record = {"ok": out == ref, "tokens_equal": equal, "tokens": new_tokens,
              "case": f"one 40x56 image and a 0.5 s clip ({len(rows)} prompt tokens), {new_tokens} greedy tokens"}
    if out != ref:
        raise VerificationError(f"the any-to-text pipeline gives {equal} of {new_tokens} of the thinker's greedy "
                                "tokens", "report the model family; each graph verified alone, the chain did not")
    return record
