"""The bundle folder on disk: atomic writes, a lock per output, paths kept inside the bundle.

A bundle is built in a hidden temp folder beside OUT and renamed into place only when complete;
a failure, an interrupt or a kill leaves OUT as it was. `--force` replaces only a previous
onnxport bundle (a folder whose manifest.json says so: onnxport's format marker, or the
schema_version + onnxport_task keys of bundles written before it), never any other folder, and
never an input of the command (a bundle quantized into itself, a checkpoint, or a folder holding
one). Two exports to the same OUT at once: the second fails at the lock. Partial folders of
processes that died (kill -9) are removed by the next export to that OUT.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from onnxport.errors import BundleError

MANIFEST = "manifest.json"


def resolve_inside(bundle: Path, name: str, what: str = "the manifest names a file") -> Path:
    """`bundle/name`, refusing any name that is absolute or leaves the bundle (`..`, symlinks
    pointing out), before anything is opened."""
    root = Path(bundle).resolve()
    if not name or Path(name).is_absolute() or "\\" in name:
        raise BundleError(f"{what} outside the bundle: {name!r}",
                          "the bundle is damaged or was edited; re-run onnxport export")
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise BundleError(f"{what} outside the bundle: {name!r}",
                          "the bundle is damaged or was edited; re-run onnxport export")
    return target


def bundle_file(bundle: Path, name: str) -> Path | None:
    """A file the runtime reads from a bundle beside its graphs (tokenizer.json,
    chat_template.jinja, generation_config.json, preprocessor_config.json, ...): its path, or
    None when the bundle has none. One that resolves outside the bundle (a symlink to
    /etc/passwd) is refused before it is opened."""
    path = Path(bundle) / name
    if not path.exists() and not path.is_symlink():
        return None
    target = resolve_inside(bundle, name, f"{name} points to a file")
    record = (_file_records(Path(bundle)) or {}).get(name)
    if record is not None:  # a sealed bundle: the file is the one the export wrote
        from onnxport.bundle.seal import mismatch, refuse

        reason = mismatch(Path(bundle), name, record)
        if reason is not None:
            raise refuse(reason)
    return target


def _file_records(bundle: Path) -> dict | None:
    """The manifest's `files` record of a bundle (cached while manifest.json is unchanged)."""
    import json

    path = bundle / MANIFEST
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _RECORDS:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        files = data.get("files") if isinstance(data, dict) else None
        _RECORDS[key] = files if isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()) else None
    return _RECORDS[key]


_RECORDS: dict[tuple, dict | None] = {}


#: how protobuf serialises an external-data entry's key: field 1 (len 8) "location", then
#: field 2 (the value) with its varint length
_LOCATION_KEY = re.compile(rb"\n\x08location\x12")


def external_locations(onnx_file: Path) -> list[str]:
    """Every external-data `location` an ONNX file names, read from its bytes without parsing
    the graph (no onnx import, constant memory: the file is memory-mapped and scanned)."""
    import mmap

    out = []
    with open(onnx_file, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for hit in _LOCATION_KEY.finditer(m):
                i, n, shift = hit.end(), 0, 0
                while i < len(m) and shift < 35:  # varint length
                    b = m[i]
                    n |= (b & 0x7F) << shift
                    i += 1
                    shift += 7
                    if not b & 0x80:
                        break
                out.append(bytes(m[i:i + n]).decode("utf-8", "replace"))
    return sorted(set(out))


def check_external_data(bundle: Path, graph_file: str) -> None:
    """Refuse a graph whose external data lies outside the bundle (absolute, `..`, symlinks
    out), before ONNX Runtime opens anything."""
    path = resolve_inside(bundle, graph_file)
    base = Path(graph_file).parent
    for loc in external_locations(path):
        try:
            if Path(loc).is_absolute():
                raise BundleError("absolute")
            resolve_inside(bundle, str(base / loc))
        except BundleError:
            raise BundleError(f"{graph_file} reads external data from outside the bundle: {loc!r}",
                              "the bundle is damaged or was edited; re-run onnxport export") from None


#: manifest.json's marker of an onnxport bundle
FORMAT = "onnxport-bundle"


def is_bundle(folder: Path) -> bool:
    """Whether `folder` holds an onnxport bundle's manifest: the format marker, or (bundles
    written before it) both schema_version and onnxport_task; or another folder onnxport wrote
    (MARKERS). Another program's manifest.json (a browser extension's, a web app's) is not one."""
    import json

    path = Path(folder) / MANIFEST
    if not path.is_file():
        return any(_is_marked(Path(folder) / marker, fmt) for marker, fmt in MARKERS.items())
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("format") == FORMAT
                                       or ("schema_version" in data and "onnxport_task" in data))


#: other folders onnxport writes say so in a file, so --force may replace them as it replaces a
#: bundle: a Triton model repository (`onnxport triton`, serve/triton.py) and an NPU calibration
#: set (`onnxport calib`, targets/calib.py)
REPOSITORY_MARKER, REPOSITORY_FORMAT = "onnxport-triton.json", "onnxport-triton-repository"
CALIBRATION_MARKER, CALIBRATION_FORMAT = "calib.json", "onnxport-calibration-set"
MARKERS = {REPOSITORY_MARKER: REPOSITORY_FORMAT, CALIBRATION_MARKER: CALIBRATION_FORMAT}


def _is_marked(path: Path, fmt: str) -> bool:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == fmt


def check_target(out: Path, force: bool, inputs: tuple = ()) -> None:
    """The output folder may be written: it does not exist, or --force and it is an onnxport
    bundle that is none of the command's `inputs` (nor inside one, nor holding one)."""
    for src in inputs:
        src = Path(os.path.abspath(src))
        if out == src or src in out.parents or out in src.parents:
            what = "is" if out == src else "is inside" if src in out.parents else "holds"
            raise BundleError(f"output {str(out)!r} {what} the input {str(src)!r}; onnxport never writes into or "
                              "replaces what it reads", "choose another -o")
    if out.exists() and not out.is_dir():
        raise BundleError(f"output {str(out)!r} exists and is not a folder", "choose another -o")
    if out.exists() and not force:
        raise BundleError(f"output {str(out)!r} already exists", "pass --force to replace it, or choose another -o")
    if out.exists() and not is_bundle(out):
        raise BundleError(f"output {str(out)!r} exists and is not an onnxport bundle; --force replaces only bundles",
                          "choose another -o (onnxport never deletes a folder it did not write)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove `.OUT.partial-<pid>-*` folders left by processes that no longer run."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-", 1)[0])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    import fcntl

    lock_file = out.parent / f".{out.name}.lock"
    fh = open(lock_file, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BundleError(f"another onnxport process is writing {str(out)!r}",
                              "wait for it to finish, or choose another -o") from None
        yield
    finally:
        fh.close()
        with contextlib.suppress(OSError):
            lock_file.unlink()


@contextlib.contextmanager
def atomic_bundle(out: str | Path, force: bool = False, inputs: tuple = ()) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on any error it vanishes.
    `inputs`: the folders the command reads (never written into or replaced)."""
    out = Path(os.path.abspath(out))
    if out.parent == out:
        raise BundleError(f"cannot write a bundle at {str(out)!r}", "choose a new folder for -o")
    check_target(out, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot create {str(out.parent)!r}: {e.strerror}", "choose a writable -o") from None
    with _lock(out):
        check_target(out, force, inputs)  # another process may have finished in the meantime
        _clean_stale(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        except OSError as e:
            raise BundleError(f"cannot write in {str(out.parent)!r}: {e.strerror}", "choose a writable -o") from None
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary folder
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
