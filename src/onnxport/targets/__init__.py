"""Deployment targets: the export options each one needs (`onnxport export --target T`) and what
it will reject before anyone compiles (`onnxport check BUNDLE --target T`).

A target is one file in this package: a `Target` subclass registered with `@register_target`,
naming its export preset (CLI option -> value) and its `check(bundle, manifest)`, which returns
findings (error / warning / info, each with the graph, node, op and the PyTorch module it came
from). Checks run the real toolchain where it installs here (ONNX Runtime, OpenVINO) and a
versioned table where it does not (TensorRT, NPU compilers), and say which they used.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnxport.errors import InputError

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass(frozen=True)
class Finding:
    severity: str
    message: str
    graph: str | None = None
    node: str | None = None
    op: str | None = None
    module: str | None = None

    def line(self) -> str:
        where = ", ".join(x for x in (self.graph, self.node and f"node {self.node}",
                                      self.op and f"op {self.op}", self.module and f"module {self.module}") if x)
        return f"{self.severity}: {self.message}" + (f" ({where})" if where else "")


@dataclass
class Target:
    """A deployment target; subclasses set the class attributes and `check`."""

    name = ""
    summary = ""
    #: export options (the CLI's parameter names) the preset sets
    preset: dict = field(default_factory=dict)

    def check(self, bundle: Path, manifest) -> tuple[list[Finding], list[str]]:
        """(findings, how it checked: the toolchains and tables used)."""
        raise NotImplementedError


_TARGETS: dict[str, type] = {}


def register_target(cls: type) -> type:
    _TARGETS[cls.name] = cls
    return cls


def _load() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("rules",):
            importlib.import_module(f"{__name__}.{mod.name}")


def targets() -> dict[str, type]:
    _load()
    return dict(sorted(_TARGETS.items()))


def get_target(name: str) -> Target:
    known = targets()
    if name not in known:
        raise InputError(f"unknown target {name!r}", f"use one of {', '.join(known)}")
    return known[name]()


def check_bundle(bundle: str | Path, name: str) -> dict:
    """`onnxport check`: the target's findings for `bundle` as a record (ok: no error)."""
    from onnxport.bundle import read_manifest

    folder = Path(bundle)
    target = get_target(name)
    manifest = read_manifest(folder)
    findings, how = target.check(folder, manifest)
    return {"target": name, "ok": not any(f.severity == ERROR for f in findings),
            "errors": sum(f.severity == ERROR for f in findings),
            "warnings": sum(f.severity == WARNING for f in findings),
            "checked_with": how, "findings": [asdict(f) for f in findings]}


def apply_preset(name: str, chosen: dict, defaults: dict) -> dict:
    """Fill `chosen` (option -> value) from target `name`'s preset where the option is still at
    its default (an option given another value wins); returns what the preset set."""
    preset = get_target(name).preset
    applied = {k: v for k, v in preset.items() if chosen.get(k) == defaults.get(k) and defaults.get(k) != v}
    chosen.update(applied)
    return applied
