"""Load a part's torch model for export: the first stage of the pipeline.

`load_part` returns a `LoadedModel`: the module, and what later stages need to know about it
(the buffers of a model traced on the meta device, the PyTorch reference outputs computed once
and shared by every check), kept beside the module instead of as attributes on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from onnxport.checkpoint import Checkpoint
from onnxport.config import ExportConfig, SplitConfig
from onnxport.errors import CheckpointError, InputError
from onnxport.recipes.base import DecoderLM

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A loaded part. `buffers`: --low-memory (the model is a skeleton on the meta device; its
    buffers are real tensors, its weights are read from the checkpoint when used);
    `reference`: PyTorch outputs per verification case, computed once and shared by the fp32
    check, the fusions' checks and the fp16 guard's candidates (a streamed 7B reference costs a
    full read of the checkpoint per case); `streamed`: the reference reads each module's
    weights from the checkpoint when it runs."""

    recipe: object
    model: object
    buffers: dict | None = None
    reference: dict = field(default_factory=dict)
    streamed: bool = False

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.recipe, DecoderLM)


class ModelCache:
    """Parts loaded through the same model class share one model (a Qwen2.5-VL checkpoint's
    decoder and vision parts); only the last one is kept, so memory holds one model at a time."""

    def __init__(self):
        self._key: str | None = None
        self._loaded: LoadedModel | None = None

    def load(self, name: str, recipe, ckpt: Checkpoint, cfg: ExportConfig, split: SplitConfig | None) -> LoadedModel:
        if cfg.low_memory and isinstance(recipe, DecoderLM):
            return load_skeleton(recipe, ckpt, cfg, split)
        key = getattr(recipe, "model_class", "") or f"part:{name}"
        if key != self._key or self._loaded is None:
            self._loaded = None  # drop the previous model before loading the next
            self._key, self._loaded = key, LoadedModel(recipe, load_model(recipe, ckpt, cfg))
        return LoadedModel(recipe, self._loaded.model)

    def clear(self) -> None:
        self._key = self._loaded = None


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(recipe, ckpt: Checkpoint, cfg: ExportConfig = ExportConfig()):
    """Check checkpoint shapes against the config (decoders), then load the part's model."""
    import torch

    quiet_transformers()
    if isinstance(recipe, DecoderLM) and not ckpt.pickle_weights:
        import transformers

        from onnxport.export.weights import check_checkpoint_shapes

        try:
            config = transformers.AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError
            raise CheckpointError(f"transformers cannot read config.json: {str(e).splitlines()[0][:200]}",
                                  "check config.json against the model's documentation") from e
        cls = recipe.model_cls()
        check_checkpoint_shapes(ckpt, lambda: cls.from_config(config) if hasattr(cls, "from_config") else cls(config))
    return load_or_explain(lambda: recipe.load_model(ckpt, getattr(torch, cfg.trace_dtype)))


def load_skeleton(recipe, ckpt: Checkpoint, cfg: ExportConfig, split: SplitConfig | None) -> LoadedModel:
    """The decoder on the meta device for a bounded-memory export (`--low-memory`)."""
    import torch

    from onnxport.export.stream import skeleton_model
    from onnxport.hf.compat import require_transformers

    if split is not None:
        raise InputError("--low-memory applies to the monolithic layout", "drop --layout split or --low-memory")
    # 4.x rotary modules cannot run on the meta device (their scaling wrapper reads values)
    require_transformers(5, "--low-memory: the model is traced on the meta device")
    if ckpt.pickle_weights:
        raise InputError("--low-memory streams weights from safetensors; this checkpoint has pickle weights only",
                         "convert it to safetensors, or drop --low-memory")
    quiet_transformers()
    model, buffers = load_or_explain(lambda: skeleton_model(recipe, ckpt, getattr(torch, cfg.trace_dtype)))
    return LoadedModel(recipe, model, buffers=buffers)


def load_or_explain(load):
    try:
        return load()
    except (CheckpointError, InputError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"loading the model failed: {_first_line(e)}",
                              "the checkpoint does not match its config.json, or needs --model-class") from e


def load_any(ckpt: Checkpoint, dtype: str, model_class: str | None, trust_remote_code: bool):
    """export-module: the checkpoint's own architecture class (so module paths match the
    checkpoint's names), or `model_class`; remote code only when asked for."""
    import torch
    import transformers

    from onnxport.recipes.base import from_pretrained

    auto_map = ckpt.config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise CheckpointError("this checkpoint's model class is remote code (auto_map in config.json)",
                              "pass --trust-remote-code if you trust its source")
    if model_class:
        if not hasattr(transformers, model_class):
            raise InputError(f"transformers has no class {model_class!r}", "e.g. --model-class AutoModel")
        cls = getattr(transformers, model_class)
    elif auto_map:
        cls = transformers.AutoModel
    else:
        archs = [a for a in ckpt.config.get("architectures") or [] if hasattr(transformers, a)]
        cls = getattr(transformers, archs[0]) if archs else transformers.AutoModel
    quiet_transformers()

    def load():
        try:
            return from_pretrained(cls, ckpt, getattr(torch, dtype), "eager", trust_remote_code)
        except (TypeError, ValueError):  # remote-code classes that take no attn_implementation
            return from_pretrained(cls, ckpt, getattr(torch, dtype), None, trust_remote_code)

    return load_or_explain(load)


def _first_line(e: Exception, limit: int = 600) -> str:
    """The first line of an error, whole (cut at a word only past `limit` characters)."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."
