"""NPU calibration sets (`onnxport calib`): real input tensors for every graph of a split bundle,
recorded while onnxport's own runtime generates from real prompts, written in the layouts the
NPU quantizers read:

    OUT/<graph>/samples/<k>.npz         every input of sample k by name (TPU-MLIR run_calibration)
    OUT/<graph>/<input>/<k>.npy         one folder per input (pulsar2's calibration_dataset)
    OUT/<graph>/<input>/<k>.raw         raw little-endian bytes (QNN)
    OUT/<graph>/dataset.txt             per line: sample k's .npy paths in input order (RKNN)
    OUT/<graph>/input_list.txt          per line: name:=path.raw ... (QNN's input list)
    OUT/<graph>/outputs/<k>.npz         the outputs ONNX Runtime gave for sample k
    OUT/calib.json                      graphs, inputs (name, dtype, shape), sample counts

Static bundles have fixed shapes, so every sample of a graph has the graph's exact shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onnxport.bundle.folder import CALIBRATION_FORMAT, CALIBRATION_MARKER, atomic_bundle
from onnxport.errors import InputError

#: samples kept per graph (a block_cache graph runs once per generated token)
PER_GRAPH = 32


def default_prompts(n: int = 4) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "data" / "calib.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:n]


def write_calibration(bundle: str | Path, out: str | Path, prompts: list[str] | None = None, chat: bool = False,
                      max_new_tokens: int = 8, per_graph: int = PER_GRAPH, force: bool = False) -> dict:
    from onnxport.runtime import Generator

    bundle = Path(bundle)
    gen = Generator(bundle)
    if gen.split is None:
        raise InputError(f"{bundle} is not a split bundle; calibration sets are for the NPU split layout",
                         "export with --target npu (or --layout split --static)")
    prompts = prompts or default_prompts()
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("a calibration prompt is empty", "give one non-empty prompt per line")
    recorded: dict[str, list[tuple[dict, dict]]] = {}
    sessions = [*gen.split.sessions.values(), *(s for _, s in gen.split.blocks), *(s for _, s in gen.split.block_caches)]
    for sess in sessions:
        def recording(feeds, check=True, sess=sess, run=sess.run):
            outs = run(feeds, check=check)
            samples = recorded.setdefault(sess.entry.file, [])
            if len(samples) < per_graph:
                samples.append(({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in outs.items()}))
            return outs
        sess.run = recording
    ids = gen.chat_ids(prompts) if chat else [gen.tokenizer.encode(p) for p in prompts]
    gen.generate_ids(ids, max_new_tokens=max_new_tokens, eos_token_id=None)
    summary = {"bundle": str(bundle.resolve()), "prompts": len(prompts), "max_new_tokens": max_new_tokens,
               "formats": ["npz (TPU-MLIR)", "npy per input (pulsar2)", "dataset.txt (RKNN)", "raw + input_list.txt (QNN)"],
               "graphs": {}}
    with atomic_bundle(out, force=force, inputs=(bundle,)) as tmp:
        for file, samples in recorded.items():
            entry = next(s.entry for s in sessions if s.entry.file == file)
            stem = tmp / Path(file).stem
            names = [t.name for t in entry.inputs]
            for sub in ("samples", "outputs", *names):
                (stem / sub).mkdir(parents=True, exist_ok=True)
            dataset, qnn = [], []
            for k, (feeds, outs) in enumerate(samples):
                x = {n: feeds[n] for n in names if n in feeds}
                np.savez(stem / "samples" / f"{k}.npz", **x)
                np.savez(stem / "outputs" / f"{k}.npz", **outs)
                for n, a in x.items():
                    np.save(stem / n / f"{k}.npy", a)
                    np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tofile(stem / n / f"{k}.raw")
                dataset.append(" ".join(f"{n}/{k}.npy" for n in x))
                qnn.append(" ".join(f"{n}:={n}/{k}.raw" for n in x))
            (stem / "dataset.txt").write_text("\n".join(dataset) + "\n")
            (stem / "input_list.txt").write_text("\n".join(qnn) + "\n")
            summary["graphs"][file] = {"samples": len(samples), "inputs": [
                {"name": n, "dtype": str(samples[0][0][n].dtype), "shape": list(samples[0][0][n].shape)}
                for n in names if n in samples[0][0]]}
        # its format marker lets --force replace this folder later (bundle/folder.py)
        (tmp / CALIBRATION_MARKER).write_text(json.dumps({"format": CALIBRATION_FORMAT, **summary}, indent=1) + "\n")
    return summary
