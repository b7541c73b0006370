"""The optimize stage: graph passes after export, one per file, in onnx-ir's pass shape
(passes.py), each candidate verified before it is kept (passes.Verified): fusions.py,
gqa_rotary.py, logits_to_keep.py, precision.py (fp16 with a guard, bf16), quantize.py and
gate.py (int4 / int8 behind a quality gate), partition.py (cutting graphs under a size). Which
passes run on which graph: stage.py."""
