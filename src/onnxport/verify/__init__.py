"""Verification: inputs for several shapes, ONNX Runtime vs PyTorch, explicit tolerances."""
