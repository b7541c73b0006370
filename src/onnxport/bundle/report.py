"""report.html and report.md: what a bundle holds, for a person - parts, graphs with their I/O
and named dims, op histogram, sizes, verification per shape with a plot of each output's error
against its bound, precision / quantization / optimization records, target, other runtimes,
timings. Written by every command that writes a bundle (bundle/assemble.finish_bundle), from the
manifest and the graph files alone; the plot is inline SVG (no network asset, no script)."""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path

HTML, MARKDOWN = "report.html", "report.md"


def _ops(folder: Path, file: str) -> Counter:
    import onnx

    try:
        model = onnx.load(str(folder / file), load_external_data=False)
    except Exception:  # noqa: BLE001 - a report never fails a command
        return Counter()
    return Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph.node)


def _size(folder: Path, g) -> int:
    return sum((folder / f).stat().st_size for f in {g.file, *g.external_data} if (folder / f).is_file())


def _dims(t) -> str:
    return "[" + ", ".join(str(d) for d in t.dims) + "]"


def _rows(manifest) -> list[tuple[str, str, str, float, float, bool]]:
    """(part, shape, output, error, bound, ok) of every verified output that records both."""
    out = []
    for part in manifest.parts:
        record = part.verification or {}
        for case in record.get("cases", []) or []:
            for name, r in (case.get("outputs") or {}).items():
                if isinstance(r, dict) and "max_abs_diff" in r and r.get("bound"):
                    out.append((part.name, str(case.get("shape", "")), name, float(r["max_abs_diff"]),
                                float(r["bound"]), bool(r.get("ok"))))
    return out


def error_plot(rows) -> str:
    """One bar per verified output: log10(bound / error), the margin (right is better); a bar
    left of the axis is an output past its bound."""
    if not rows:
        return ""
    bar, label_w, width = 14, 360, 300
    height = bar * len(rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 80}" height="{height}" '
             'font-family="monospace" font-size="11">',
             f'<line x1="{label_w}" y1="0" x2="{label_w}" y2="{height - 20}" stroke="#444"/>']
    for i, (part, shape, name, err, bound, ok) in enumerate(rows):
        margin = math.log10(bound / err) if err > 0 else 6.0
        w = min(abs(margin), 6.0) / 6.0 * width
        x = label_w if margin >= 0 else label_w - w
        y = 10 + i * bar
        colour = "#3a7" if ok else "#c33"
        parts.append(f'<text x="{label_w - 6}" y="{y + 10}" text-anchor="end">{html.escape(f"{shape} {name}")}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar - 3}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + width + 4}" y="{y + 10}">{margin:+.1f}</text>')
    parts.append(f'<text x="{label_w}" y="{height - 4}">margin: log10(bound / max|diff|), 0 = at the bound</text>')
    return "".join(parts) + "</svg>"


def bars_svg(labels: list[str], values: list[float], threshold: float, caption: str) -> str:
    """A horizontal bar per value on a log10 axis from 1e-8 to 1e+1 (inf drawn at the right
    end), the threshold a red line; for bisect's per-module errors."""
    lo, hi, label_w, width, bar = -8.0, 1.0, 420, 360, 12
    height = bar * len(labels) + 34

    def x(v: float) -> float:
        v = hi if not math.isfinite(v) else (lo if v <= 0 else min(max(math.log10(v), lo), hi))
        return label_w + (v - lo) / (hi - lo) * width

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 20}" height="{height}" '
             'font-family="monospace" font-size="10">']
    for i, (name, v) in enumerate(zip(labels, values)):
        y = 4 + i * bar
        over = not math.isfinite(v) or v > threshold
        parts.append(f'<text x="{label_w - 4}" y="{y + 9}" text-anchor="end">{html.escape(name)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{x(v) - label_w:.1f}" height="{bar - 2}" '
                     f'fill="{"#c33" if over else "#3a7"}"/>')
    tx = x(threshold)
    parts.append(f'<line x1="{tx:.1f}" y1="0" x2="{tx:.1f}" y2="{height - 24}" stroke="#c00" stroke-dasharray="3,2"/>')
    parts.append(f'<text x="{label_w}" y="{height - 6}">{html.escape(caption)} (log scale 1e-8 .. 10; '
                 'dashed: tolerance)</text>')
    return "".join(parts) + "</svg>"


def sections(folder: Path, manifest) -> list[tuple[str, list[list[str]] | str]]:
    """(title, table rows or text) in report order; rendered as HTML and Markdown alike."""
    m = manifest
    ops = {g.file: _ops(folder, g.file) for g in m.graphs if g.file.endswith(".onnx")}  # each graph read once
    out: list[tuple[str, list[list[str]] | str]] = []
    exp = m.export
    out.append(("Summary", [["model", f"{m.model.model_type} ({m.model.recipe})"], ["task", m.task or "-"],
                            ["layout", m.layout.kind], ["exporter / opset", f"{exp.exporter} / {exp.opset}"],
                            ["dtype", exp.dtype], ["target", json.dumps(exp.target) if exp.target else "-"],
                            ["export seconds", str(exp.seconds if exp.seconds is not None else "-") +
                             (" (" + ", ".join(f"{k} {v}" for k, v in exp.phases.items()) + ")" if exp.phases else "")],
                            ["verified", {True: "yes", False: "NO", None: "not verified"}[m.verified_ok]],
                            ["versions", ", ".join(f"{k} {v}" for k, v in (m.versions or {}).items() if v)]]))
    out.append(("Parts", [["part", "kind", "recipe", "graphs", "verified"]] +
                [[p.name, p.kind, p.recipe, ", ".join(p.graphs),
                  "-" if p.verification is None else ("ok" if p.verification.get("ok") else "FAILED")]
                 for p in m.parts]))
    out.append(("Graphs", [["file", "role", "part", "bytes", "nodes", "attention / precision / quantization"]] +
                [[g.file, g.role, g.part, f"{_size(folder, g):,}", str(sum(ops[g.file].values()))
                  if g.file in ops else "-",
                  "; ".join(x for x in (g.attention or "", (g.precision or {}).get("compute", ""),
                                        (g.quantization or {}).get("method", "")) if x) or "-"] for g in m.graphs]))
    for g in m.graphs:
        if not g.file.endswith(".onnx"):
            continue
        rows = [["", "name", "dtype", "dims"]] + [["in", t.name, t.dtype, _dims(t)] for t in g.inputs] + \
               [["out", t.name, t.dtype, _dims(t)] for t in g.outputs]
        out.append((f"{g.file}: inputs and outputs", rows))
        out.append((f"{g.file}: ops", [["op", "count"]] + [[k, str(v)] for k, v in ops[g.file].most_common()]))
        for key in ("precision", "quantization", "optimization"):
            value = getattr(g, key)
            if value:
                out.append((f"{g.file}: {key}", json.dumps(value, indent=1)[:4000]))
    rows = _rows(m)
    if rows:
        out.append(("Verification", [["part", "shape", "output", "max|diff|", "bound", "ok"]] +
                    [[p, s, n, f"{e:.2e}", f"{b:.2e}", "ok" if ok else "FAIL"] for p, s, n, e, b, ok in rows]))
    if m.interop:
        out.append(("Other runtimes", [["runtime", "record"]] + [[k, json.dumps(v)] for k, v in m.interop.items()]))
    return out


def render(folder: Path, manifest) -> tuple[str, str]:
    """(report.html, report.md)."""
    secs = sections(folder, manifest)
    title = f"onnxport bundle: {manifest.model.model_type}"
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
         "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}pre{background:#f6f6f6;"
         "padding:.5em;font-size:12px}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    for name, body in secs:
        h.append(f"<h2>{html.escape(name)}</h2>")
        md += [f"## {name}", ""]
        if isinstance(body, str):
            h.append(f"<pre>{html.escape(body)}</pre>")
            md += ["```", body, "```", ""]
            continue
        head, *rows = body if body and body[0] and name not in ("Summary",) else ([], *body)
        h.append("<table>" + ("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" if head else "")
                 + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                 + "</table>")
        cols = head or ["", ""]
        md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
        if name == "Verification":
            h.append(f"<figure>{error_plot(_rows(manifest))}<figcaption>each verified output's margin "
                     "below its bound</figcaption></figure>")
    h.append("</body></html>")
    return "\n".join(h), "\n".join(md)


def write_report(folder: Path, manifest) -> None:
    page, text = render(Path(folder), manifest)
    (Path(folder) / HTML).write_text(page, encoding="utf-8")
    (Path(folder) / MARKDOWN).write_text(text, encoding="utf-8")
