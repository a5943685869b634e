#!/usr/bin/env python3
"""Convert a Hugging Face LLM to GGUF: `python convert.py HF_DIR OUT.gguf [--dense | --plan PLAN] ...`.

A thin entry over `d2m convert` (d2m_gguf/cli.py); `python convert.py --help` lists the options.
"""

from d2m_gguf.cli import convert_main

if __name__ == "__main__":
    convert_main()
