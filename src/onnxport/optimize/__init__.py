"""Graph passes after export, one per file, each re-verified by verify/:

- precision.py: fp16 with a precision guard (nodes past fp16's range kept in fp32, each
  candidate verified, escalation, failure with a hint), bf16 weight-only storage.

ORT fusions and int4/int8 weight-only quantization come here as further files."""
