#!/usr/bin/env python
"""`mmft-hf finetune` as a script: `accelerate launch examples/finetune.py ...` (see `mmft_hf/commands/finetune.py` for the flags)."""

from mmft_hf.commands.finetune import main

if __name__ == "__main__":
    main()
