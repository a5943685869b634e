"""d2m-gguf: Dense2MoE layer-fusion upcycling (LF-UC) to GGUF for llama.cpp.

The pipeline, one small module per stage:
    dense model spec (spec.py) -> checkpoint tensors (checkpoint.py)
    -> fusion plan (plan.py) -> upcycled weights (upcycle.py)
    -> GGUF (ggufout.py, export.py) -> patched llama.cpp (patches/).
"""

__version__ = "0.1.0"
