"""A real Triton Inference Server (the one nvidia-pytriton ships) serving an onnxport bundle from
the repository `onnxport triton` writes (serve/triton.py): HTTP, gRPC, the HTTP generate
extension and gRPC token streaming give `onnxport generate`'s tokens; 16 concurrent clients get
theirs with no error while dynamic batching merges their requests; bad input is one error for
that request and the server stays up; the server stops cleanly. Skipped with the reason when
nvidia-pytriton or tritonclient is not installed (.ci/run installs both)."""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import urllib.request

import numpy as np
import pytest
from conftest import DEMO_DIR
from typer.testing import CliRunner

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'tritonclient[http,grpc]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
if importlib.util.find_spec("pytriton") is None:
    pytest.skip("nvidia-pytriton (Triton's server binary) is not installed: pip install --no-deps nvidia-pytriton==0.7.0",
                allow_module_level=True)

PROMPTS = ["def fib(n):", "The os module"]
NEW = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, expected token rows per prompt) for the trained demo model."""
    from onnxport.api import export
    from onnxport.config import ExportConfig
    from onnxport.runtime import Generator
    from onnxport.serve.triton import start_server, write_repository

    root = tmp_path_factory.mktemp("triton")
    export(DEMO_DIR, root / "demo", ExportConfig())
    write_repository(root / "demo", root / "repo", max_batch_size=8)
    gen = Generator(root / "demo")
    expected = {p: gen.generate([p], max_new_tokens=NEW).tokens[0] for p in PROMPTS}
    server = start_server(root / "repo", root)
    yield server, expected, gen.tokenizer, root
    assert server.stop() == 0  # drained and exited on SIGTERM


@pytest.fixture(scope="module")
def batched_tokens(served):
    """prompt -> the token rows onnxport gives it alone and left-padded in a batch with the
    other prompt (a batch Triton forms may hold both)."""
    from onnxport.runtime import Generator

    _, expected, _, root = served
    together = Generator(root / "demo").generate(PROMPTS, max_new_tokens=NEW).tokens
    return {p: {tuple(expected[p]), tuple(t)} for p, t in zip(PROMPTS, together)}


def _http_infer(url, texts, new=NEW, model="llama"):
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    try:
        a = th.InferInput("TEXT_INPUT", [len(texts), 1], "BYTES")
        a.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
        b = th.InferInput("MAX_TOKENS", [len(texts), 1], "INT32")
        b.set_data_from_numpy(np.full((len(texts), 1), new, dtype=np.int32))
        r = client.infer(model, [a, b])
        return [t[0].decode() for t in r.as_numpy("TEXT_OUTPUT")], [[int(x) for x in row if x >= 0]
                                                                    for row in r.as_numpy("TOKEN_IDS")]
    finally:
        client.close()


def test_http_and_grpc_give_onnxport_generate_tokens(served):
    import tritonclient.grpc as tg

    server, expected, tok, _ = served
    for p in PROMPTS:
        texts, ids = _http_infer(server.http_url, [p])
        assert ids == [expected[p]] and texts == [tok.decode(expected[p])]
    texts, ids = _http_infer(server.http_url, PROMPTS)  # one request, two rows
    assert ids == [expected[p] for p in PROMPTS]
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        a = tg.InferInput("TEXT_INPUT", [1, 1], "BYTES")
        a.set_data_from_numpy(np.array([[PROMPTS[0].encode()]], dtype=np.object_))
        r = client.infer("llama", [a])  # no MAX_TOKENS: the repository's default (32)
        got = [int(x) for x in r.as_numpy("TOKEN_IDS")[0]]
        assert got[:NEW] == expected[PROMPTS[0]] and len(got) == 32
    finally:
        client.close()


def test_http_generate_extension_and_grpc_streaming(served):
    import tritonclient.grpc as tg

    server, expected, tok, _ = served
    body = json.dumps({"TEXT_INPUT": PROMPTS[1], "MAX_TOKENS": NEW}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://{server.http_url}/v2/models/llama/generate",
                                                       data=body), timeout=60) as r:
        reply = json.loads(r.read())
    assert reply["TOKEN_IDS"] == expected[PROMPTS[1]]

    results: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        a = tg.InferInput("TEXT_INPUT", [1], "BYTES")
        a.set_data_from_numpy(np.array([PROMPTS[0].encode()], dtype=np.object_))
        b = tg.InferInput("MAX_TOKENS", [1], "INT32")
        b.set_data_from_numpy(np.array([NEW], dtype=np.int32))
        client.async_stream_infer("llama_stream", [a, b], enable_empty_final_response=True)
        pieces, ids = [], []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            if result.as_numpy("TOKEN_IDS") is not None:
                ids.append(int(result.as_numpy("TOKEN_IDS")[0]))
                pieces.append(result.as_numpy("TEXT_OUTPUT")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    finally:
        client.close()
    assert ids == expected[PROMPTS[0]] and len(ids) == NEW  # one response per token
    assert "".join(pieces) == tok.decode(expected[PROMPTS[0]])


def test_sixteen_concurrent_clients_no_error_and_batched(served, batched_tokens):
    """Each client's reply is its prompt's tokens as onnxport generates them alone or in a
    left-padded batch with the other prompt (what a batch Triton forms is; the two agree unless
    padding moves a near-tie). The model's statistics show the merging."""
    server, _, _, _ = served
    allowed = batched_tokens
    errors, wrong = [], []

    def client(i):
        try:
            p = PROMPTS[i % 2]
            for _ in range(2):
                got = _http_infer(server.http_url, [p])[1][0]
                if tuple(got) not in allowed[p]:
                    wrong.append((i, got))
        except Exception as e:  # noqa: BLE001 - counted
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not wrong, (errors[:2], wrong)
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/llama/stats", timeout=30) as r:
        stats = json.loads(r.read())["model_stats"][0]
    assert stats["inference_count"] >= 32 and stats["execution_count"] < stats["inference_count"], stats


def test_bad_request_is_one_error_and_the_server_stays_up(served):
    from tritonclient.utils import InferenceServerException

    server, expected, _, _ = served
    with pytest.raises(InferenceServerException, match="TEXT_INPUT is empty"):
        _http_infer(server.http_url, [""])
    with pytest.raises(InferenceServerException, match="MAX_TOKENS must be >= 1"):
        _http_infer(server.http_url, [PROMPTS[0]], new=0)
    assert server.ready()
    assert _http_infer(server.http_url, [PROMPTS[0]])[1] == [expected[PROMPTS[0]]]


def test_triton_command_refuses_what_it_cannot_serve(served, exported_encoder, tmp_path):
    from onnxport.cli import app

    _, _, _, root = served
    encoder, _ = exported_encoder("siglip")
    for args, needle in [
        ([str(encoder), "-o", str(tmp_path / "r1"), "--backend", "tensorrt"], "unknown backend 'tensorrt'"),
        ([str(root / "demo"), "-o", str(root / "repo")], "already exists"),
        ([str(root / "demo"), "-o", str(tmp_path / "r2"), "--max-batch-size", "-1"], "--max-batch-size must be >= 0"),
    ]:
        res = CliRunner().invoke(app, ["triton", *args])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (args, res.output)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    res = CliRunner().invoke(app, ["triton", str(root / "demo"), "-o", str(other), "--force"])
    assert res.exit_code == 2 and (other / "notes.txt").read_text() == "keep"
    for extra in ([], ["--force", "--name", "demo"]):  # a repository onnxport wrote may be replaced
        res = CliRunner().invoke(app, ["triton", str(root / "demo"), "-o", str(tmp_path / "r3"), *extra])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "r3" / "demo_stream" / "config.pbtxt").is_file() and not (tmp_path / "r3" / "llama").exists()


def test_an_encoder_bundle_is_served_one_model_per_graph(exported_encoder, tmp_path):
    """A vision tower (siglip): its graph as a Python-backend model with dynamic batching; the
    server's outputs equal onnxport's own session's, for a request of 2 rows and one of 1."""
    import tritonclient.http as th

    from onnxport.bundle import read_manifest
    from onnxport.runtime.session import GraphSession
    from onnxport.serve.triton import start_server, write_repository

    bundle, _ = exported_encoder("siglip")
    record = write_repository(bundle, tmp_path / "repo", max_batch_size=4)
    (model, spec), = record["models"].items()
    entry = next(g for g in read_manifest(bundle).graphs if (g.name or g.file) == spec["graph"])
    local = GraphSession(bundle, entry)
    name = entry.inputs[0].name
    server = start_server(tmp_path / "repo", tmp_path)
    try:
        client = th.InferenceServerClient(server.http_url)
        for rows in (2, 1):
            x = np.random.default_rng(rows).standard_normal((rows, 3, 32, 32)).astype(np.float32)
            a = th.InferInput(name, list(x.shape), "FP32")
            a.set_data_from_numpy(x)
            r = client.infer(model, [a])
            want = local.run({name: x})
            for out in entry.output_names:
                np.testing.assert_allclose(r.as_numpy(out), want[out], rtol=1e-5, atol=1e-5)
        client.close()
    finally:
        assert server.stop() == 0


def test_onnxruntime_backend_variant_is_a_valid_model_config(served, exported_encoder, tmp_path):
    """For NVIDIA's containers (no onnxruntime backend installs here to run it): each graph a
    model on platform onnxruntime_onnx, its file and external data beside it, inputs / outputs
    and dims from the manifest; every config.pbtxt parses as Triton's ModelConfig."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from onnxport.bundle import read_manifest
    from onnxport.serve.triton import write_repository

    _, _, _, root = served
    encoder, _ = exported_encoder("siglip")
    for bundle in (root / "demo", encoder):
        out = tmp_path / bundle.name
        record = write_repository(bundle, out, backend="onnxruntime")
        manifest = read_manifest(bundle)
        assert len(record["models"]) == len([g for g in manifest.graphs if g.file.endswith(".onnx")])
        for model, spec in record["models"].items():
            cfg = text_format.Parse((out / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            g = next(x for x in manifest.graphs if (x.name or x.file) == spec["graph"])
            assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == g.file
            assert [i.name for i in cfg.input] == [t.name for t in g.inputs]
            assert [o.name for o in cfg.output] == g.output_names
            assert (out / model / "1" / g.file).is_file()
            assert all((out / model / "1" / f).is_file() for f in g.external_data)
            dims = list(cfg.input[0].dims)
            spec_dims = g.inputs[0].dims[1:] if cfg.max_batch_size else g.inputs[0].dims
            assert dims == [d if isinstance(d, int) else -1 for d in spec_dims]


def test_serve_command_answers_and_stops_on_sigterm(served):
    """`onnxport serve` as a user runs it: the endpoints it prints answer, SIGTERM stops the
    server and its stubs, exit code 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from onnxport.serve.triton import free_port

    _, expected, _, root = served
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "onnxport.cli", "serve", str(root / "demo"), "--http-port", str(port),
                             "--grpc-port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # the line a user sees once the server is up
            if line.startswith("serving "):
                break
        deadline = time.monotonic() + 120
        reply = None
        while time.monotonic() < deadline and proc.poll() is None and reply is None:
            try:
                body = json.dumps({"TEXT_INPUT": PROMPTS[0], "MAX_TOKENS": NEW}).encode()
                with urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{port}/v2/models/llama/generate", data=body), timeout=30) as r:
                    reply = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert reply is not None and reply["TOKEN_IDS"] == expected[PROMPTS[0]]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped (server exit code 0)" in out, out
        # SIGTERM while it starts: the server it was starting is stopped too (exit 130, as Ctrl-C)
        early = subprocess.Popen([sys.executable, "-m", "onnxport.cli", "serve", str(root / "demo"), "--http-port",
                                  str(free_port()), "--grpc-port", str(free_port())], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        time.sleep(3)
        early.send_signal(signal.SIGTERM)
        out, _ = early.communicate(timeout=60)
        assert early.returncode in (0, 130), out
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", "model-repository=.*onnxport-serve-"], capture_output=True,
                              text=True).stdout.split()
        assert not left, left  # no Triton server of `onnxport serve` survives it
    finally:
        for p in (proc, locals().get("early")):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)  # its own cleanup stops the server it started
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
