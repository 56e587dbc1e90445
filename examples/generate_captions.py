#!/usr/bin/env python
"""`mmft-hf caption` as a script: `python examples/generate_captions.py ...` (see `mmft_hf/commands/caption.py`)."""

from mmft_hf.commands.caption import main

if __name__ == "__main__":
    main()
