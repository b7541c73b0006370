"""Rich tables for the CLI: decoder verification per shape, module graphs per size, the
one-line summary of a bundle. Model and user text is never interpreted as markup."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from onnxport.bundle import Manifest


def _ok(ok: bool) -> Text:
    return Text("ok", style="green") if ok else Text("FAIL", style="red")


def decoder_table(record: dict) -> Table:
    """One row per shape and output (the per-layer cache rows collapse into the worst one, by
    its share of the bound); logits rows add how many greedy tokens agree."""
    from rich import box

    tol = record["tolerance"]
    spread = f"logits |diff| <= {tol['atol']:g} + {tol['spread']:g} x row std; " if "spread" in tol else ""
    table = Table(title=f"ONNX Runtime vs PyTorch ({tol['dtype']}: {spread}|diff| <= {tol['atol']:g} + "
                        f"{tol.get('rtol', 0):g} x max|ref|; cosine >= {tol['min_cosine']})", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("shape", no_wrap=True)  # the case's name is never cut
    table.add_column("output", overflow="fold", min_width=8)
    for col in ("max|diff|", "bound", "cosine", ""):
        table.add_column(col, no_wrap=True)
    shown: dict[tuple[str, str], dict] = {}
    for case in record["cases"]:
        for name, r in case["outputs"].items():
            key = (case["shape"], "present.*" if name.startswith(("present", "past_key")) else name)
            prev = shown.get(key)
            if prev is None or _share(r) > _share(prev) or not r["ok"]:
                shown[key] = {**r, "ok": r["ok"] and (prev is None or prev["ok"])}
    for (shape, name), r in shown.items():
        label = f"{name} {r['greedy_equal']}" if r.get("greedy_equal") else name
        bound = f"{r['bound']:.1e}" if r.get("bound") is not None else "-"
        table.add_row(Text(shape), Text(label), f"{r.get('max_abs_diff', float('nan')):.1e}", bound,
                      f"{r.get('cosine', float('nan')):.6f}", _ok(r["ok"]))
    return table


def _share(r: dict) -> float:
    """max|diff| as a share of its bound (0 when the row has no bound)."""
    return r.get("max_abs_diff", 0.0) / r["bound"] if r.get("bound") else 0.0


def modules_table(manifest: Manifest) -> Table:
    table = Table(title="ONNX Runtime vs PyTorch, per graph and input size")
    for col in ("graph", "exporter", "rewrites", "sizes", "output", "max|diff|", "SNR dB", ""):
        table.add_column(col)
    for g in manifest.named_graphs():
        for r in (g.verification or {}).get("results", []):
            sizes = ",".join(f"{k}={v}" for k, v in r["sizes"].items() if isinstance(v, int))
            table.add_row(Text(g.file), g.exporter or "-", ",".join(g.patches) or "-", Text(sizes), Text(r["output"]),
                          f"{r['max_abs_diff']:.2e}", "inf" if r.get("snr_db") is None else f"{r['snr_db']:.1f}",
                          _ok(r["ok"]))
    return table


def module_lines(manifest: Manifest) -> list[str]:
    """Per module graph: fallback notes, I/O dims, rewrites."""
    lines = []
    for g in manifest.named_graphs():
        if g.fallback_from:
            lines.append(f"{g.file}: dynamo failed ({str(g.fallback_from.get('dynamo', ''))[:160]}); used {g.exporter}")
        dims = ", ".join(f"{io.name}{list(io.dims)}" for io in g.inputs + g.outputs)
        lines.append(f"{g.file}: {dims}")
        if g.patches:
            lines.append(f"  rewrites applied: {', '.join(g.patches)}")
    return lines


def summary(manifest: Manifest, output) -> str:
    files = [g.file for g in manifest.graphs]
    shown = ", ".join(files[:4]) + (" ..." if len(files) > 4 else "")
    parts = ", ".join(p.name for p in manifest.parts)
    line = f"wrote {output}/: {shown} ({manifest.model.model_type}: {parts}"
    if manifest.kv_cache is not None and manifest.weights is not None:
        w = manifest.weights
        stamped = next((g.stamped for g in manifest.graphs if g.stamped and g.stamped.get("stamped_layers")), None)
        layers = (f"{manifest.kv_cache.num_layers} layers ({stamped['traced_layers']} traced, "
                  f"{stamped['stamped_layers']} stamped)" if stamped else f"{manifest.kv_cache.num_layers} layers")
        blocks = [g for g in manifest.graphs if g.role in ("block", "block_cache")]
        copies = sum(1 for g in blocks if (g.stamped or {}).get("from"))
        if copies:
            layers += f" ({len(blocks) - copies} block graphs traced, {copies} stamped)"
        line += (f"; decoder {layers}, {w['in_graph']} weights in graph, "
                 f"{len(w['skipped'])} skipped: {w['skipped'] or 'none'}")
    for g in manifest.graphs:
        if g.precision:
            p = g.precision
            line += (f"; {g.file}: float16, {p['kept_float32']['count']} nodes kept in float32"
                     if p["dtype"] == "float16" else
                     f"; {g.file}: bfloat16 weights ({'lossless' if p.get('lossless') else 'rounded'}), float32 compute")
    seconds = manifest.export.seconds
    return line + ")" + (f" in {seconds:.1f}s" if seconds is not None else "")


def bundle_report(manifest: Manifest, output, verbose_modules: bool = True) -> list:
    """What the CLI prints after writing or verifying a bundle: the verification table of a
    decoder, those of module graphs (and their I/O lines), then the one-line summary."""
    items: list = []
    if manifest.kv_cache is not None and manifest.verification and "cases" in manifest.verification:
        items.append(decoder_table(manifest.verification))
    if manifest.named_graphs():
        items.append(modules_table(manifest))
        if verbose_modules:
            items += module_lines(manifest)
    items.append(summary(manifest, output))
    return items


def optimize_line(manifest: Manifest, output) -> str:
    """`onnxport optimize`: the passes applied (and what each fused), those not applied and why."""
    graph = manifest.graph("decoder")
    done = [f"{r['name']} ({', '.join(f'{k} {v}' for k, v in r['fused'].items())})" for r in graph.optimization
            if r["applied"]]
    skipped = [f"{r['name']}: {r['result']}" for r in graph.optimization if not r["applied"]]
    return (f"wrote {output}/: {'; '.join(done) or 'no pass applied'}"
            + (f"; not applied: {'; '.join(skipped)}" if skipped else "")
            + ("; takes right-padded batches" if graph.padding else ""))


def quantize_lines(manifest: Manifest, output) -> list[str]:
    """`onnxport quantize`: layers per bits, the gate's measurements, and why layers left the
    requested bits."""
    q = manifest.graph("decoder").quantization
    emb = f", embedding {q['embedding'].split()[0]}" if q.get("embedding", "float32") != "float32" else ""
    head = f" (head int{q['head']['bits']})" if q.get("head") else ""
    lg = q.get("logits")
    teacher = (f"; next-token argmax equal to the source's at {lg['top1_agreement']:.1%} of held-out positions"
               if lg else "")
    lines = [f"wrote {output}/: {', '.join(f'{v} MatMul {k}' for k, v in q['layers'].items())}{head}{emb} "
             f"({q['method']}); held-out perplexity {q['perplexity']['quantized']:.3f} (source "
             f"{q['perplexity']['source']:.3f}){teacher}; greedy tokens equal to the source: "
             f"{q['greedy_agreement']['tokens_equal']}/{q['greedy_agreement']['tokens']}"]
    if q.get("fallback"):
        f = q["fallback"]
        lines.append(f"int{q['bits']} was asked for: the quality gate moved {f['int8_layers']} of {f['of']} layers to "
                     f"int8 ({f['why']})")
    return lines


def bisect_report(record: dict, before: int = 5, after: int = 3) -> list[str]:
    """`onnxport bisect`: the rows around the first divergence (`before` rows within tolerance
    ahead of it, `after` after it; every row when nothing diverges and there are few), then the
    verdict line. Plain lines: module paths are long and worth grepping."""
    from onnxport.verify.bisect import describe_culprit

    rows, culprit, tol = record["rows"], record["culprit"], record["tolerance"]
    at = rows.index(culprit) if culprit is not None else len(rows)
    start = max(0, at - before) if culprit is not None else max(0, len(rows) - 2 * before)
    lines = [f"{record['mode']}: {record['case']}, {len(rows)} compared, tolerance {tol:g} (max|a - b| / max|b|)",
             f"{'error':>9} {'input':>9}  {'op':<12} {'node':<24} module"]
    if start:
        lines.append(f"{'':>9} {'':>9}  ... {start} earlier rows within tolerance")
    for r in rows[start:at + after + 1]:
        inp = f"{r['input_error']:.2e}" if "input_error" in r else ""
        mark = "  <- first divergence" if r is culprit else ("" if r["error"] <= tol else "  (fed a wrong value)"
                                                            if r.get("input_error", 0) > tol else "  over")
        lines.append(f"{r['error']:9.2e} {inp:>9}  {r['op']:<12} {r['node']:<24} {r.get('module') or '-'}{mark}")
    verdict = describe_culprit(record)
    lines.append(f"first divergence: {verdict}" if culprit else f"no divergence: {verdict}")
    return lines


def inspect_lines(folder, manifest) -> list[str]:
    """`onnxport inspect`: the report's sections as aligned text."""
    from onnxport.bundle.report import sections

    lines = []
    for name, body in sections(folder, manifest):
        lines.append(f"\n== {name}")
        if isinstance(body, str):
            lines.append(body)
            continue
        widths = [max(len(str(r[i])) if i < len(r) else 0 for r in body) for i in range(max(map(len, body)))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return lines
