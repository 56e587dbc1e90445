"""`process_group_teardown` when gloo holds the last reference to unfinished work; run by torchrun, 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/teardown_check.py

Each rank keeps its process group alive only through a `DistributedDataParallel` model in a reference cycle (as a
finished `Trainer` does). Rank 1 then starts an all_gather, drops every Python reference to it and leaves the
teardown at once; rank 0 joins the all_gather a second later. So the group is torn down while its gloo worker still
owns the all_gather's tensors and will need the GIL to free them. A teardown that frees the group holding the GIL
deadlocks here (rank 1 never exits); one that leaves the group alive into the interpreter's exit may abort. Each
rank prints its gloo threads after the teardown (`none` when the group was freed and its threads joined).
"""

import time
from pathlib import Path

import torch

from mmft_hf.commands.launch import process_group_teardown


def start_unfinished_all_gather() -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    holder = {"model": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))}
    holder["self"] = holder  # a cycle: only the garbage collector frees the model and its reducer
    del holder
    if rank == 0:
        time.sleep(1.0)
    torch.distributed.all_gather([torch.zeros(4) for _ in range(2)], torch.full((4,), float(rank)), async_op=True)


with process_group_teardown():
    start_unfinished_all_gather()
threads = sorted(
    name for task in Path("/proc/self/task").iterdir() if "gloo" in (name := (task / "comm").read_text().strip())
)
print(f"gloo threads after the teardown: {', '.join(threads) or 'none'}", flush=True)
