"""The torch.onnx driver: cache flattening, dynamic dims, graph finalisation, weight accounting."""
