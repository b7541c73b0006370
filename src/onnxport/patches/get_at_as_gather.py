"""Codebook lookups written with einx `get_at` (vector-quantize-pytorch's ResidualFSQ / GFSQ in
ChatTTS and MiniCPM-o TTS, Xcodec2's original FSQ). einx and einops compute reshape sizes in
Python: torch.export fails on them, and the TorchScript tracer bakes the example's batch and
length into Reshape constants, so the graph breaks on any other input size. Rewrite: the lookup
as `F.embedding` / `torch.gather` per quantizer, with the quantize-dropout mask (-1 codes) and the
per-level scales as in the original; einx `get_at` itself is swapped for the patterns the
library uses (others fail loudly)."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from onnxport.patches import Patch, register_patch


def get_at_as_gather(pattern: str, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    p = pattern.replace(" ", "")
    if p == "q[c]d,bnq->qbnd":
        return torch.stack([F.embedding(indices[..., q], table[q]) for q in range(table.shape[0])])
    if p in ("[c]d,bn->bnd", "[c]d,b...->b...d"):
        return F.embedding(indices, table)
    if p == "bn[c]d,bn->bnd":
        idx = indices[..., None, None].expand(*indices.shape, 1, table.shape[-1])
        return torch.gather(table, 2, idx).squeeze(2)
    raise NotImplementedError(f"get_at pattern {pattern!r} has no gather rewrite; add it to {__name__}")


def residual_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
    """vector_quantize_pytorch ResidualFSQ.get_codes_from_indices without einx/einops:
    indices [b, ..., q] -> codes [q, b, ..., d]."""
    num_q = self.num_quantizers
    if indices.shape[-1] < num_q:
        assert self.quantize_dropout, "fewer code levels than quantizers needs quantize_dropout"
        indices = F.pad(indices, (0, num_q - indices.shape[-1]), value=-1)
    mask = indices == -1
    indices = indices.masked_fill(mask, 0)
    codebooks = self.codebooks
    codes = torch.stack([F.embedding(indices[..., q], codebooks[q]) for q in range(num_q)])
    # explicit permutation: TorchScript exports movedim(-1, 0) as an invalid Transpose(perm=-1)
    last = mask.dim() - 1
    codes = codes.masked_fill(mask.permute(last, *range(last)).unsqueeze(-1), 0.0)
    scales = self.scales.reshape(num_q, *([1] * (codes.dim() - 2)), self.scales.shape[-1])
    return codes * scales


def residual_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
    return self.project_out(residual_codes_from_indices(self, indices).sum(0))


def _residual_fsq_classes(module) -> list[type]:
    return [t for t in {type(m) for m in module.modules()}
            if t.__name__ == "ResidualFSQ" and t.__module__.startswith("vector_quantize_pytorch")]


def _einx_get_at():
    einx = sys.modules.get("einx")
    return getattr(einx, "get_at", None) if einx is not None else None


@register_patch
class GetAtAsGather(Patch):
    name = "get_at_as_gather"
    description = "einx get_at / ResidualFSQ (GFSQ) codebook lookup -> F.embedding / gather per quantizer"
    exporters = ("dynamo", "torchscript")

    def applies(self, module) -> bool:
        from onnxport.patches._scan import globals_bound_to

        get_at = _einx_get_at()
        return bool(_residual_fsq_classes(module)) or (get_at is not None and bool(globals_bound_to(module, get_at)))

    @contextlib.contextmanager
    def patched(self, module=None):
        from onnxport.patches._scan import swap_everywhere

        classes = _residual_fsq_classes(module) if module is not None else []
        saved = [(c, c.get_codes_from_indices, c.get_output_from_indices) for c in classes]
        for c in classes:
            c.get_codes_from_indices = residual_codes_from_indices
            c.get_output_from_indices = residual_output_from_indices
        get_at = _einx_get_at()
        with swap_everywhere(get_at, get_at_as_gather) if get_at is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                for c, codes, output in saved:
                    c.get_codes_from_indices = codes
                    c.get_output_from_indices = output
