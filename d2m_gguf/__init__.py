"""d2m-gguf: Dense2MoE layer-fusion upcycling (LF-UC) to GGUF for llama.cpp.

The pipeline, one small module per stage (pipeline.py runs them in order):
    dense model spec (spec.py, checkpoint.py) -> layer scores (analysis.py)
    -> fusion plan (planner.py, plan.py) -> upcycled weights (upcycle.py, model.py)
    -> healing (heal.py: the schedule; distill.py: the training) -> GGUF (hybrid_export.py,
    dense_export.py, ggufout.py) -> quantized GGUF (quantize.py) -> the patched llama.cpp (patches/).
Benchmarks and the loader fuzzer stand apart in bench/; settings and their options in options.py.
"""

__version__ = "0.1.0"
