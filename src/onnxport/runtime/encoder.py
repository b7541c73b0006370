"""Run one encoder / module graph of a bundle from raw inputs (numpy + onnxruntime, no torch).

When the manifest names a preprocessor for the graph (`graphs[i].preprocess`), the raw inputs
(e.g. Qwen2.5-VL's pixel_values + grid_thw, Qwen2.5-Omni's mel features + lengths) go through it
first; otherwise they are fed as they are, by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxport.bundle import read_manifest
from onnxport.errors import BundleError, RuntimeInputError
from onnxport.runtime.preprocess import PREPROCESSORS
from onnxport.runtime.session import GraphSession


class EncoderRunner:
    def __init__(self, bundle: str | Path, name: str | None = None, threads: int | None = None):
        self.folder = Path(bundle)
        self.manifest = read_manifest(self.folder)
        graphs = self.manifest.named_graphs()
        if not graphs:
            raise BundleError(f"{bundle} has no encoder or module graphs", "export one with onnxport export / export-module")
        by_name = {g.name: g for g in graphs}
        if name is None and len(graphs) > 1:
            raise RuntimeInputError(f"the bundle has several graphs {list(by_name)}", "pass name=")
        if name is not None and name not in by_name:
            raise RuntimeInputError(f"the bundle has no graph {name!r}", f"it has {list(by_name)}")
        self.entry = by_name[name] if name else graphs[0]
        if self.entry.chain:  # cut under --max-graph-size: its cut graphs run one after another
            from onnxport.runtime.segments import ChainSession

            self.session = _ChainGraph(self.entry, ChainSession(self.folder, self.entry.chain,
                                                                [t.name for t in self.entry.inputs], threads))
        else:
            self.session = GraphSession(self.folder, self.entry, threads)

    @property
    def input_names(self) -> list[str]:
        return list(self.session.inputs)

    def feeds(self, *args, **kwargs) -> dict[str, np.ndarray]:
        pre = self.entry.preprocess
        if pre:
            if pre not in PREPROCESSORS:
                raise BundleError(f"the bundle needs preprocessor {pre!r}, which this onnxport does not have",
                                  "upgrade onnxport to the version that wrote the bundle")
            return PREPROCESSORS[pre](*args, meta=self.entry.meta or {}, **kwargs)
        if args:
            kwargs.update(zip(self.input_names, args))
        return {k: np.asarray(v) for k, v in kwargs.items()}

    def __call__(self, *args, **kwargs) -> dict[str, np.ndarray]:
        return self.session.run(self.feeds(*args, **kwargs))


class _ChainGraph:
    """GraphSession's interface over a chain of cut graphs."""

    def __init__(self, entry, chain):
        self.entry, self.chain = entry, chain
        self.inputs = {i.name: i for i in entry.inputs}
        self.output_names = entry.output_names

    def run(self, feeds: dict, check: bool = True) -> dict:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise RuntimeInputError(f"{self.entry.file}: missing inputs {missing[:4]}",
                                    f"expected inputs: {list(self.inputs)[:6]}")
        return dict(zip(self.output_names, self.chain.run(self.output_names, feeds)))
