"""The newcomer's command: `onnxport demo` exports, verifies and generates readable text."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from onnxport.cli import app


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "-o", str(out), "-p", "The for statement", "-n", "24"])
    assert res.exit_code == 0, res.output
    assert "The for statement" in res.output and "tokens/s" in res.output
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["verification"]["ok"]
    # a trained model, not a random one: greedy text is mostly ASCII words, not byte soup
    text = res.output.split("The for statement", 1)[1].split("export+verify")[0]
    words = [w for w in text.split() if w.isalpha()]
    assert len(words) >= 5, text


def test_demo_model_is_small_and_documented():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "src" / "onnxport" / "demo_model"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size <= 5 * 1024 * 1024
    info = json.loads((folder / "TRAINING.json").read_text())
    assert info["script"] == "scripts/train_demo.py" and info["final_loss"] < 2.5
