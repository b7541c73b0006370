"""Plan an export: which parts of the checkpoint, by which recipe, in which layout. Every check
that needs no model runs here, before anything is loaded or written."""

from __future__ import annotations

from dataclasses import dataclass

from onnxport.checkpoint import Checkpoint
from onnxport.config import ExportConfig, SplitConfig
from onnxport.errors import InputError
from onnxport.recipes.base import DecoderLM

#: the part name of a checkpoint's text decoder
DECODER = "decoder"


@dataclass(frozen=True)
class ExportPlan:
    """part name -> recipe (in export order), and the decoder's layout: `split` None is the
    monolithic graph; a SplitConfig the split (NPU) layout."""

    recipes: dict
    split: SplitConfig | None

    @property
    def decoder(self) -> DecoderLM | None:
        return text_decoder(self.recipes)

    @property
    def task(self) -> str:
        decoder = self.decoder
        return decoder.task if decoder is not None else next(iter(self.recipes.values())).task


def text_decoder(recipes: dict) -> DecoderLM | None:
    """The decoder part's recipe when it is a text decoder LM; None without one, or when the
    `decoder` part is a module part (whisper's reads encoder states: module graphs)."""
    decoder = recipes.get(DECODER)
    return decoder if isinstance(decoder, DecoderLM) else None


def plan_export(ckpt: Checkpoint, parts: tuple[str, ...] | None, split: SplitConfig | None,
                cfg: ExportConfig) -> ExportPlan:
    """The recipes of the parts to export, with the checks that need no model. A size limit
    alone (--max-graph-size) splits a plain text decoder into block graphs of whole layers; a
    decoder fed inputs_embeds stays one graph (only its encoder graphs are cut)."""
    from onnxport.recipes import get_recipes

    recipes = get_recipes(ckpt.model_type, parts, ckpt.config)
    decoder = text_decoder(recipes)
    if split is None and cfg.max_graph_bytes is not None and decoder is not None and not decoder.embeds_input:
        split = SplitConfig(max_graph_bytes=cfg.max_graph_bytes)
    has_decoder = decoder is not None
    if split is not None and not has_decoder:
        raise InputError(f"--layout split applies to decoder LMs; {ckpt.model_type!r} has no text decoder part "
                         f"(its parts: {', '.join(recipes)})", "drop --layout/--static")
    if cfg.attention != "default" and (split is not None or not has_decoder):
        raise InputError(f"--attention {cfg.attention} applies to monolithic text decoders",
                         "drop --attention, or export the monolithic layout")
    if cfg.optimize and (split is not None or not has_decoder):
        raise InputError("--optimize applies to monolithic text decoders so far", "drop --optimize")
    if cfg.dtype != "float32" and split is not None and (cfg.bf16_compute or cfg.low_memory):
        raise InputError(f"--dtype {cfg.dtype} of a split layout: fp16, or bf16 weights (no --bf16-compute)",
                         "drop --bf16-compute, or export the monolithic layout")
    if split is not None and cfg.kv_naming != "optimum":
        raise InputError("--kv-naming seed applies to the monolithic layout only",
                         "split graphs name their cache past_key_values.{i}.key -> present.{i}.key")
    return ExportPlan(recipes, split)


def new_manifest(ckpt: Checkpoint, plan: ExportPlan, cfg: ExportConfig, versions: dict):
    """The manifest of a bundle about to be exported by `plan`: source, model, exporter and
    layout; the stages fill in the parts, finish_bundle the source's sha256 (hashed meanwhile)."""
    from onnxport.bundle import (
        MODULES,
        MONOLITHIC,
        SPLIT,
        ExportInfo,
        Layout,
        Manifest,
        ModelInfo,
        Source,
    )

    decoder = plan.decoder
    kind = (SPLIT if plan.split is not None else MONOLITHIC) if decoder is not None else MODULES
    return Manifest(
        task=plan.task, versions=versions, source=Source(str(ckpt.path.resolve()), ""),
        model=ModelInfo(ckpt.model_type, "+".join(type(r).__name__ for r in plan.recipes.values()),
                        ckpt.config.get("architectures")),
        export=ExportInfo("auto" if cfg.fallback and decoder is None else cfg.exporter, cfg.opset, cfg.dtype,
                          getattr(decoder, "attn_implementation", None), target=cfg.target),
        layout=Layout(kind), graphs=[])
