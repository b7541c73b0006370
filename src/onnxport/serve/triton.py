"""Triton Inference Server: a model repository for a decoder bundle (`onnxport triton`), and the
server that `onnxport serve` starts on localhost.

The repository holds two Python-backend models running onnxport's torch-free runtime
(serve/triton_model.py): `<name>` with dynamic batching (text in, text and token ids out) and
`<name>_stream`, decoupled, one response per new piece of text. The bundle is copied into
`<name>/1/bundle` (hard links where the filesystem allows), sealed as it was.

The server is the one `nvidia-pytriton` ships (Triton 2.51 with the Python backend only; no
onnxruntime backend is on any package registry). Its Python-backend stub links the system
libpython, so it runs with LD_LIBRARY_PATH set to this interpreter's own lib folder; it is built against
numpy 1, so where this environment has numpy 2 it runs in a thin layer over it with numpy < 2
(`serving_env`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from onnxport.bundle import read_manifest
from onnxport.bundle.folder import REPOSITORY_FORMAT, REPOSITORY_MARKER, atomic_bundle
from onnxport.errors import BundleError, InputError

MODEL_FILE = Path(__file__).with_name("triton_model.py")


def _config(name: str, bundle: str, max_batch_size: int, decoupled: bool, instances: int, threads: int,
            max_tokens: int, queue_delay_us: int) -> str:
    """config.pbtxt of one Python-backend model."""
    params = {"bundle": bundle, "threads": str(threads), "max_tokens": str(max_tokens)}
    # without batching the rows dim is explicit, so clients send [rows, 1] either way
    rows = "" if decoupled or max_batch_size > 0 else "-1, "
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {0 if decoupled else max_batch_size}",
             'input [', f'  {{ name: "TEXT_INPUT" data_type: TYPE_STRING dims: [ {rows}1 ] }},',
             f'  {{ name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ {rows}1 ] optional: true }}', ']',
             'output [', f'  {{ name: "TEXT_OUTPUT" data_type: TYPE_STRING dims: [ {rows}1 ] }},',
             f'  {{ name: "TOKEN_IDS" data_type: TYPE_INT64 dims: [ {rows}-1 ] }}', ']',
             f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]"]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    elif max_batch_size > 0:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    for k, v in params.items():
        lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file():
            raise BundleError(f"{f.name} in the bundle is not a plain file", "re-export the bundle")
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def write_repository(bundle: str | Path, out: str | Path, name: str | None = None, max_batch_size: int = 8,
                     instances: int = 1, threads: int = 0, max_tokens: int = 32, queue_delay_us: int = 2000,
                     force: bool = False) -> dict:
    """A Triton model repository at `out` serving `bundle`; returns its record (also written as
    onnxport-triton.json at the repository's root)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if manifest.kv_cache is None or manifest.pipeline is not None:
        what = f"a {manifest.pipeline.kind} pipeline" if manifest.pipeline is not None else "not a text decoder"
        raise InputError(f"{bundle} is {what}; onnxport triton serves text-generation bundles so far",
                         "export a causal LM (onnxport export CKPT -o OUT) and serve that")
    name = name or "".join(c if c.isalnum() or c in "_-" else "_" for c in manifest.model.model_type) or "model"
    if not name[0].isalpha():
        raise InputError(f"model name {name!r} must start with a letter", "pass --name NAME")
    for value, flag, least in ((max_batch_size, "--max-batch-size", 0), (instances, "--instances", 1),
                               (threads, "--threads", 0), (max_tokens, "--max-tokens", 1)):
        if value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}", f"pass {flag} {least} or more")
    models = {name: False, f"{name}_stream": True}
    record = {"format": REPOSITORY_FORMAT, "bundle": str(bundle.resolve()), "task": "text-generation",
              "models": {m: {"decoupled": d} for m, d in models.items()}, "bundle_path": f"{name}/1/bundle",
              "max_batch_size": max_batch_size}
    with atomic_bundle(out, force=force, inputs=(bundle,)) as tmp:
        _link_or_copy(bundle, tmp / name / "1" / "bundle")
        for model, decoupled in models.items():
            (tmp / model / "1").mkdir(parents=True, exist_ok=True)
            shutil.copy2(MODEL_FILE, tmp / model / "1" / "model.py")
            (tmp / model / "config.pbtxt").write_text(_config(model, record["bundle_path"], max_batch_size, decoupled,
                                                              instances, threads, max_tokens, queue_delay_us))
        (tmp / REPOSITORY_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- the server ---------------------------------------------------------------------------------

def _pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("serving needs Triton's server binary from nvidia-pytriton",
                         "pip install --no-deps nvidia-pytriton==0.7.0 'tritonclient[http,grpc]'")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise InputError(f"no tritonserver binary under {root}", "reinstall nvidia-pytriton")
    return root


def backend_folder(work: Path) -> Path:
    """The Python backend with the stub built for this interpreter's version (pytriton ships one
    per Python version beside the backend)."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise InputError(f"nvidia-pytriton has no Python-backend stub for Python {version}",
                         "serve from Python 3.8 - 3.13")
    dst = work / "backends" / "python"
    dst.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    shutil.copy2(stub, dst / stub.name)
    return work / "backends"


def serving_env(cache: Path | None = None) -> Path | None:
    """The bin folder of a venv layered over this interpreter's environment with numpy < 2, for
    Triton's Python-backend stub (built against numpy 1: under numpy 2 it reads every input tensor
    wrongly and aborts); None when this environment already has numpy < 2. The stub finds its
    Python through PATH; the layer holds only numpy and a .pth that adds this environment's
    site-packages after it. Made once (numpy from the package registry) and cached."""
    import site

    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    cache = cache or Path(os.environ.get("ONNXPORT_CACHE") or Path.home() / ".cache" / "onnxport")
    root = cache / f"triton-env-py{sys.version_info.major}{sys.version_info.minor}"
    if (root / ".ready").is_file():
        return root / "bin"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".partial-", dir=cache))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True, capture_output=True)
        lib = tmp / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(lib),
                              "numpy>=1.21,<2"], capture_output=True, text=True)
        if not (lib / "numpy").is_dir():
            raise InputError("could not install numpy < 2 for Triton's Python backend: "
                             + (res.stderr.strip().splitlines() or ["pip failed"])[-1][:200],
                             "check access to the package registry, or serve from an environment with numpy < 2")
        dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
        (lib / "zz-onnxport-host.pth").write_text("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs)
                                                 + "\n")
        (tmp / ".ready").write_text(json.dumps({"host": sys.prefix, "site": dirs}) + "\n")
        # the venv's python links point at this interpreter's base; the folder moves in one step
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (Triton drains in-flight requests and stops its model stubs), then SIGKILL to
        the server's whole process group after `timeout` or if a stub outlived it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stubs left behind by a crashed server
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        return self.process.returncode


def start_server(repository: str | Path, work: str | Path | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, timeout: float = 120) -> Server:
    """Start Triton on localhost serving `repository`; returns once every model is ready (or
    raises with the log's last lines). A new scratch folder (in `work`, else the system's temp
    folder) holds the backend and the log."""
    work = Path(tempfile.mkdtemp(prefix="triton-", dir=Path(work).resolve() if work else None))
    backends = backend_folder(work)
    http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    # the interpreter's own libpython first; then the libraries pytriton's wheel vendors, which
    # the copied backend and stub find through a relative rpath no longer true of the copies
    vendored = _pytriton_root().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(vendored), env.get("LD_LIBRARY_PATH", "")) if p)
    layer = serving_env()
    if layer is not None:  # the stub's Python is the first python3 on PATH
        env["PATH"] = os.pathsep.join([str(layer), env.get("PATH", "")])
    log = work / "tritonserver.log"
    cmd = [str(_pytriton_root() / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
           f"--backend-directory={backends}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
           "--allow-metrics=false", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--exit-on-error=true",
           "--exit-timeout-secs=10", "--log-verbose=0"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work,
                                   start_new_session=True)  # its own process group, stubs included
    server = Server(process, http_port, grpc_port, log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if server.ready():
                return server
            time.sleep(0.5)
    except BaseException:  # Ctrl-C while it starts: no server left behind
        server.stop(5)
        raise
    server.stop(5)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
    raise BundleError("Triton did not become ready: " + (" | ".join(tail)[-400:] or "no output"),
                      f"see {log}")
