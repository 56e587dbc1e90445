#!/usr/bin/env python
"""`mmft-hf benchmark` as a script: `accelerate launch examples/benchmark.py ...` (see `mmft_hf/commands/benchmark.py` for the flags)."""

from mmft_hf.commands.benchmark import main

if __name__ == "__main__":
    main()
