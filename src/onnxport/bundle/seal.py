"""Sealed bundles: the files a command reads are the files the manifest recorded (size and sha256,
`record_files`), checked when they are loaded, before any output.

Hashing runs in a thread while ONNX Runtime loads the same graph (`Seal.start()` before the
session, `wait()` after), so it costs little time to first token; a file already checked in
this process (same path, size and modification time) is not hashed again (a split bundle's
graphs share one weights.data). `--trust-bundle` (or ONNXPORT_TRUST_BUNDLE=1) skips the hash
for a large bundle loaded often from a place the user trusts; sizes are still compared.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from onnxport.errors import BundleError

#: (device, inode, size, mtime_ns) -> sha256 of files already hashed (or written and hashed,
#: `remember`) in this process; a rename keeps the key, a write changes it
_HASHED: dict[tuple, str] = {}
_LOCK = threading.Lock()
#: seconds this process spent waiting for hashes after what they overlapped was done (bench/seal.py)
WAITED = {"seconds": 0.0}


def checking() -> bool:
    """Whether bundles are checked at load (False with ONNXPORT_TRUST_BUNDLE=1)."""
    return os.environ.get("ONNXPORT_TRUST_BUNDLE", "") not in ("1", "true", "yes")


def trust_bundles(trust: bool = True) -> None:
    """Skip (or restore) the sha256 check for the rest of this process (`--trust-bundle`)."""
    os.environ["ONNXPORT_TRUST_BUNDLE"] = "1" if trust else ""


def sha256(path: Path) -> str:
    """The file's sha256, from the cache when this process hashed the same file unchanged."""
    key = _key(os.stat(path))
    with _LOCK:
        if key in _HASHED:
            return _HASHED[key]
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        else:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            digest = h.hexdigest()
    with _LOCK:
        _HASHED[key] = digest
    return digest


def _key(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remember(st: os.stat_result, digest: str) -> None:
    """Record the sha256 of a file this process has just written and hashed as it wrote
    (`st`: its stat after the last write), so sealing the bundle does not read it again."""
    with _LOCK:
        _HASHED[_key(st)] = digest


def mismatch(folder: Path, name: str, record: dict) -> str | None:
    """Why the file `name` of the bundle differs from its record (None when it matches)."""
    path = Path(folder) / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if record.get("bytes") is not None and size != record["bytes"]:
        return f"{name} is {size} bytes, the manifest recorded {record['bytes']}"
    want = record.get("sha256")
    if want and checking():
        got = sha256(path)
        if got != want:
            return f"{name} does not match the manifest (sha256 {got[:12]}..., recorded {want[:12]}...)"
    return None


def refuse(reason: str) -> BundleError:
    return BundleError(f"{reason}: the bundle changed since it was written",
                       "re-run onnxport export or restore the file; after an edit you made on purpose, "
                       "`onnxport seal BUNDLE` records the files as they are now")


def reseal(folder: Path):
    """Record the size and sha256 of every file of the bundle as it is now (after an edit made
    on purpose: a chat template added to tokenizer_config.json). The graphs' I/O records are
    not changed: a replaced graph must still match them."""
    from onnxport.bundle.manifest import read_manifest, record_files, write_manifest

    folder = Path(folder)
    trusted = not checking()
    trust_bundles(True)  # read the manifest without checking what is about to be re-recorded
    try:
        manifest = read_manifest(folder, check_sizes=False)
    finally:
        trust_bundles(trusted)
    record_files(folder, manifest)
    write_manifest(folder, manifest)
    return manifest


class Seal:
    """Checks the files `records` names ({name: {"bytes", "sha256"}}) in a thread: `start()`,
    then `wait()` raises BundleError naming the first file that differs."""

    def __init__(self, folder: Path, records: dict | None):
        self.folder, self.records = Path(folder), dict(records or {})
        self.reason: str | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        for name, record in self.records.items():
            reason = mismatch(self.folder, name, record)
            if reason is not None:
                self.reason = reason
                return

    def start(self) -> Seal:
        if self.records:
            self._thread = threading.Thread(target=self._run, name="onnxport-seal", daemon=True)
            self._thread.start()
        return self

    def wait(self) -> None:
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self._thread = None
            with _LOCK:
                WAITED["seconds"] += time.perf_counter() - t0
        if self.reason is not None:
            raise refuse(self.reason)

    def check(self) -> None:
        """Synchronously (small files)."""
        self._run()
        self.wait()
