"""What the training commands do around a run: say how it was launched, and end the process group cleanly.

`torchrun` / `accelerate launch` start one process per device; `TrainingArguments` joins them into a process group
the first time it is asked for its device. A process that exits with that group alive can abort (SIGABRT): gloo's
worker threads release finished work, whose tensors need the GIL, while the interpreter is shutting down. So every
command runs inside `process_group_teardown()`, which ends the group and joins its threads before the process exits.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import TrainingArguments


def launch_summary(args: TrainingArguments) -> str:
    """One line: the world size, the contrastive batch (the images of one step, whose captions are each other's
    negatives: per-device batch × devices) and the optimizer batch (× gradient accumulation steps)."""
    world = args.world_size
    devices = world * max(1, args.n_gpu)  # one process driving several GPUs (torch.nn.DataParallel) splits its batch
    contrastive = args.per_device_train_batch_size * devices
    summary = (
        f"world size {world}; contrastive batch {contrastive} = per-device batch {args.per_device_train_batch_size} "
        f"x {devices} device{'s' if devices > 1 else ''}"
    )
    if args.gradient_accumulation_steps > 1:
        summary += (
            f"; optimizer batch {contrastive * args.gradient_accumulation_steps} = contrastive batch x "
            f"{args.gradient_accumulation_steps} gradient accumulation steps (accumulation adds no negatives)"
        )
    return summary + "."


def log_launch(args: TrainingArguments, logger: logging.Logger) -> None:
    """Logs `launch_summary` once, from the main process (a run meant for several processes that shows world size
    1 was started without the launcher's process count)."""
    if args.process_index == 0:
        logger.info(f"Launch: {launch_summary(args)}")


@contextmanager
def process_group_teardown() -> Iterator[None]:
    """Destroys the default process group, if one was created, when the block ends (normally or not), and frees it.

    `destroy_process_group` drops only torch's own references: the group lives on, with its gloo worker threads, in
    the reference cycles of a finished `Trainer` (its `DistributedDataParallel` reducer holds the group). Collecting
    them ends that, but the group must not be freed by the collection itself: the reducer frees it holding the GIL,
    and gloo's destructor waits for a worker that may need the GIL to free the tensors of finished work (a deadlock).
    So a reference is kept through the collection and dropped last: the Python handle of a process group frees it
    with the GIL released, and gloo's threads are joined while the interpreter can still serve them.
    """
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.group.WORLD
            torch.distributed.destroy_process_group()
            gc.collect()
            del world  # the last reference: the group's destructor runs here, without the GIL
