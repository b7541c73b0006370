"""How a bundle stores its weights: embedded in a graph, in one `<graph>.data` beside it, or in
one file several graphs share. Tensors are read and written one at a time (onnx-ir lazy and
external tensors), so saving never holds all weights. No torch: optimize/ and quantize use it."""

from __future__ import annotations

import io
import os
from pathlib import Path


#: tensors of at least this many bytes go to the external data file (onnx-ir's own default)
EXTERNAL_MIN_BYTES = 256


def save_model(model, out_file: Path, external_threshold: int) -> None:
    """Save an onnx-ir model: weights in one `<name>.data` beside it when they total more than
    `external_threshold` bytes, else embedded. External and lazy tensors are read one at a time
    while saving (their source files must outlive the call), so the weights are never all in
    memory; small graphs embed them (ir.save would otherwise keep pointing at the source).

    The data file is written here, tensor after tensor, and hashed as it is written (the seal
    records that sha256 without reading the file back: 27 GB for a 7B fp32 model, more than
    the page cache keeps)."""
    import onnx_ir as ir

    graph = model.graph
    nbytes = sum((t.const_value.nbytes if t.const_value is not None else 0) for t in graph.initializers.values())
    if nbytes <= external_threshold:
        for init in graph.initializers.values():
            if init.const_value is not None and isinstance(init.const_value, ir.ExternalTensor):
                init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
        ir.save(model, str(out_file))
        return
    from onnxport import progress
    from onnxport.bundle.seal import remember

    folder, data_name = out_file.parent, out_file.name + ".data"
    tmp = folder / (data_name + ".tmp")  # the old file may be what the tensors read
    big = [v for v in graph.initializers.values()
           if v.const_value is not None and v.const_value.nbytes >= EXTERNAL_MIN_BYTES]
    placed = []
    try:
        with open(tmp, "wb") as f:
            out = HashingWriter(f)
            for i, v in enumerate(big):
                t, at = v.const_value, out.written
                try:
                    t.tofile(out)  # streamed (checkpoint / module readers write in chunks)
                except (AttributeError, io.UnsupportedOperation):
                    # a lazy tensor whose value is a numpy array: ndarray.tofile wants a real file
                    if out.written != at:
                        raise
                    out.write(t.tobytes())
                if out.written - at != t.nbytes:
                    raise OSError(f"{v.name}: wrote {out.written - at} bytes for a tensor of {t.nbytes}")
                placed.append((v, at, t))
                progress.update(f"writing {data_name}", i + 1, len(big))
            digest = out.hexdigest()
        os.replace(tmp, folder / data_name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for v, at, t in placed:
        v.const_value = ir.ExternalTensor(data_name, at, t.nbytes, t.dtype, shape=t.shape, name=v.name,
                                          base_dir=str(folder))
    ir.save(model, str(out_file))
    remember(folder / data_name, digest)


class HashingWriter:
    """A binary file that also computes the sha256 of what goes through it. Hashing runs in a
    thread beside the writes (hashlib and file writes release the GIL), one chunk behind."""

    def __init__(self, file):
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        self.file, self.written = file, 0
        self._hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1)
        self._pending = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._hash.update, view)
        self.file.write(view)
        self.written += len(view)
        return len(view)

    def hexdigest(self) -> str:
        if self._pending is not None:
            self._pending.result()
        self._pool.shutdown()
        return self._hash.hexdigest()


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
