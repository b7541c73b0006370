"""The export stage: the torch.onnx driver (export/graph.py), loading a part's model
(export/load.py), the decoder with a flat cache (decoder.py), split layouts (split.py), module
graphs (module.py), bounded-memory export (stream.py), fused attention (attention.py), weight
accounting (weights.py), and the stage of one part (part.py)."""
