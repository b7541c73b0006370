"""report.html / report.md in every bundle (bundle/report.py) and `onnxport inspect`: the page
holds the sections a reader needs (summary, parts, graphs, I/O with named dims, op histogram,
verification per shape) and one plot bar per verified output, references nothing outside itself,
and is sealed with the bundle; inspect prints the same facts. Parsed with the standard library's
HTML parser (no browser engine installs here)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from typer.testing import CliRunner


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h2, self.rects, self.links, self._in_h2 = [], 0, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_h2 = tag == "h2"
        self.rects += tag == "rect"
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def test_every_bundle_has_a_report_with_its_facts_and_plot(exported):
    from onnxport.bundle import read_manifest
    from onnxport.bundle.report import _rows

    for bundle in (exported("llama"), exported("llama", split={"pack": 1}, kv_layout="bshd")):
        page = _Page()
        page.feed((bundle / "report.html").read_text(encoding="utf-8"))
        manifest = read_manifest(bundle)
        graphs = [g.file for g in manifest.graphs if g.file.endswith(".onnx")]
        for title in ("Summary", "Parts", "Graphs", *(f"{g}: inputs and outputs" for g in graphs),
                      *(f"{g}: ops" for g in graphs)):
            assert title in page.h2, (bundle.name, title, page.h2)
        rows = _rows(manifest)
        if rows:
            assert "Verification" in page.h2 and page.rects == len(rows)
        assert not page.links  # nothing fetched from anywhere
        md = (bundle / "report.md").read_text(encoding="utf-8")
        assert "## Graphs" in md and "past_sequence_length" in md
        files = json.loads((bundle / "manifest.json").read_text())["files"]
        assert {"report.html", "report.md"} <= set(files)  # sealed with the rest


def test_inspect_prints_the_reports_facts(exported):
    from onnxport.cli import app

    bundle = exported("llama")
    res = CliRunner().invoke(app, ["inspect", str(bundle)])
    assert res.exit_code == 0, res.output
    for needle in ("== Summary", "== model.onnx: inputs and outputs", "past_key_values.0.key", "== model.onnx: ops",
                   "MatMul", "== Verification", "batch=1,seq=1,past=0"):
        assert needle in res.output, needle
