"""Helpers for tests and benchmarks (as numpy.testing / torch.testing): tiny random models built
from transformers' own configs, and trained models that ship in Python packages. Nothing here
is imported by the export or runtime code."""
