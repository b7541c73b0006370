"""Run a graph whose weights do not fit in memory, one segment at a time.

A graph's nodes are stored in topological order, so cutting the node list anywhere gives
segments that read only graph inputs and values of earlier segments. `plan_segments` cuts it
where a segment's weights would pass a byte budget (about one decoder layer per GiB in fp32);
`SegmentedRunner` builds each segment as its own model (from the graph's structure, its
initializers still pointing at the bundle's external data), opens one ONNX Runtime session for
it, runs every feed through it, keeps the values later segments need and drops the rest.
Memory is one segment's weights plus the live values, whatever the size of the graph; the
results are the whole graph's (the same nodes run on the same values).

Used by verification and the fp16 guard for graphs past the budget; onnxruntime + numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxport.progress import update as report

log = logging.getLogger(__name__)

#: default weight bytes per segment: one fp32 layer of a 7B model is ~0.8 GB
SEGMENT_BYTES = 1 << 30
#: a graph whose model is in memory anyway runs as one session while its weights take at most
#: this share of the available memory (segment_budget)
WHOLE_SHARE = 0.25


def available_memory() -> int | None:
    """Bytes the kernel can hand out without swapping (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def segment_budget(configured: int, bounded: bool) -> int:
    """The weight bytes a verification runs ONNX Runtime on at once. Bounded (`--low-memory`:
    the reference streams its weights too) keeps `configured`. Otherwise the PyTorch model is
    in memory already, and one session is both faster and lighter than segments, which read
    their weights into owned memory and keep the values between them (qwen2-0.5B, 1.98 GB:
    verification 4.3 / 4.7 s and 5.03 GB peak in one session against 6.5 / 7.5 s and 5.94 GB
    in three segments): segments start past WHOLE_SHARE of the available memory."""
    if bounded:
        return configured
    available = available_memory()
    return max(configured, int(available * WHOLE_SHARE)) if available else configured


@dataclass
class Segment:
    start: int  # node index range [start, stop)
    stop: int
    weight_bytes: int
    #: values read from graph inputs or earlier segments
    inputs: list[str]
    #: values this segment makes that later segments or the graph's outputs read
    outputs: list[str]


def tensor_bytes(t) -> int:
    """Bytes of an initializer TensorProto, external or embedded, without reading it."""
    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * 4


def _reads(node) -> list[str]:
    """Values a node reads, including outer-scope values its subgraphs (If / Loop) read."""
    names = [n for n in node.input if n]
    for a in node.attribute:
        for g in [a.g] if a.HasField("g") else list(a.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
            names += [n for sub in g.node for n in _reads(sub) if n not in inner]
    return names


def _budget_bytes(t) -> int:
    """What a weight costs in a session: ORT's CPU kernels compute fp16 / bf16 in fp32, so it
    casts (and keeps) a float32 copy of each such weight: count them twice."""
    import onnx

    n = tensor_bytes(t)
    return 2 * n if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) else n


def weight_bytes(structure) -> int:
    return sum(tensor_bytes(t) for t in structure.graph.initializer)


def plan_segments(structure, budget: int = SEGMENT_BYTES, outputs: Iterable[str] | None = None) -> list[Segment]:
    """Cut the node list of `structure` (a ModelProto, weights not loaded) into consecutive
    segments of at most `budget` weight bytes each (fp16 / bf16 weights count twice: ORT
    computes them in fp32; a single node reading more gets a segment of its own). `outputs`: the values callers want back (default: the graph's outputs)."""
    graph = structure.graph
    sizes = {t.name: _budget_bytes(t) for t in graph.initializer}
    cuts, start, acc, seen = [], 0, 0, set()
    for i, node in enumerate(graph.node):
        new = {n for n in _reads(node) if n in sizes and n not in seen}
        add = sum(sizes[n] for n in new)
        if i > start and acc + add > budget:
            cuts.append((start, i, acc))
            start, acc, seen = i, 0, set()
            new = {n for n in _reads(node) if n in sizes}
            add = sum(sizes[n] for n in new)
        seen |= new
        acc += add
    cuts.append((start, len(graph.node), acc))
    wanted = set(outputs) if outputs is not None else {o.name for o in graph.output}
    produced_in = {}
    for k, (a, b, _) in enumerate(cuts):
        for node in graph.node[a:b]:
            for o in node.output:
                if o:
                    produced_in[o] = k
    segments = []
    needed_later: list[set[str]] = [set() for _ in cuts]
    reads_of = []
    for k, (a, b, _) in enumerate(cuts):
        reads = {n for node in graph.node[a:b] for n in _reads(node) if n not in sizes}
        reads_of.append(reads)
        for n in reads:
            src = produced_in.get(n)
            if src is not None and src < k:
                needed_later[src].add(n)
    for n in wanted:
        if n in produced_in:
            needed_later[produced_in[n]].add(n)
    for k, (a, b, nbytes) in enumerate(cuts):
        inputs = sorted(n for n in reads_of[k] if produced_in.get(n, -1) != k)
        segments.append(Segment(a, b, nbytes, inputs, sorted(needed_later[k])))
    return segments


class SegmentedRunner:
    """Runs the graph at `path` in segments of at most `budget` weight bytes.

    `run(names, feeds_list)` returns {name: array} per feed; every segment session is opened
    once and runs all feeds. `on_values(feed_index, {name: array})`, when given, receives every
    value a segment computes (the fp16 guard reads ranges from them) before unneeded ones are
    dropped."""

    def __init__(self, path: Path, budget: int = SEGMENT_BYTES, threads: int | None = None, structure=None,
                 optimize: bool = True):
        import onnx

        self.path = Path(path)
        self.budget = budget
        self.threads = threads
        self.optimize = optimize
        self.structure = structure if structure is not None else onnx.load(str(path), load_external_data=False)

    def _model(self, seg: Segment, dtypes: dict, outputs: list[str]):
        import onnx
        from onnx import helper

        g = self.structure.graph
        nodes = g.node[seg.start:seg.stop]
        read = {n for node in nodes for n in _reads(node)}
        inits = [t for t in g.initializer if t.name in read]
        graph = onnx.GraphProto(name=f"{g.name}_segment_{seg.start}")
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        for n in seg.inputs:
            graph.input.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(dtypes[n]), None))
        graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
        m = onnx.ModelProto()
        m.ir_version = self.structure.ir_version
        m.opset_import.extend(self.structure.opset_import)
        m.functions.extend(self.structure.functions)
        m.graph.CopyFrom(graph)
        return m

    def _weights(self, model, observe=None) -> tuple[list[str], list]:
        """The segment's external initializers read into memory we own (ONNX Runtime would
        otherwise memory-map the data file, and every page a segment touched would count in
        the process's resident set while the map lives). Types numpy has no dtype for stay
        with ORT's own loading. `observe(name, array)` sees every initializer."""
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        names, values = [], []
        for t in model.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if "location" not in info:
                if observe is not None:
                    observe(t.name, numpy_helper.to_array(t))
                continue
            if t.data_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.STRING):
                continue
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
            except (KeyError, TypeError, ValueError):
                continue
            path = self.path.parent / info["location"]
            count = int(info.get("length", 0)) // dtype.itemsize if "length" in info else -1
            arr = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0))).reshape(tuple(t.dims))
            if observe is not None:
                observe(t.name, arr)
            names.append(t.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(arr))
        return names, values

    def _session(self, model, observe=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        names, values = self._weights(model, observe)
        if names:
            so.add_external_initializers(names, values)
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        # one session after another: do not let the finished one's workers spin
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # each segment runs a few times: prepacking MatMul weights would only add a copy of them
        so.add_session_config_entry("session.disable_prepacking", "1")
        # relative external-data locations resolve against the graph's own folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess._onnxport_weights = values  # the session reads them; they live as long as it
        return sess

    def run(self, names: list[str], feeds_list: list[dict[str, np.ndarray]],
            observe: Callable[[str, np.ndarray], None] | None = None) -> list[dict[str, np.ndarray]]:
        """{name: array} per feed for `names`. `observe(name, array)`, when given, sees every
        feed, every initializer and every value the graph computes, for every feed (the fp16
        guard reads value ranges from them); ORT's graph optimizations are then off, so the
        values are those of the graph as written."""
        segments = plan_segments(self.structure, self.budget, names)
        envs = [dict(f) for f in feeds_list]
        last_use = {}
        for k, seg in enumerate(segments):
            for n in seg.inputs:
                last_use[n] = k
        keep = set(names)
        g = self.structure.graph
        if observe is not None:
            for env in envs:
                for n, a in env.items():
                    observe(n, a)
        log.info("%s: %d segments (budget %.2f GB)", self.path.name, len(segments), self.budget / 1e9)
        for k, seg in enumerate(segments):
            outputs = list(seg.outputs)
            if observe is not None:
                outputs += [o for node in g.node[seg.start:seg.stop] for o in node.output
                            if o and o not in set(seg.outputs)]
            if not outputs:
                continue
            dtypes = {n: envs[0][n].dtype for n in seg.inputs}
            sess = self._session(self._model(seg, dtypes, outputs), observe)
            for env in envs:
                got = dict(zip(outputs, sess.run(outputs, {n: env[n] for n in seg.inputs})))
                if observe is not None:
                    for n, a in got.items():
                        observe(n, a)
                env.update({n: got[n] for n in seg.outputs})
                for n in list(env):
                    if n not in keep and last_use.get(n, -1) <= k:
                        del env[n]
            del sess
            report(f"running {self.path.name} in segments", k + 1, len(segments))
        return [{n: env[n] for n in names} for env in envs]


def run_feeds(path: Path, names: list[str], feeds_list: list[dict[str, np.ndarray]], budget: int = SEGMENT_BYTES,
              threads: int | None = None, observe: Callable[[str, np.ndarray], None] | None = None
              ) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Run the graph at `path` on every feed: one session when its weights fit in `budget`
    bytes, else segment by segment. Returns the outputs per feed and how it ran. With
    `observe` (see SegmentedRunner.run) every value is exposed, optimizations off."""
    import onnx

    from onnxport.runtime.session import make_session

    structure = onnx.load(str(path), load_external_data=False)
    total = weight_bytes(structure)
    if total <= budget and observe is None:
        del structure
        sess = make_session(Path(path), threads)
        return [dict(zip(names, sess.run(names, f))) for f in feeds_list], {"mode": "one session",
                                                                             "weight_bytes": total}
    runner = SegmentedRunner(path, budget, threads, structure, optimize=observe is None)
    n = len(plan_segments(structure, budget, names))
    how = {"mode": "segments" if n > 1 else "one session", "weight_bytes": total}
    if n > 1:
        how.update(segments=n, segment_budget_bytes=budget)
    if observe is not None:
        how["values_observed"] = True
    return runner.run(names, feeds_list, observe), how


class ChainSession:
    """A graph cut into consecutive graphs (manifest `graphs[].chain`, optimize/partition.py)
    run as one: a session-like runner of the chain (`run(names, feeds)`, `get_inputs()` names): each part's
    ONNX Runtime session in turn, values handed over by name."""

    def __init__(self, folder: Path, chain: list[dict], inputs: list[str], threads: int | None = None):
        from onnxport.bundle import check_external_data, resolve_inside
        from onnxport.runtime.session import make_session

        self.inputs = inputs
        self.parts = []
        for c in chain:
            check_external_data(Path(folder), c["file"])  # paths stay inside the bundle
            self.parts.append((make_session(resolve_inside(Path(folder), c["file"]), threads), c))

    def get_inputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self.inputs]

    def run(self, names, feeds: dict):
        env = dict(feeds)
        for sess, c in self.parts:
            env.update(zip(c["outputs"], sess.run(c["outputs"], {n: env[n] for n in c["inputs"]})))
        return [env[n] for n in names]
