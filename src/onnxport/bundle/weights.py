"""How a bundle stores its weights: embedded in a graph, in one `<graph>.data` beside it, or in
one file several graphs share. Tensors are read and written one at a time (onnx-ir lazy and
external tensors), so saving never holds all weights. No torch: optimize/ and quantize use it."""

from __future__ import annotations

import os
from pathlib import Path


def save_model(model, out_file: Path, external_threshold: int) -> None:
    """Save an onnx-ir model: weights in one `<name>.data` beside it when they total more than
    `external_threshold` bytes, else embedded. External and lazy tensors are read one at a time
    while saving (their source files must outlive the call), so the weights are never all in
    memory; small graphs embed them (ir.save would otherwise keep pointing at the source)."""
    import onnx_ir as ir

    graph = model.graph
    nbytes = sum((t.const_value.nbytes if t.const_value is not None else 0) for t in graph.initializers.values())
    if nbytes <= external_threshold:
        for init in graph.initializers.values():
            if init.const_value is not None and isinstance(init.const_value, ir.ExternalTensor):
                init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
        ir.save(model, str(out_file))
    else:
        from onnxport import progress

        def written(_tensor, info) -> None:
            progress.update(f"writing {out_file.name}.data", info.index + 1, info.total)

        # two writers: one transposes or casts a tensor while the other writes (bounded bytes in flight)
        ir.save(model, str(out_file), external_data=out_file.name + ".data", callback=written, max_workers=2,
                max_in_flight_bytes=256 << 20)


#: shared weight files align each tensor to this many bytes (page-friendly for memory maps)
SHARED_ALIGN = 4096
#: tensors smaller than this stay inside their graph (scalars, shape constants)
SHARED_MIN_BYTES = 1024


def share_weights(folder: Path, files: list[str], data_name: str = "weights.data") -> dict:
    """Store the weights of several graphs of one bundle once: every initializer of at least
    SHARED_MIN_BYTES goes to `data_name` (deduplicated by dtype, shape and content, so a
    prefill and a decode block, or a tied embedding and lm_head, read the same bytes) and each
    graph points at its offsets. Graphs and their old `<file>.data` are replaced one by one;
    tensors are read and written one at a time. Returns {"tensors", "unique", "bytes"}."""
    import hashlib

    import onnx_ir as ir

    index: dict[tuple, tuple[int, int]] = {}
    tmp_data = folder / (data_name + ".tmp")
    offset = n = 0
    staged = []
    with open(tmp_data, "wb") as f:
        for file in files:
            model = ir.load(str(folder / file))
            for name, init in model.graph.initializers.items():
                t = init.const_value
                if t is None or t.nbytes < SHARED_MIN_BYTES:
                    continue
                data = t.tobytes()
                key = (t.dtype, tuple(t.shape.numpy()), hashlib.sha256(data).digest())
                if key not in index:
                    pad = (-offset) % SHARED_ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                    f.write(data)
                    index[key] = (offset, len(data))
                    offset += len(data)
                at, length = index[key]
                init.const_value = ir.ExternalTensor(data_name, at, length, t.dtype, shape=t.shape, name=name,
                                                     base_dir=str(folder))
                n += 1
            out = folder / (file + ".shared.tmp")
            ir.save(model, str(out))
            staged.append((out, folder / file))
            del model
    os.replace(tmp_data, folder / data_name)
    for out, dst in staged:
        os.replace(out, dst)
        old = dst.with_name(dst.name + ".data")
        if old.exists():
            old.unlink()
    return {"tensors": n, "unique": len(index), "bytes": offset}


def stage_graph(src: Path) -> Path:
    """Where a rewritten graph (converted, fused, quantized) is written before it replaces
    `src`: a folder beside it, under the same file name, so the external-data location it
    records stays right after the move."""
    folder = src.parent / f".{src.name}.staged"
    folder.mkdir(exist_ok=True)
    return folder / src.name


def discard_staged(staged: Path) -> None:
    import shutil

    shutil.rmtree(staged.parent, ignore_errors=True)


def commit_graph(staged: Path, src: Path) -> None:
    """Move the staged graph (and its data file) over `src` (and its data file)."""
    for f in (src, src.with_name(src.name + ".data")):
        f.unlink(missing_ok=True)
    os.replace(staged, src)
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, src.with_name(src.name + ".data"))
    discard_staged(staged)
