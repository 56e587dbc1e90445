"""MMFTTrainer training steps/s against a bare PyTorch loop: same model, data, collator, loss and optimiser.

Both runs start from the same weights, draw batches of the same size from the same synthetic captioned dataset
through `MMFTDataCollator`, compute `mmft_loss` on the model's logits and step `torch.optim.AdamW` (lr 1e-5,
weight decay 1e-4 on all parameters, no gradient clipping). The first `--warmup_steps` steps of each run are not timed. Prints both rates
and trainer / bare (target >= 0.95).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/trainer_throughput.py
"""

import argparse
import os
import tempfile
import time

import torch
from transformers import TrainerCallback

from mmft_hf import MMFTDataCollator, MMFTTrainer, MMFTTrainingArguments, mmft_loss
from mmft_hf.synthetic import build_clip, build_word_tokenizer, caption_vocabulary, make_synthetic_dataset


class StepTimer(TrainerCallback):
    """Records the time at the end of every optimiser step."""

    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def steps_per_second(stamps: list[float], warmup: int) -> float:
    timed = stamps[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def build(args):
    dataset = make_synthetic_dataset(num_classes=8, train_per_class=64, image_size=args.image_size, seed=0)["train"]
    tokenizer = build_word_tokenizer(caption_vocabulary(dataset, extra_text="a photo of a"))
    torch.manual_seed(0)
    model, processor = build_clip(
        tokenizer,
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        projection_dim=args.hidden_size,
    )
    return dataset, model, processor


def bare_loop(args) -> float:
    dataset, model, processor = build(args)
    collator = MMFTDataCollator(processor=processor, class_names=dataset.features["label"].names, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collator, drop_last=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    model.train()
    stamps = []
    while len(stamps) < args.steps:
        for batch in loader:
            labels = batch.pop("labels")
            out = model(**batch)
            loss = mmft_loss(out.logits_per_image, out.logits_per_text, labels, supcon_weight=0.1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            stamps.append(time.perf_counter())
            if len(stamps) == args.steps:
                break
    return steps_per_second(stamps, args.warmup_steps)


def trainer_loop(args) -> float:
    dataset, model, processor = build(args)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = MMFTTrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            optim="adamw_torch",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,  # the bare loop does not clip either
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_drop_last=True,
            seed=0,
        )
        trainer = MMFTTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[timer],
        )
        trainer.train()
    return steps_per_second(timer.stamps, args.warmup_steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--patch_size", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="Alternating runs of each; the best rate counts.")
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} {vars(args)}")
    bare, trained = [], []
    for _ in range(args.repeats):  # alternate, so background load hits both alike
        bare.append(bare_loop(args))
        trained.append(trainer_loop(args))
        print(f"  bare loop {bare[-1]:.3f} steps/s | MMFTTrainer {trained[-1]:.3f} steps/s")
    print(f"best: bare loop {max(bare):.3f} steps/s, MMFTTrainer {max(trained):.3f} steps/s")
    print(f"ratio trainer/bare = {max(trained) / max(bare):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
