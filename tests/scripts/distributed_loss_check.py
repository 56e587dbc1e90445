"""One DDP step of the global-batch MMFT loss on the tiny CLIP; launched by tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/distributed_loss_check.py OUT.pt

Every rank builds the same model and the same fixed batch of 8, takes its rows of it, runs the model wrapped in
`DistributedDataParallel` (gloo, CPU), gathers embeddings and labels, computes `mmft_loss` on the global logits
and backpropagates. This is done for each split of the 8 rows in `SPLITS` (equal and unequal local batches).
Rank 0 saves, per split, the loss seen by every rank, the gathered labels, the DDP-averaged gradient of every
parameter and the loss of its local batch alone; the test compares them with one process on the full batch.

`build_model_and_batch` is also imported by the test, so both sides use exactly the same model and data.
"""

from __future__ import annotations

import argparse

import torch

from mmft_hf.commands.launch import process_group_teardown
from mmft_hf.synthetic import build_clip, build_word_tokenizer
from mmft_hf.training.distributed import gather_batch, global_logits
from mmft_hf.training.losses import mmft_loss

LABELS = [0, 1, 0, 2, 1, 3, 0, 2]  # positives within and across ranks; label 3 has none (excluded anchor)
SPLITS = {"even": (4, 4), "uneven": (5, 3)}


def build_model_and_batch(dtype: torch.dtype = torch.float64):
    """The tiny CLIP (seed 0) and the fixed batch of 8: `(model, inputs, labels)`; same on every process.

    Token ids are drawn from a seeded generator rather than tokenised: a BPE vocabulary trained in two processes
    may number tied merges differently, and the test must not depend on that.
    """
    tokenizer = build_word_tokenizer(["red", "circle", "square"])
    torch.manual_seed(0)
    model, _ = build_clip(tokenizer)
    model = model.to(dtype).train()
    generator = torch.Generator().manual_seed(1)
    batch_size, max_length = len(LABELS), 12
    lengths = torch.randint(3, max_length + 1, (batch_size,), generator=generator)  # BOS ... EOS, then padding
    input_ids = torch.randint(2, len(tokenizer), (batch_size, max_length), generator=generator)
    positions = torch.arange(max_length)
    input_ids[:, 0] = 0  # <|startoftext|>
    input_ids[positions >= lengths[:, None] - 1] = 1  # <|endoftext|> (CLIP pools at the first one), also padding
    attention_mask = (positions < lengths[:, None]).long()
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator, dtype=dtype)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    return model, inputs, torch.tensor(LABELS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", help="where rank 0 writes its results (torch.save)")
    parser.add_argument("--supcon-weight", type=float, default=0.5)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model, inputs, labels = build_model_and_batch()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    # DDP broadcasts rank 0's parameters; saving them (and the batch) lets the test rebuild exactly this setup.
    results = {"world_size": world_size, "state_dict": model.state_dict(), "inputs": inputs, "labels": labels}
    for name, sizes in SPLITS.items():
        assert len(sizes) == world_size, f"split {name} is for {len(sizes)} processes"
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        local = {key: value[start:stop] for key, value in inputs.items()}
        ddp.zero_grad(set_to_none=True)
        out = ddp(**local, return_dict=True)
        image_embeds, text_embeds, all_labels = gather_batch(out.image_embeds, out.text_embeds, labels[start:stop])
        logits_per_image, logits_per_text = global_logits(image_embeds, text_embeds, ddp.module.logit_scale.exp())
        loss = mmft_loss(logits_per_image, logits_per_text, all_labels, supcon_weight=args.supcon_weight)
        loss.backward()  # DDP averages the gradients over the processes here

        losses = [torch.zeros_like(loss) for _ in range(world_size)]
        torch.distributed.all_gather(losses, loss.detach())
        with torch.no_grad():  # negative control: the loss a process would see without gathering
            local_logits = global_logits(out.image_embeds, out.text_embeds, ddp.module.logit_scale.exp())
            local_loss = mmft_loss(*local_logits, labels[start:stop], supcon_weight=args.supcon_weight)
        results[name] = {
            "losses": torch.stack(losses),
            "labels": all_labels,
            "local_loss": local_loss,
            "grads": {
                key: (None if p.grad is None else p.grad.detach().clone()) for key, p in model.named_parameters()
            },
        }
    if rank == 0:
        torch.save(results, args.output)
    torch.distributed.barrier()


if __name__ == "__main__":
    with process_group_teardown():  # frees the group (held by the DDP model) before exit, as the commands do
        main()
