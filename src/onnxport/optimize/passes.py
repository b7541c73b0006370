"""The pass infrastructure of optimize/, in the shape of onnx-ir's (`onnx_ir/passes/_pass_infra.py`):
a pass checks what it `requires` before and what it `ensures` after its `call`, returns a
`PassResult` saying whether it changed the graph and what it recorded, and passes chain with
`Sequential`.

onnx-ir's passes take an in-memory `ir.Model`; these take a saved graph of a bundle being
written (`GraphFile`: the folder and the graph's manifest entry), because what they run on may
not fit in memory or in one protobuf (fp16 conversion writes weights one at a time; fusions
and the fp16 guard run ONNX Runtime sessions on files). A pass that rewrites the graph stages
each rewrite beside it as a `Candidate` (`bundle.weights.stage_graph`), most aggressive first;
`Verified(pass, check)` is the one place where candidates are checked (verify/ against PyTorch)
and the first that passes is committed, the others discarded with the reason recorded.

Adding a pass: one file with a `GraphPass` subclass (`candidates` for a rewrite to be checked,
or `call` for one that needs no check) and its place in optimize/stage.py's lists.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from onnxport.bundle import Graph, external_locations
from onnxport.bundle.weights import commit_graph, discard_staged
from onnxport.errors import InputError, OnnxportError

log = logging.getLogger(__name__)

#: check(candidate file, the entry to check it as) -> (ok, one-line message, verification record)
Check = Callable[[Path, Graph], "tuple[bool, str, dict | None]"]


@dataclass
class GraphFile:
    """One saved graph of a bundle being written, and its manifest entry (which passes update:
    I/O dtypes, padding, optional inputs, their records)."""

    folder: Path
    entry: Graph

    @property
    def path(self) -> Path:
        return self.folder / self.entry.file

    def refresh_external_data(self) -> None:
        self.entry.external_data = sorted(set(external_locations(self.path)))


@dataclass
class Candidate:
    """A rewritten graph staged beside the original. `details` go into the pass's record and
    its attempts; `on_commit` applies what keeping it implies to the manifest entry;
    `check_as` is the entry to check it as (e.g. taking right-padded batches); `check_file`
    makes the file the check runs instead of the candidate itself."""

    staged: Path
    details: dict = field(default_factory=dict)
    on_commit: Callable[[GraphFile], None] | None = None
    check_as: Graph | None = None
    #: the file the check runs instead of `staged`, made on demand and removed after (the CPU
    #: emulation twin of a bf16-compute graph)
    check_file: Callable[[], Path] | None = None


@dataclass
class PassResult:
    """What a pass did: `modified` says whether the graph file changed; `record` is what the
    manifest keeps about it; `verification` is the check's record of the kept candidate."""

    graph: GraphFile
    modified: bool
    record: dict = field(default_factory=dict)
    verification: dict | None = None


class GraphPass(abc.ABC):
    """A pass over one saved graph: `requires` / `ensures` raise when the graph is not what the
    pass takes / promises; a rewriting pass yields `candidates` (run through `Verified`), a
    pass that needs no check overrides `call`."""

    name = "pass"
    #: why `candidates` yielded nothing (no pattern matched, the rewriter failed)
    skipped: str = "nothing to do"

    def __call__(self, graph: GraphFile) -> PassResult:
        self.requires(graph)
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name} returned {type(result).__name__}, not a PassResult")
        if result.modified:
            self.ensures(result.graph)
        return result

    @classmethod
    def applies_to(cls, entry: Graph) -> bool:
        """Whether the pass is for this kind of graph (a registered fusion pass is offered
        only to graphs it applies to)."""
        return True

    def requires(self, graph: GraphFile) -> None:  # noqa: B027 - optional hook
        """Preconditions (raise InputError naming what the graph lacks)."""

    def ensures(self, graph: GraphFile) -> None:  # noqa: B027 - optional hook
        """Postconditions of a modified graph (raise AssertionError)."""

    def candidates(self, graph: GraphFile) -> Iterator[Candidate]:
        return iter(())

    def call(self, graph: GraphFile) -> PassResult:
        """No check: the first candidate is kept."""
        return Verified(self, None)(graph)

    def record(self, kept: Candidate | None, attempts: list[dict], message: str) -> dict:
        """The manifest's record of this pass: {"name", "applied", details..., "result"}."""
        details = kept.details if kept is not None else (
            {k: v for k, v in attempts[-1].items() if k not in ("ok", "result")} if attempts else {})
        return {"name": self.name, "applied": kept is not None, **details, "result": message}

    def failure(self, message: str, attempts: list[dict]) -> OnnxportError:
        """The error when no candidate verifies and the pass is required."""
        return OnnxportError(f"{self.name}: no candidate verifies: {message}")


class Verified(GraphPass):
    """Keep `inner`'s rewrite only when `check` accepts it. Candidates are checked in turn and
    the first that passes replaces the graph; the others are discarded. When none passes, the
    graph stays as it was and the record says why, or (`required`: a conversion the user asked
    for) `inner.failure` is raised. `check` None keeps the first candidate (--no-verify)."""

    def __init__(self, inner: GraphPass, check: Check | None, required: bool = False):
        self.inner, self.check, self.required = inner, check, required
        self.name = inner.name

    def requires(self, graph: GraphFile) -> None:
        self.inner.requires(graph)

    def ensures(self, graph: GraphFile) -> None:
        self.inner.ensures(graph)

    def call(self, graph: GraphFile) -> PassResult:
        attempts: list[dict] = []
        message = ""
        for candidate in self.inner.candidates(graph):
            try:
                if self.check is None:
                    ok, message, verification = True, "not checked (--no-verify)", None
                else:
                    checked = candidate.check_file() if candidate.check_file is not None else candidate.staged
                    try:
                        ok, message, verification = self.check(checked, candidate.check_as or graph.entry)
                    finally:
                        if checked != candidate.staged:
                            checked.unlink(missing_ok=True)
            except BaseException:
                discard_staged(candidate.staged)
                raise
            attempts.append({**candidate.details, "ok": ok, "result": message})
            log.info("%s candidate %d: %s", self.name, len(attempts), message)
            if ok:
                commit_graph(candidate.staged, graph.path)
                if candidate.on_commit is not None:
                    candidate.on_commit(graph)
                graph.refresh_external_data()
                return PassResult(graph, True, self.inner.record(candidate, attempts, message), verification)
            discard_staged(candidate.staged)
            log.warning("%s: candidate rejected: %s", self.name, message)
        if not attempts:  # `skipped` says why (set while the candidates were looked for)
            return PassResult(graph, False, self.inner.record(None, [], self.inner.skipped))
        if self.required:
            raise self.inner.failure(message, attempts)
        return PassResult(graph, False, self.inner.record(None, attempts, f"rolled back: {message}"))


class Sequential(GraphPass):
    """Passes in order on one graph; the record lists each pass's record in turn."""

    name = "sequential"

    def __init__(self, *passes: GraphPass | None):
        self.passes = [p for p in passes if p is not None]

    def call(self, graph: GraphFile) -> PassResult:
        records, modified, verification = [], False, None
        for p in self.passes:
            r = p(graph)
            records.append(r.record)
            modified = modified or r.modified
            verification = r.verification or verification
        return PassResult(graph, modified, {"passes": records}, verification)


def require(condition: bool, what: str, hint: str) -> None:
    """A pass's precondition: one line naming what the graph lacks."""
    if not condition:
        raise InputError(what, hint)


#: the decoder passes `--optimize` runs, by order: (order, class); filled by `@fusion_pass`
_FUSIONS: list[tuple[int, type]] = []


def fusion_pass(order: int):
    """Register a GraphPass class among the passes `--optimize` (and `onnxport optimize`) run on
    a decoder graph, at `order` (lower first). Its `applies_to(entry)` classmethod says which
    graphs it is for (default: all). Adding a pass is this decorator in one new file."""

    def deco(cls: type) -> type:
        if all(c is not cls for _, c in _FUSIONS):
            _FUSIONS.append((order, cls))
        return cls

    return deco


def fusion_passes(entry, external_threshold: int = 1 << 30) -> list[GraphPass]:
    """Instances of the registered fusion passes that apply to the graph `entry`, in order
    (every module of optimize/ is imported first, so each registers itself)."""
    import importlib
    import pkgutil

    import onnxport.optimize as package

    for mod in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{mod.name}")
    return [cls(external_threshold) for _, cls in sorted(_FUSIONS, key=lambda x: x[0]) if cls.applies_to(entry)]
