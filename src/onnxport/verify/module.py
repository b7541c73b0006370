"""Verify a module graph (encoder, codec, submodule): the rewrites keep the eager numerics, and
ONNX Runtime equals the unpatched PyTorch module (or the part's own reference outputs) at every
size the part declares."""

from __future__ import annotations

from pathlib import Path

import torch

from onnxport.errors import VerificationError
from onnxport.recipes.parts import ModulePart, as_tuple, fmt_sizes
from onnxport.runtime.session import make_session


def part_check(tol, skip_patches: tuple[str, ...] = ()):
    """The `check` export_part calls on each candidate graph: rewrites first, then ORT.
    `tol`: a VerifyConfig."""

    def check(part: ModulePart, onnx_file: Path, applied: list[str], exporter: str, args) -> dict:
        check_rewrites_eager(part, applied, exporter, args, tol.atol, skip_patches)
        return verify_part(part, onnx_file, tol)

    return check


def check_rewrites_eager(part: ModulePart, applied: list[str], exporter: str, args, atol: float,
                         skip_patches: tuple[str, ...] = ()) -> None:
    """Proof 1 at export time: with the rewrites in place the module computes what it computed
    without them. A rewrite that changes numerics is named (each one is tried alone)."""
    from onnxport.patches import all_patches, apply_patches

    if not applied or part.make_case is not None:
        # parts with their own expected outputs are verified against the original model on
        # raw inputs, which is the stronger proof (their module may only run with the rewrites)
        return
    with torch.no_grad():
        ref = as_tuple(part.module(*args))
        with apply_patches(part.module, exporter, skip_patches):
            got = as_tuple(part.module(*args))
    bad = _first_mismatch(ref, got, atol)
    if bad is None:
        return
    culprits = []
    for name in applied:
        patch = all_patches()[name]()
        with torch.no_grad(), patch.patched(part.module):
            alone = as_tuple(part.module(*args))
        if _first_mismatch(ref, alone, atol) is not None:
            culprits.append(name)
    raise VerificationError(
        f"rewrite {', '.join(culprits or applied)} changes {part.name}'s output {part.output_names[bad[0]]} "
        f"by {bad[1]:.3g} (> atol {atol}) in PyTorch itself",
        "report it; export without it with --no-rewrite NAME to see the exporter's own error",
    )


def _first_mismatch(ref, got, atol):
    for k, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            return k, float("inf")
        d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        if not d <= atol:
            return k, d
    return None


def verify_part(part: ModulePart, onnx_file: Path, tol, session=None) -> dict:
    """ONNX Runtime vs the unpatched PyTorch module (or the part's own expected outputs) at every
    size in `part.sizes` with the tolerances of `tol` (a VerifyConfig); raises
    VerificationError naming the output and the sizes. `session`:
    run this session-like object instead of opening `onnx_file` (a chain of cut graphs)."""
    import numpy as np

    from onnxport.verify.compare import compare, describe

    try:
        sess = session if session is not None else make_session(onnx_file)
    except Exception as e:  # noqa: BLE001 - ORT rejects invalid graphs with several types
        raise VerificationError(f"ONNX Runtime cannot load {onnx_file.name}: {str(e).splitlines()[0][:300]}",
                                "the exporter produced an invalid graph; try --exporter torchscript") from e
    names = [i.name for i in sess.get_inputs()]
    rows = []
    for sizes in part.sizes:
        inputs, expected = part.case(sizes)
        if expected is None:
            with torch.no_grad():
                expected = list(as_tuple(part.module(*inputs)))
        feeds = {s.name: t.numpy() for s, t in zip(part.inputs, inputs) if s.name in names}
        try:
            got = sess.run(part.output_names, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime's Fail/InvalidArgument
            raise VerificationError(f"{part.name}: ONNX Runtime failed at {fmt_sizes(sizes)}: {str(e).splitlines()[0][-300:]}",
                                    "a dim was fixed during export; name it in the input spec, or try --exporter torchscript") from e
        for name, a, e in zip(part.output_names, got, expected):
            e = e.detach().float().numpy() if e.is_floating_point() else e.numpy()
            r = compare(np.asarray(a, dtype=e.dtype), e, tol, logits=name == "logits")
            rows.append({"sizes": dict(sizes), "output": name, **r})
            if not r["ok"]:
                raise VerificationError(f"{part.name}: {describe(name, r, tol.min_cosine)} at {fmt_sizes(sizes)}",
                                        "ONNX Runtime disagrees with PyTorch; run with --debug, or try --exporter torchscript")
    return {"ok": True, **tol.record(), "results": rows}


