"""How a bundle stores its weights: embedded in a graph, in one `<graph>.data` beside it, or in
one file several graphs share. Tensors are read and written one at a time (onnx-ir lazy and
external tensors), so saving never holds all weights. No torch: optimize/ and quantize use it."""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def save_model(model, out_file: Path, external_threshold: int, early: EarlyWeights | None = None) -> None:
    """Save an onnx-ir model: weights in one `<name>.data` beside it when they total more than
    `external_threshold` bytes, else embedded. External and lazy tensors are read one at a time
    while saving (their source files must outlive the call), so the weights are never all in
    memory; small graphs embed them (ir.save would otherwise keep pointing at the source).
    `early`: the weights already written while the graph was traced, used when they are
    exactly what the graph reads."""
    import onnx_ir as ir

    graph = model.graph
    nbytes = sum((t.const_value.nbytes if t.const_value is not None else 0) for t in graph.initializers.values())
    if nbytes <= external_threshold:
        for init in graph.initializers.values():
            if init.const_value is not None and isinstance(init.const_value, ir.ExternalTensor):
                init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
        ir.save(model, str(out_file))
    elif early is not None and early.adopt(model, out_file):
        return
    else:
        from onnxport import progress

        def written(_tensor, info) -> None:
            progress.update(f"writing {out_file.name}.data", info.index + 1, info.total)

        # two writers: one transposes or casts a tensor while the other writes (bounded bytes in
        # flight); a third thread hashes what they have written, for the bundle's seal
        follower = HashFollower.attach(graph)
        try:
            ir.save(model, str(out_file), external_data=out_file.name + ".data", callback=written, max_workers=2,
                    max_in_flight_bytes=256 << 20)
        except BaseException:
            if follower is not None:
                follower.abandon()
            raise
        finally:
            if follower is not None:
                follower.detach()
        if follower is not None:
            follower.finish()


class HashFollower:
    """Hashes an external data file while onnx-ir's writers fill it: each written tensor reports
    its byte range (a wrapper around the initializer's tensor, removed after the save), and a
    thread hashes the file from its start as far as the written ranges reach, reading the pages
    just written. When the save ends the rest is hashed and the digest recorded for the seal
    (`seal.remember`): sealing the bundle then reads nothing again. On this machine the writers
    wait on the disk (~0.5 GB/s once the page cache's dirty limit is reached) while sha256 runs
    at ~1.8 GB/s, so the hash is done when the writing is (it was 1.1 s per 2 GB after it).
    Not used when any initializer is already an external tensor (a graph re-saved in place:
    onnx-ir must see those to release them)."""

    def __init__(self, path: Path | None = None):
        self.cond = threading.Condition()
        self.ranges: dict[int, int] = {}  # start -> end of written ranges not yet hashed
        self.fd: int | None = os.open(path, os.O_RDONLY) if path is not None else None
        self.closing = self.stop = False
        self.saved: dict = {}
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, name="weights-sha256", daemon=True)

    @classmethod
    def attach(cls, graph) -> HashFollower | None:
        import onnx_ir as ir

        values = [v for v in graph.initializers.values() if v.const_value is not None]
        if any(isinstance(v.const_value, ir.ExternalTensor) for v in values):
            return None
        self = cls()
        for v in values:
            self.saved[v] = v.const_value
            v.const_value = _reported_class()(v.const_value, self)
        self.thread.start()
        return self

    def detach(self) -> None:
        for v, t in self.saved.items():
            v.const_value = t
        self.saved = {}

    def wrote(self, file, start: int, end: int) -> None:
        with self.cond:
            if self.fd is None:  # opened here: onnx-ir renames the file as soon as the writers end
                self.fd = os.open(file.name, os.O_RDONLY)
            if end > start:
                self.ranges[start] = end
            self.cond.notify()

    def abandon(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()
        self.thread.join()

    def finish(self) -> None:
        """Wait for the hash of the whole file and record it for the seal (after a read error
        nothing is recorded: the seal then hashes the file itself)."""
        from onnxport.bundle import seal

        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()
        if "sha256" in self.result:
            seal.remember(self.result["stat"], self.result["sha256"])
        elif "error" in self.result:
            log.debug("hashing while writing failed (%s); the seal hashes the file", self.result["error"])

    def _run(self) -> None:
        import hashlib

        h, pos = hashlib.sha256(), 0
        try:
            while True:
                with self.cond:
                    while not self.stop and not self.closing and pos not in self.ranges:
                        self.cond.wait()
                    if self.stop or self.fd is None:  # abandoned, or nothing written through the wrappers
                        return
                    end = self.ranges.pop(pos, None)
                    closing = self.closing and end is None
                size = os.fstat(self.fd).st_size if closing else end
                while pos < size:
                    chunk = os.pread(self.fd, min(16 << 20, size - pos), pos)
                    if not chunk:
                        raise OSError(f"the file ended at {pos} bytes while being hashed")
                    h.update(chunk)
                    pos += len(chunk)
                if closing:
                    self.result.update(sha256=h.hexdigest(), stat=os.fstat(self.fd))
                    return
        except OSError as e:
            self.result["error"] = e
        finally:
            with self.cond:
                if self.fd is not None:
                    os.close(self.fd)
                    self.fd = None


#: onnx-ir's rule (ir.save's default size_threshold_bytes): larger initializers go to the data file
EXTERNAL_MIN_BYTES = 256

_SWITCH_LOCK = threading.Lock()
_SWITCH = {"users": 0, "saved": 0.005}


def _quick_switches(on: bool, interval: float) -> None:
    """Lower the interpreter's thread switch interval while any writer needs it (counted, so
    two exports in one process leave it as they found it)."""
    import sys

    with _SWITCH_LOCK:
        if on:
            if _SWITCH["users"] == 0:
                _SWITCH["saved"] = sys.getswitchinterval()
                sys.setswitchinterval(min(_SWITCH["saved"], interval))
            _SWITCH["users"] += 1
        else:
            _SWITCH["users"] -= 1
            if _SWITCH["users"] == 0:
                sys.setswitchinterval(_SWITCH["saved"])


class EarlyWeights:
    """A graph's weights written to its data file while the graph is still being traced.

    A stamped decoder binds its initializers to the model's (or the checkpoint's) tensors by
    name, so which tensors its data file will hold, and in what layout, is known before the
    trace: `export.stream.predicted_readers`. Two writer threads write them at offsets fixed
    in advance (each reads, transposes or casts one tensor while the other writes, as onnx-ir's
    save does) and a HashFollower hashes the file behind them, while the main thread traces:
    torch.onnx is Python on one core, the writes are the kernel's and the disk's.

    When the graph is saved, `adopt` checks that the written tensors are exactly those it
    reads (each reader's `key`: the same tensor in the same layout), appends the rest
    (constants) and points every initializer at its offset: the save then writes only the
    graph. A tensor written but not read (a wrong prediction, a stamping that fell back to a
    full trace), or a write error, discards the file and the save writes every weight as
    before: a prediction costs at most the time, never the result. The file is
    `.<data>.early` until adopted, in the bundle's staging folder (removed with it on any
    failure).

    While it writes, the interpreter switches threads every SWITCH_INTERVAL seconds instead of
    every 5 ms: the tracing thread holds the GIL nearly all the time and the writers need it
    briefly between each read and write (qwen2-0.5B, one writer: 7.9 s beside the trace at
    5 ms, 6.8 s at 0.5 ms, 5.1 s alone)."""

    #: seconds between GIL hand-overs while writing (Python's default: 0.005)
    SWITCH_INTERVAL = 0.0005
    WRITERS = 2

    def __init__(self, data_file: Path, readers: list):
        self.final, self.tmp = data_file, data_file.with_name(f".{data_file.name}.early")
        self.readers = readers
        self.at: dict[tuple, tuple[int, int]] = {}  # reader key -> (offset, length), once written
        self.offsets, end = [], 0
        for r in readers:
            self.offsets.append(end)
            end += r.nbytes
        self.end = end
        self.error: BaseException | None = None
        self.why_not: str | None = None
        self.adopted: dict | None = None
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._follower = HashFollower(self.tmp)
        except OSError:
            os.close(self._fd)
            self.tmp.unlink(missing_ok=True)
            raise
        self._follower.thread.start()
        self._next = iter(range(len(readers)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._quick = True
        _quick_switches(True, self.SWITCH_INTERVAL)
        self._threads = [threading.Thread(target=self._run, name=f"early-weights-{i}", daemon=True)
                         for i in range(self.WRITERS)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    i = next(self._next, None)
                if i is None:
                    return
                r, offset = self.readers[i], self.offsets[i]
                out = _At(self._fd, offset)
                r.tofile(out)
                if out.pos - offset != r.nbytes:
                    raise ValueError(f"{r.name}: wrote {out.pos - offset} bytes, expected {r.nbytes}")
                with self._lock:
                    self.at.setdefault(r.key(), (offset, r.nbytes))
                self._follower.wrote(None, offset, out.pos)
        except BaseException as e:  # reported by adopt; the normal save then meets it again
            self.error = e
            self._stop.set()

    def _join(self) -> None:
        for t in self._threads:
            t.join()
        if self._quick:
            self._quick = False
            _quick_switches(False, self.SWITCH_INTERVAL)

    def close(self) -> None:
        """Stop writing and remove the file unless it was adopted (idempotent)."""
        self._stop.set()
        self._join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.adopted is None:
            self._follower.abandon()
        self.tmp.unlink(missing_ok=True)

    def _give_up(self, why: str) -> bool:
        self.why_not = why
        log.info("weights written during the trace not used (%s); writing them now", why)
        self.close()
        return False

    def adopt(self, model, out_file: Path) -> bool:
        """Point `model`'s initializers at the written tensors (appending the others) and save
        the graph: True. False (nothing written, the file removed) when the written tensors
        are not exactly those the graph reads."""
        import onnx_ir as ir

        self._join()
        if self.error is not None:
            return self._give_up(f"{type(self.error).__name__}: {self.error}")
        if out_file.with_name(out_file.name + ".data") != self.final:
            return self._give_up(f"written for {self.final.name}, saving {out_file.name}")
        values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
        keys = {v: _reader_key(v.const_value) for v in values}
        unread = set(self.at) - set(keys.values())
        if unread:
            return self._give_up(f"{len(unread)} written tensors are not read by the graph")
        external = {}
        try:
            tail = _At(self._fd, self.end)
            for v in values:
                t = v.const_value
                if keys[v] in self.at:
                    offset, length = self.at[keys[v]]
                elif t.nbytes > EXTERNAL_MIN_BYTES:
                    offset = tail.pos
                    t.tofile(tail)
                    length = tail.pos - offset
                else:
                    continue
                external[v] = ir.ExternalTensor(self.final.name, offset, length, t.dtype, shape=t.shape, name=v.name,
                                                base_dir=str(out_file.parent))
            self._follower.wrote(None, self.end, tail.pos)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp, self.final)
        except BaseException:
            self.close()
            raise
        self._follower.finish()  # the digest for the seal (the rename keeps the file's identity)
        saved = {v: v.const_value for v in external}
        try:
            for v, t in external.items():
                v.const_value = t
            ir.save(model, str(out_file))
        finally:
            for v, t in saved.items():
                v.const_value = t
        self.adopted = {"tensors": len(self.at), "bytes": self.end}
        log.info("%d weights (%.2f GB) written during the trace", len(self.at), self.end / 1e9)
        return True

    def record(self) -> dict:
        """For the manifest: what was written during the trace, or why the save wrote it."""
        return self.adopted or {"why_not": self.why_not or "the graph was not saved"}


class _At:
    """A file-like `write` at a running offset of a descriptor (os.pwrite): one per tensor, so
    two writers fill one file at once."""

    def __init__(self, fd: int, pos: int):
        self.fd, self.pos = fd, pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.pos + done)
        self.pos += done
        return done


def _reader_key(tensor) -> tuple | None:
    reader = tensor.meta.get("onnxport_reader") if hasattr(tensor, "meta") else None
    return reader.key() if reader is not None and hasattr(reader, "key") else None


@functools.cache
def _reported_class():
    """An onnx-ir LazyTensor that writes the tensor it wraps and reports the bytes' range."""
    import onnx_ir as ir

    class Reported(ir.LazyTensor):
        def __init__(self, inner, follower: HashFollower):
            super().__init__(lambda: inner, dtype=inner.dtype, shape=inner.shape, name=inner.name)
            self.inner, self.follower = inner, follower

        @property
        def nbytes(self) -> int:
            return self.inner.nbytes

        def tofile(self, file) -> None:
            start = file.tell()
            if hasattr(self.inner, "tofile"):
                self.inner.tofile(file)
            else:
                file.write(self.inner.tobytes())
            file.flush()  # the follower reads through its own descriptor
            self.follower.wrote(file, start, file.tell())

    return Reported


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
