"""Runs a command script as `__main__` (under torchrun), then prints whether the process group outlived it.

Usage: `report_process_group.py SCRIPT [ARGS...]`. Prints `process group alive after the command: <bool>` per rank.
"""

import os
import runpy
import sys

import torch

script, *arguments = sys.argv[1:]
sys.argv = [script, *arguments]
runpy.run_path(script, run_name="__main__")
rank = os.environ.get("RANK", "0")
print(f"rank {rank}: process group alive after the command: {torch.distributed.is_initialized()}", flush=True)
