"""Graph passes after export, one per file (onnxslim clean-up, ORT fusions, fp16 with a
precision guard, int4/int8 weight-only quantization), each shaped like an onnx-ir pass:
`PassResult(model, modified)`, re-verified by verify/ and rolled back when it breaks parity.
No pass is enabled yet: the room exists so the pipeline (api.export) has its stage."""
