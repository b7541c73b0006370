"""Triton Inference Server: a model repository for a bundle (`onnxport triton`), and the server
that `onnxport serve` starts on localhost.

For a text-generation bundle the repository holds two Python-backend models running onnxport's
torch-free runtime (serve/triton_model.py): `<name>` with dynamic batching (text in, text and
token ids out) and `<name>_stream`, decoupled, one response per new piece of text; for other
bundles one model per graph (serve/triton_graph.py). The bundle is copied into the first model's
`1/bundle` (hard links where the filesystem allows), sealed as it was. `backend="onnxruntime"`
writes the variant for NVIDIA's containers: each graph file served by Triton's onnxruntime
backend directly.

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
from onnxport.bundle.folder import (
    REPOSITORY_FORMAT,
    REPOSITORY_MARKER,
    atomic_bundle,
    resolve_inside,
)
from onnxport.errors import BundleError, InputError

MODEL_FILE = Path(__file__).with_name("triton_model.py")
GRAPH_FILE = Path(__file__).with_name("triton_graph.py")
BACKENDS = ("python", "onnxruntime")
#: manifest dtypes -> Triton's
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
         "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
         "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _params(params: dict) -> list[str]:
    return [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]


def _text_config(name: str, bundle: str, max_batch_size: int, decoupled: bool, instances: int, threads: int,
                 max_tokens: int, queue_delay_us: int) -> str:
    """config.pbtxt of a text-generation model (Python backend, serve/triton_model.py)."""
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
    lines += _params({"bundle": bundle, "threads": str(threads), "max_tokens": str(max_tokens)})
    return "\n".join(lines) + "\n"


def _batchable(g) -> bool:
    """Every input and output of the graph starts with the same named (dynamic) dim."""
    firsts = {t.dims[0] if t.dims else None for t in [*g.inputs, *g.outputs]}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def _graph_config(name: str, g, max_batch_size: int, instances: int, queue_delay_us: int, backend: str,
                  params: dict) -> str:
    """config.pbtxt of one graph: the Python backend running onnxport's session, or NVIDIA's
    onnxruntime backend on the graph file itself. Named dims are -1; with batching the first
    (batch) dim is Triton's own."""
    batch = max_batch_size if max_batch_size > 0 and _batchable(g) else 0

    def tensors(specs) -> list[str]:
        out = []
        for t in specs:
            if t.dtype not in TYPES:
                raise InputError(f"{g.file}: {t.name} has dtype {t.dtype}, which Triton's config cannot declare",
                                 "serve the bundle with onnxport's own runtime")
            dims = [d if isinstance(d, int) else -1 for d in (t.dims[1:] if batch else t.dims)]
            out.append(f'  {{ name: "{t.name}" data_type: {TYPES[t.dtype]} dims: [ {", ".join(map(str, dims))} ] }}')
        return [",\n".join(out)]

    head = ['backend: "python"'] if backend == "python" else ['platform: "onnxruntime_onnx"',
                                                               f'default_model_filename: "{g.file}"']
    lines = [f'name: "{name}"', *head, f"max_batch_size: {batch}", "input [", *tensors(g.inputs), "]",
             "output [", *tensors(g.outputs), "]", f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]"]
    if batch:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    lines += _params(params)
    return "\n".join(lines) + "\n"


def _link_or_copy(src: Path, dst: Path, names: list[str] | None = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()) if names is None else [resolve_inside(src, n) for n in names]:
        if f.is_symlink() or not f.is_file():
            raise BundleError(f"{f.name} in the bundle is not a plain file", "re-export the bundle")
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _model_name(text: str) -> str:
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in text.removesuffix(".onnx"))
    return name if name[:1].isalpha() else f"m_{name}"


def write_repository(bundle: str | Path, out: str | Path, name: str | None = None, max_batch_size: int = 8,
                     instances: int = 1, threads: int = 0, max_tokens: int = 32, queue_delay_us: int = 2000,
                     backend: str = "python", force: bool = False) -> dict:
    """A Triton model repository at `out` serving `bundle`; returns its record (also written as
    onnxport-triton.json at the repository's root).

    backend "python" (runs here, with the server nvidia-pytriton ships): a text-generation
    bundle gives NAME (batched) and NAME_stream (decoupled), running onnxport's generation loop;
    any other bundle one model per graph (encoders, vision towers, codecs), running onnxport's
    session. backend "onnxruntime" (NVIDIA's containers): one model per graph file, the graph
    served by Triton's onnxruntime backend as it is (a decoder's KV cache then travels as
    ordinary inputs and outputs: the client keeps it)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    for value, flag, least in ((max_batch_size, "--max-batch-size", 0), (instances, "--instances", 1),
                               (threads, "--threads", 0), (max_tokens, "--max-tokens", 1)):
        if value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}", f"pass {flag} {least} or more")
    text = manifest.kv_cache is not None and manifest.pipeline is None and backend == "python"
    graphs = [g for g in manifest.graphs if g.file.endswith(".onnx")] if backend == "onnxruntime" else \
        ([] if text else manifest.named_graphs())
    if not text and not graphs:
        raise InputError(f"{bundle} has no graph onnxport triton can serve with the {backend} backend",
                         "export a causal LM or an encoder with onnxport export")
    if name is not None and not name[:1].isalpha():
        raise InputError(f"model name {name!r} must start with a letter", "pass --name NAME")
    models: dict[str, dict] = {}
    if text:
        name = name or _model_name(manifest.model.model_type)
        models = {name: {"kind": "text-generation", "decoupled": False},
                  f"{name}_stream": {"kind": "text-generation", "decoupled": True}}
    for g in graphs:
        graph_name = g.name or g.file
        model = (f"{name}_" if name and not text else "") + _model_name(graph_name)
        if model in models:
            raise InputError(f"two graphs of {bundle} would both be Triton model {model!r}", "pass another --name")
        models[model] = {"kind": "graph", "graph": graph_name}
    first = next(iter(models))
    record = {"format": REPOSITORY_FORMAT, "bundle": str(bundle.resolve()), "backend": backend,
              "task": manifest.task, "models": models,
              "bundle_path": f"{first}/1/bundle" if backend == "python" else None,
              "max_batch_size": max_batch_size}
    if manifest.pipeline is not None and backend == "python":
        record["not_served"] = f"the {manifest.pipeline.kind} pipeline end to end (its graphs are served one by one)"
    with atomic_bundle(out, force=force, inputs=(bundle,)) as tmp:
        if backend == "python":
            _link_or_copy(bundle, tmp / first / "1" / "bundle")
        for model, spec in models.items():
            version = tmp / model / "1"
            version.mkdir(parents=True, exist_ok=True)
            if spec["kind"] == "text-generation":
                shutil.copy2(MODEL_FILE, version / "model.py")
                config = _text_config(model, record["bundle_path"], max_batch_size, spec["decoupled"], instances,
                                      threads, max_tokens, queue_delay_us)
            else:
                g = next(x for x in manifest.graphs if (x.name or x.file) == spec["graph"])
                if backend == "python":
                    shutil.copy2(GRAPH_FILE, version / "model.py")
                    params = {"bundle": record["bundle_path"], "graph": spec["graph"], "threads": str(threads)}
                else:  # the graph file and its external data, as the graph names them
                    _link_or_copy(bundle, version, sorted({g.file, *g.external_data, *(g.files or {})}))
                    params = {}
                config = _graph_config(model, g, max_batch_size, instances, queue_delay_us, backend, params)
            (tmp / model / "config.pbtxt").write_text(config)
        (tmp / REPOSITORY_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- the server ---------------------------------------------------------------------------------

def model_params(args: dict) -> tuple[Path, dict]:
    """Inside a served model's initialize(args): (its bundle folder, its config parameters); the
    bundle must lie inside the model repository."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    repository = Path(args["model_repository"]).parent
    bundle = (repository / params["bundle"]).resolve()
    if repository.resolve() not in bundle.parents:
        raise BundleError(f"bundle {params['bundle']!r} is outside the model repository", "re-run onnxport triton")
    return bundle, {**params, "_config": config}


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
    import hashlib

    cache = cache or Path(os.environ.get("ONNXPORT_CACHE") or Path.home() / ".cache" / "onnxport")
    # one layer per host environment: its .pth points at that environment's site-packages
    host = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    root = cache / f"triton-env-py{sys.version_info.major}{sys.version_info.minor}-{host}"
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

    def wait_for_signal(self) -> None:
        """Until Ctrl-C (or SIGTERM, which the caller turns into KeyboardInterrupt before it
        starts the server); raises if the server exits on its own."""
        try:
            while self.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return
        if self.process.poll() is not None:
            raise BundleError(f"Triton exited on its own (exit code {self.process.returncode})", f"see {self.log}")

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
