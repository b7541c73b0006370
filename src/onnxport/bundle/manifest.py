"""The typed manifest: the only module that spells manifest.json's keys.

A bundle is parts (a text decoder, a vision encoder, an audio encoder, a codec, ...) made of
graphs. `Manifest.graphs` lists every file with its role, part and I/O (`spec.TensorSpec`);
`Manifest.parts` says what each part is, which graphs it owns, and how it was verified;
`kv_cache` and `layout` describe the decoder part. Records produced by verify/ (per-shape
comparisons) and by recipes (`Graph.meta`, preprocessor constants) are kept as they are.

Schema history: v1 (onnxport <= 0.1: no `parts`, `schema_version` 1) loads as v2 with the parts
derived from the graphs; v2 adds `parts` and `Graph.part`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from onnxport.errors import BundleError
from onnxport.spec import TensorSpec

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# layout kinds
MONOLITHIC, SPLIT, MODULES = "monolithic", "split", "modules"
# part kinds
DECODER, ENCODER = "decoder", "encoder"
#: graphs[].attention of `--attention gqa` decoders
GQA_ATTENTION = "com.microsoft.GroupQueryAttention"
#: graphs[].padding of decoders that take right-padded batches
RIGHT_PADDING = "right"


def _io(t: TensorSpec) -> dict:
    return {"name": t.name, "dtype": t.dtype, "dims": list(t.dims)}


def _io_from(d: dict) -> TensorSpec:
    return TensorSpec(d["name"], d.get("dtype"), tuple(d["dims"]))


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class Graph:
    """One file of the bundle. `role`: decoder | embedding | embedding_cache | block |
    block_cache | lm_head | embedding_table | encoder | vocoder | module ...; `name` is set for
    encoder/module graphs (the runner picks them by name)."""

    role: str
    file: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    part: str = DECODER
    name: str | None = None
    layers: list[int] | None = None
    sliding_windows: list | None = None
    head: str | None = None
    exporter: str | None = None
    opset: int | None = None
    patches: list[str] = field(default_factory=list)
    preprocess: str | None = None
    meta: dict | None = None
    external_data: list[str] = field(default_factory=list)
    #: {file: {"bytes": size, "sha256": hex}} for the graph file and its external data
    files: dict[str, dict] | None = None
    fallback_from: dict | None = None
    weights: dict | None = None
    verification: dict | None = None
    #: float16 / bfloat16 graphs: what the conversion did (optimize/precision.py's record:
    #: compute and weight dtypes, I/O dtypes, nodes kept in fp32 and why, guard attempts)
    precision: dict | None = None
    #: weight-only int4/int8 graphs: method, bits per layer, per-layer error, the quality gate
    #: (held-out perplexity and greedy agreement against the source bundle)
    quantization: dict | None = None
    #: graph passes run after export, in order: {"name", "applied", "fused": {op: count},
    #: "result"} (a pass that broke verification is rolled back and says so)
    optimization: list | None = None
    #: a graph cut into consecutive graphs under --max-graph-size, run one after another:
    #: [{"file", "inputs": [value names], "outputs": [value names]}, ...] (`file` is the first)
    chain: list[dict] | None = None
    #: a decoder traced with its first layers whose other layers are copies of the last traced
    #: one, each reading its own weights (export/stamp.py): {"traced_layers", "stamped_layers"},
    #: and "early_weights": {"tensors", "bytes"} written while the graph was traced
    #: (bundle/weights.py EarlyWeights) or {"why_not"} when the save wrote them, and, while
    #: templates are kept (export/template.py), "template": "reused" (the two-layer trace
    #: loaded from an earlier export's) or "traced and kept" (or why not kept); a decoder
    #: traced whole says why ("why_not"). A split block graph copied from a traced
    #: one (export/stamp_blocks.py): {"from": that graph's file}; traced after a failed check:
    #: {"why_not"}
    stamped: dict | None = None
    #: decoders exported with fused attention: "com.microsoft.GroupQueryAttention" (a prompt
    #: that continues a cache then runs one row at a time; see export/attention.py)
    attention: str | None = None
    #: "right": the graph takes each row's positions and cache slots from the mask's row sums
    #: (rotary inside GroupQueryAttention, optimize/gqa_rotary.py), so batches are padded on
    #: the right; None: left padding, as transformers' generate pads
    padding: str | None = None
    #: inputs a caller may leave out, backed by a default in the graph: {name: {"dtype",
    #: "dims", "default", "doc"}} (decoders: `logits_to_keep`, optimize/logits_to_keep.py)
    optional_inputs: dict | None = None
    # embedding_table (raw .bin) only
    dtype: str | None = None
    shape: list[int] | None = None
    scale: float | None = None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["inputs"] = [_io(t) for t in self.inputs]
        d["outputs"] = [_io(t) for t in self.outputs]
        return _drop_none(d)

    @classmethod
    def from_dict(cls, d: dict) -> Graph:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["inputs"] = [_io_from(i) for i in d.get("inputs", [])]
        kw["outputs"] = [_io_from(o) for o in d.get("outputs", [])]
        kw.setdefault("part", DECODER if "name" not in d else d.get("role", ENCODER))
        return cls(**kw)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class KVCache:
    layout: str
    naming: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    #: [past input name, present output name] per cache tensor, key before value, per layer
    names: list[list[str]]
    #: per layer [key_heads, key_dim, value_heads, value_dim] when layers differ (MLA, ...;
    #: 0 heads: the layer keeps no key/value)
    layers: list[list[int]] | None = None
    #: recurrent states (mamba / linear attention): [past name, present name, dims] each
    states: list[list] | None = None
    #: the decoder graph takes one token per call (recurrent states): prompts run token by token
    step_only: bool | None = None

    def to_dict(self) -> dict:
        return _drop_none({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: dict) -> KVCache:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})

    @property
    def past_names(self) -> list[str]:
        return [p for p, _ in self.names]

    @property
    def present_names(self) -> list[str]:
        return [q for _, q in self.names]


@dataclass
class Layout:
    kind: str = MONOLITHIC
    # split layouts (SplitConfig's fields)
    pack: int | None = None
    static: bool | None = None
    max_len: int | None = None
    prefill_len: int | None = None
    head: str | None = None
    rope: str | None = None
    embedding_bin: bool | None = None
    #: the split graphs read their weights from one shared `weights.data`
    share_weights: bool | None = None
    #: --max-graph-size in bytes (`pack` is what it chose)
    max_graph_bytes: int | None = None
    # --rope outside: what the runtime needs to compute cos/sin
    inv_freq: list[float] | None = None
    attention_scaling: float | None = None

    def to_dict(self) -> dict:
        return _drop_none({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        if "max_part_bytes" in d:  # its name before onnxport 0.1 named graphs and parts apart
            d = {**d, "max_graph_bytes": d["max_part_bytes"]}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def split_options(self) -> dict:
        """The SplitConfig fields, for re-verification."""
        keys = ("pack", "static", "max_len", "prefill_len", "head", "rope", "embedding_bin", "share_weights")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class Part:
    """One part of the checkpoint: which graphs it owns and how it was checked."""

    name: str
    kind: str  # decoder | encoder
    recipe: str
    graphs: list[str]
    verification: dict | None = None
    weights: dict | None = None

    def to_dict(self) -> dict:
        return _drop_none({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: dict) -> Part:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass
class Source:
    path: str
    sha256: str
    files: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    model_type: str
    recipe: str
    architectures: list[str] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    #: positions the model was trained for (max_position_embeddings); generation stops there
    max_positions: int | None = None
    #: the position transformers' generate gives left-padded slots (4.x: 1, 5.x: 0); absolute
    #: position embeddings read it when the model leaks padded states (git)
    pad_position: int | None = None
    module: str | None = None
    method: str | None = None


@dataclass
class ExportInfo:
    exporter: str
    opset: int
    dtype: str
    attn_implementation: str | None = None
    seconds: float | None = None
    #: `export --target T`: {"name": T, "flags": the options the preset chose}
    target: dict | None = None
    #: seconds per stage: load (checkpoint -> torch), export (trace + ONNX), verify (against
    #: PyTorch), optimize (passes, precision, each verified again)
    phases: dict | None = None


@dataclass
class Pipeline:
    """How the parts of a bundle chain at run time, for the torch-free pipeline runner
    `runtime/tasks/<kind>.py`. `kind`: image-text-to-text | any-to-text |
    speech-to-text | text-to-speech. `graphs` maps a role in the pipeline (`embedding`, `decoder`, `vision`,
    `audio`, `cross_kv`, `talker`, `vocoder`, ...) to a graph name or file of this bundle.
    `config` holds what the runner needs and no graph shows: placeholder token ids and how
    many tokens each feature becomes, the position-id rule (e.g. mrope and its sections),
    processor settings (image / audio preprocessing), generation settings (forced or
    suppressed tokens)."""

    kind: str
    graphs: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    #: end-to-end checks of the chained pipeline (ids / waveforms against transformers)
    verification: dict | None = None

    def to_dict(self) -> dict:
        return _drop_none({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: dict) -> Pipeline:
        return cls(**{f.name: d.get(f.name) for f in fields(cls) if f.name in d})


def _plain(cls, d: dict):
    return cls(**{f.name: d.get(f.name) for f in fields(cls) if f.name in d})


@dataclass
class Manifest:
    task: str
    versions: dict
    source: Source
    model: ModelInfo
    export: ExportInfo
    layout: Layout
    graphs: list[Graph]
    parts: list[Part] = field(default_factory=list)
    kv_cache: KVCache | None = None
    #: decoder weight accounting: {"in_graph": n, "skipped": {name: reason}}
    weights: dict | None = None
    #: the decoder part's verification (split/monolithic) or a summary for module bundles
    verification: dict | None = None
    #: how the parts chain at run time (multimodal bundles); None: parts are used one by one
    pipeline: Pipeline | None = None
    schema_version: int = SCHEMA_VERSION
    #: {file: {"bytes", "sha256"}} of every other file of the bundle (tokenizer, configs,
    #: speakers): checked when the runtime reads them, as graph files are
    files: dict[str, dict] | None = None
    #: other runtimes' own configs written beside the graphs: {"onnxruntime-genai": {"file":
    #: "genai_config.json" or None, "reason": why not, ...}} (bundle/genai.py)
    interop: dict | None = None

    # --- what kind of bundle ------------------------------------------------------------------

    @property
    def is_split(self) -> bool:
        return self.layout.kind == SPLIT

    @property
    def has_decoder(self) -> bool:
        return self.kv_cache is not None

    @property
    def verified_ok(self) -> bool | None:
        records = [p.verification for p in self.parts if p.verification is not None]
        if not records:
            return None
        return all(r.get("ok") for r in records)

    def graph(self, role: str) -> Graph:
        for g in self.graphs:
            if g.role == role:
                return g
        raise BundleError(f"bundle has no graph with role {role!r} (it has {[g.role for g in self.graphs]})",
                          "re-export the model with a layout that includes it")

    def named_graphs(self) -> list[Graph]:
        """Encoder / module graphs (those the EncoderRunner drives)."""
        return [g for g in self.graphs if g.name is not None]

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def graphs_of(self, part: str) -> list[Graph]:
        return [g for g in self.graphs if g.part == part]

    # --- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "format": "onnxport-bundle",
            "schema_version": SCHEMA_VERSION,
            "onnxport_task": self.task,
            "versions": self.versions,
            "source": _drop_none(vars(self.source).copy()),
            "model": _drop_none(vars(self.model).copy()),
            "export": _drop_none(vars(self.export).copy()),
            "layout": self.layout.to_dict(),
        }
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        d["graphs"] = [g.to_dict() for g in self.graphs]
        d["parts"] = [p.to_dict() for p in self.parts]
        if self.weights is not None:
            d["weights"] = self.weights
        if self.verification is not None:
            d["verification"] = self.verification
        if self.pipeline is not None:
            d["pipeline"] = self.pipeline.to_dict()
        if self.interop is not None:
            d["interop"] = self.interop
        if self.files is not None:
            d["files"] = self.files
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(f"manifest has schema_version {version!r}; this onnxport reads {READABLE_VERSIONS}",
                              "re-export the bundle with this onnxport version")
        validate(d)
        try:
            graphs = [Graph.from_dict(g) for g in d.get("graphs", [])]
            layout = Layout.from_dict(d.get("layout") or {"kind": MONOLITHIC})
            kv = KVCache.from_dict(d["kv_cache"]) if d.get("kv_cache") else None
            m = cls(task=d.get("onnxport_task", ""), versions=d.get("versions", {}),
                    source=_plain(Source, d.get("source", {})), model=_plain(ModelInfo, d.get("model", {})),
                    export=_plain(ExportInfo, d.get("export", {})), layout=layout, graphs=graphs,
                    parts=[Part.from_dict(p) for p in d.get("parts", [])], kv_cache=kv, weights=d.get("weights"),
                    verification=d.get("verification"), schema_version=version,
                    pipeline=Pipeline.from_dict(d["pipeline"]) if d.get("pipeline") else None, files=d.get("files"),
                    interop=d.get("interop"))
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest is malformed ({type(e).__name__}: {e})", "re-run onnxport export") from None
        if version == 1:
            m.parts = _v1_parts(m)
        return m


@dataclass
class FileRecord:
    """Schema of a `files` entry (validation only: the manifest keeps it as a dict)."""

    bytes: int
    sha256: str | None = None


@dataclass
class OptionalInputRecord:
    """Schema of a `graphs[].optional_inputs` entry."""

    dtype: str
    dims: list[int | str]
    default: Any = None
    doc: str | None = None


@dataclass
class ChainLink:
    """Schema of a `graphs[].chain` entry (a graph cut into consecutive graphs)."""

    file: str
    inputs: list[str]
    outputs: list[str]


#: fields whose manifest form is a dict or list of dicts, checked against these schemas
SCHEMAS = {(Graph, "files"): dict[str, FileRecord] | None,
           (Graph, "optional_inputs"): dict[str, OptionalInputRecord] | None,
           (Graph, "chain"): list[ChainLink] | None}

#: the manifest's sections and the class each is read into
SECTIONS = {"source": Source, "model": ModelInfo, "export": ExportInfo, "layout": Layout, "kv_cache": KVCache,
            "graphs": list[Graph], "parts": list[Part], "pipeline": Pipeline, "weights": dict, "verification": dict,
            "versions": dict, "onnxport_task": str, "files": dict[str, FileRecord], "interop": dict}


def validate(d: dict) -> None:
    """Every field of the manifest against the type its dataclass declares (a graph's `files`
    given as a string, `max_positions: "512"`, kv names as a string...), then what a reader of
    a decoder bundle relies on: one BundleError naming the field, before anything reads it."""
    for key, tp in SECTIONS.items():
        if d.get(key) is not None:
            _check(tp, d[key], key)
    kv = d.get("kv_cache")
    if kv:
        model = d.get("model") or {}
        for name, least in (("vocab_size", 1), ("num_layers", 0)):  # 0 cache layers: openai-gpt, xlnet
            if not isinstance(model.get(name), int) or isinstance(model.get(name), bool) or model[name] < least:
                raise BundleError(f"manifest field model.{name} is {json.dumps(model.get(name))}; a decoder bundle "
                                  f"needs an integer >= {least}", "the bundle was edited or damaged; re-run onnxport export")
        for i, pair in enumerate(kv.get("names") or []):
            if len(pair) != 2:
                raise BundleError(f"manifest field kv_cache.names[{i}] has {len(pair)} names, expected [past, present]",
                                  "the bundle was edited or damaged; re-run onnxport export")
    for i, g in enumerate(d.get("graphs") or []):
        for key in ("role", "file"):
            if not isinstance(g.get(key), str) or not g[key]:
                raise BundleError(f"manifest field graphs[{i}].{key} is {json.dumps(g.get(key))}, expected a name",
                                  "the bundle was edited or damaged; re-run onnxport export")


def _check(tp, value, where: str) -> None:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _check(a, value, where)
            except BundleError as e:
                errors.append(e)
        raise errors[0]
    if tp is TensorSpec:
        _check(dict, value, where)
        _check(str, value.get("name"), f"{where}.name")
        _check(str | None, value.get("dtype"), f"{where}.dtype")
        _check(list[int | str], value.get("dims"), f"{where}.dims")
        return
    if hasattr(tp, "__dataclass_fields__"):
        _check(dict, value, where)
        hints = typing.get_type_hints(tp)
        for f in fields(tp):
            required = f.default is MISSING and f.default_factory is MISSING
            if f.name not in value:
                if required and tp not in (Manifest,):
                    raise BundleError(f"manifest field {where}.{f.name} is missing",
                                      "the bundle was edited or damaged; re-run onnxport export")
                continue
            if value[f.name] is None and f.default is None:
                continue
            _check(SCHEMAS.get((tp, f.name), hints[f.name]), value[f.name], f"{where}.{f.name}")
        return
    base = origin or tp
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if base is float else \
        isinstance(value, int) and not isinstance(value, bool) if base is int else isinstance(value, base)
    if not ok:
        raise BundleError(f"manifest field {where} is {type(value).__name__} {json.dumps(value)[:40]}, "
                          f"expected {getattr(base, '__name__', base)}",
                          "the bundle was edited or damaged; re-run onnxport export")
    if base is list and args:
        for i, item in enumerate(value):
            _check(args[0], item, f"{where}[{i}]")
    elif base is dict and len(args) == 2:
        for k, item in value.items():
            _check(args[1], item, f"{where}.{k}")


def _v1_parts(m: Manifest) -> list[Part]:
    """v1 bundles held one part: a decoder (monolithic/split) or encoder/module graphs."""
    if m.kv_cache is not None:
        return [Part(DECODER, DECODER, m.model.recipe, [g.file for g in m.graphs], m.verification, m.weights)]
    return [Part(g.name or g.file, ENCODER, m.model.recipe, [g.file], g.verification, g.weights) for g in m.graphs]


def read_manifest(bundle: str | Path, check_sizes: bool = True) -> Manifest:
    """Read and validate `bundle/manifest.json` (v1 or v2) and check the files it names exist
    inside the bundle (and, `check_sizes`, have the sizes it recorded)."""
    from onnxport.bundle.folder import resolve_inside

    p = Path(bundle)
    if not p.is_dir():
        raise BundleError(f"bundle folder {str(p)!r} does not exist",
                          "export one first: onnxport export MODEL_DIR -o OUT")
    mf = p / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{str(p)!r} has no {MANIFEST}; it is not an onnxport bundle",
                          "pass the folder written by `onnxport export`")
    try:
        raw = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e})", "re-run onnxport export") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{mf} is not a JSON object", "re-run onnxport export")
    manifest = Manifest.from_dict(raw)
    for g in manifest.graphs:
        for f in [g.file, *g.external_data, *(c["file"] for c in g.chain or [])]:
            if not resolve_inside(p, f).is_file():
                raise BundleError(f"bundle is missing {f}", "re-run onnxport export")
        for f, rec in (g.files or {}).items() if check_sizes else ():  # a stat each; sha256 at load
            size = resolve_inside(p, f).stat().st_size if resolve_inside(p, f).is_file() else None
            if size != rec.get("bytes"):
                raise BundleError(f"{f} is {size} bytes, the manifest recorded {rec.get('bytes')}",
                                  "the file was truncated or replaced; re-run onnxport export")
    return manifest


def record_files(folder: Path, manifest: Manifest) -> None:
    """Size and sha256 of every file of the bundle: each graph's file and external data
    (`<file>.data` included when the exporter wrote one) into its `files`, every other file
    (tokenizer, configs, speakers) into the manifest's `files`."""
    from onnxport.bundle.folder import resolve_inside
    from onnxport.bundle.seal import sha256

    seen: dict[str, dict] = {}
    for g in manifest.graphs:
        names = [g.file, *(c["file"] for c in g.chain or [] if c["file"] != g.file), *g.external_data]
        if (folder / (g.file + ".data")).is_file() and g.file + ".data" not in names:
            names.append(g.file + ".data")
        g.files = {}
        for name in names:
            path = resolve_inside(folder, name)
            if not path.is_file():
                continue
            if name not in seen:  # a shared weights file is hashed once
                seen[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
            g.files[name] = dict(seen[name])
    manifest.files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
                      for f in sorted(folder.iterdir())
                      if f.is_file() and f.name not in seen and f.name != MANIFEST and not f.name.startswith(".")}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write atomically (a temp file renamed over the old one)."""
    import os

    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
