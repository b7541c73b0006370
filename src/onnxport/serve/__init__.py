"""Serving bundles: Triton model repositories and the server (serve/triton.py). Uses the runtime
(no torch): the served model runs onnxport.runtime inside Triton's Python backend."""
