"""Runs a command script as `__main__` (under torchrun), then prints whether the process group outlived it.

Usage: `report_process_group.py SCRIPT [ARGS...]`. Prints, per rank, `process group alive after the command: <bool>`
and `gloo threads after the command: <names>` (the threads gloo names `pt_gloo_runloop` and `gloo_tcp_loop`, read from
/proc; `none` when the group was freed and its threads joined; a group left to the interpreter's exit can abort it).
"""

import os
import runpy
import sys
from pathlib import Path

import torch

script, *arguments = sys.argv[1:]
sys.argv = [script, *arguments]
runpy.run_path(script, run_name="__main__")
rank = os.environ.get("RANK", "0")
print(f"rank {rank}: process group alive after the command: {torch.distributed.is_initialized()}", flush=True)
thread_names = [Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
gloo_threads = sorted(name for name in thread_names if "gloo" in name)
print(f"rank {rank}: gloo threads after the command: {', '.join(gloo_threads) or 'none'}", flush=True)
