"""`MMFTTrainer` under DDP with and without `--contrastive_chunk_size`; launched by tests/training/test_grad_cache.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/chunked_training_check.py OUT.pt

Every process builds the same float64 tiny CLIP and synthetic data and trains it for a few steps twice, with the
plain step and with the gradient-cached one (per-device batch 5 in chunks of 2: three chunks, the last one
short). The loss of each step runs over the batch gathered from both processes. Rank 0 saves both runs' weights and
logged losses (and the initial weights); the test checks they agree within float rounding.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from mmft_hf import MMFTTrainer, MMFTTrainingArguments
from mmft_hf.commands.launch import process_group_teardown
from mmft_hf.synthetic import build_clip, build_word_tokenizer, caption_vocabulary, make_synthetic_dataset

PER_DEVICE_BATCH, CHUNK, STEPS = 5, 2, 3


def train(dataset, tokenizer, chunk_size: int | None, output_dir: str) -> MMFTTrainer:
    torch.manual_seed(0)
    model, processor = build_clip(tokenizer)
    args = MMFTTrainingArguments(
        output_dir=output_dir,
        learning_rate=1e-3,
        max_steps=STEPS,
        per_device_train_batch_size=PER_DEVICE_BATCH,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        report_to=[],
        supcon_weight=0.5,
        contrastive_chunk_size=chunk_size,
    )
    trainer = MMFTTrainer(model=model.to(torch.float64), args=args, train_dataset=dataset, processing_class=processor)
    trainer.initial_weights = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", help="where rank 0 writes its results (torch.save)")
    output = parser.parse_args().output
    torch.set_num_threads(1)
    dataset = make_synthetic_dataset(num_classes=4, train_per_class=8, eval_per_class=1, seed=0)["train"]
    tokenizer = build_word_tokenizer(caption_vocabulary(dataset, extra_text="a photo of a"))
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, chunk_size in (("plain", None), ("chunked", CHUNK)):
            trainer = train(dataset, tokenizer, chunk_size, f"{directory}/{name}")
            results[name] = {
                "initial_weights": trainer.initial_weights,
                "weights": {key: value.detach().clone() for key, value in trainer.model.state_dict().items()},
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                "world_size": trainer.args.world_size,
                "wrapped": type(trainer.model_wrapped).__name__,
            }
    if torch.distributed.get_rank() == 0:
        torch.save(results, output)
    torch.distributed.barrier()


if __name__ == "__main__":
    with process_group_teardown():  # frees the trainers' process group before exit, as the commands do
        main()
