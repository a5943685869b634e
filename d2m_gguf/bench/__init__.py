"""Benchmark and fuzz tooling, apart from the library: it drives the pipeline and llama.cpp; no pipeline module
imports it (the command line does, for `d2m bench`).

    variants.py    Variant, the models a table compares, and the one build cache (cached_build, heal_key)
    llamabench.py  the one llama-bench runner and parser (llama_bench, parse_llama_bench, runtime_args)
    tables.py      write_table: rows as name.csv and name.md (markdown_table for summaries); publish
    pareto.py      the Pareto front at one depth: front_rows, headline, plot_front
    provenance.py  provenance(): date, commit, machine and command, at the top of every table
    lfuc.py        `d2m bench lfuc` (lfuc_table) and `d2m bench curve` (healing_curve)
    matrix.py      `d2m bench matrix` / `make bench` (run_matrix: KV types, depths, fronts, predicted vs measured
                   speedup, efficiency, the stock and arm64 columns) and `d2m bench adb`
    scale.py       `d2m bench scale` / `make bench-scale`: wall time and peak RSS of each conversion stage on random
                   checkpoints of real shapes (0.5B-8B), upstream's converter beside ours
    fuzz.py        the loader fuzzer: python -m d2m_gguf.bench.fuzz A.gguf --cases N

Nothing is imported here, so `python -m d2m_gguf.bench.fuzz` loads no more than the fuzzer needs.
"""
