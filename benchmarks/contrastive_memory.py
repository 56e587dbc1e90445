"""Peak memory and steps/s of an MMFT training step against the per-device batch, plain vs gradient-cached.

For each per-device batch size the same `MMFTTrainer.training_step` runs twice: plain (one forward and backward
over the batch) and with `contrastive_chunk_size` (GradCache: the batch embedded in chunks, the loss over the whole
batch). Every configuration runs in a fresh subprocess so that peak figures are comparable: CUDA's
`max_memory_allocated` where there is a GPU, else the peak resident set size (`ru_maxrss`) and its rise over the
resident size before the first step (the model, batch and imports are the same in both modes; the rise is the
steps' activations, gradients and optimiser state). Steps/s come from the median step time (robust to other work
on a shared machine). Prints a table with the chunked / plain ratios.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/contrastive_memory.py
    .venv/bin/python benchmarks/contrastive_memory.py --batch_sizes 64,128,256 --chunk_size 32 --hidden_size 256
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mmft_hf import MMFTTrainer, MMFTTrainingArguments
from mmft_hf.synthetic import build_clip, build_word_tokenizer, caption_vocabulary, make_synthetic_dataset


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(options) -> dict:
    """One configuration in this process: builds the model and a fixed batch, times `--steps` optimiser steps."""
    device = "cuda" if torch.cuda.is_available() and not options.cpu else "cpu"
    dataset = make_synthetic_dataset(num_classes=4, train_per_class=2, eval_per_class=1, seed=0)["train"]
    tokenizer = build_word_tokenizer(caption_vocabulary(dataset, extra_text="a photo of a"))
    torch.manual_seed(0)
    model, processor = build_clip(
        tokenizer,
        image_size=options.image_size,
        patch_size=options.patch_size,
        hidden_size=options.hidden_size,
        num_hidden_layers=options.layers,
        projection_dim=options.hidden_size,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = MMFTTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=options.batch_size,
            contrastive_chunk_size=options.chunk_size,
            use_cpu=device == "cpu",
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            report_to=[],
            disable_tqdm=True,
            seed=0,
        )
        trainer = MMFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
    generator = torch.Generator().manual_seed(0)
    size, length = options.batch_size, options.text_length
    batch = {
        "input_ids": torch.randint(2, len(tokenizer), (size, length), generator=generator),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "pixel_values": torch.randn(size, 3, options.image_size, options.image_size, generator=generator),
        "labels": torch.randint(0, 8, (size,), generator=generator),
    }
    batch["input_ids"][:, -1] = 1  # CLIP pools at the end-of-text token
    model = trainer.model.to(device)

    def step():
        trainer.training_step(model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    rss_before = current_rss_bytes()  # model, batch and imports: the same in both modes
    step()  # warm-up: allocator pools, optimiser state (in both peaks alike)
    if device == "cuda":
        torch.cuda.synchronize()
    durations = []
    for _ in range(options.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    # the median step: robust to a burst of other work on a shared machine
    result = {"device": device, "steps_per_second": 1 / statistics.median(durations)}
    if device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = peak_rss_bytes()
        result["rise_bytes"] = result["peak_bytes"] - rss_before
    return result


def run_fresh(options, batch_size: int, chunk_size: int | None) -> dict:
    """`measure` in a fresh Python process (its own peak RSS / CUDA peak)."""
    command = [sys.executable, __file__, "--worker", "--batch_size", str(batch_size)]
    command += ["--chunk_size", str(chunk_size or 0)]
    for name in ("image_size", "patch_size", "hidden_size", "layers", "text_length", "steps"):
        command += [f"--{name}", str(getattr(options, name))]
    command += ["--cpu"] if options.cpu else []
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def mebibytes(value: int) -> str:
    return f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", default="32,64,128,256", help="comma-separated per-device batch sizes")
    parser.add_argument("--chunk_size", type=int, default=16, help="contrastive_chunk_size of the chunked runs")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7, help="timed optimiser steps per configuration (median)")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even where there is a GPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        options.chunk_size = options.chunk_size or None
        print(json.dumps(measure(options)))
        return

    rows = []
    for batch_size in [int(size) for size in options.batch_sizes.split(",")]:
        plain = run_fresh(options, batch_size, None)
        chunked = run_fresh(options, batch_size, options.chunk_size)
        rows.append((batch_size, plain, chunked))
    device = rows[0][1]["device"]
    cuda = device == "cuda"
    print(
        f"device: {device}; CLIP hidden {options.hidden_size}, {options.layers} layers per tower, image "
        f"{options.image_size}px / patch {options.patch_size}, text {options.text_length} tokens; chunk "
        f"{options.chunk_size}; median of {options.steps} timed steps after one warm-up"
    )
    memory = "peak CUDA allocated MiB" if cuda else "peak RSS MiB (rise over pre-step RSS)"
    print(
        f"| batch | plain {memory} | chunked {memory} | chunked/plain | plain steps/s | chunked steps/s | chunked/plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch_size, plain, chunked in rows:
        key = "peak_bytes" if cuda else "rise_bytes"
        if cuda:
            plain_memory, chunked_memory = mebibytes(plain[key]), mebibytes(chunked[key])
        else:
            plain_memory = f"{mebibytes(plain['peak_bytes'])} ({mebibytes(plain[key])})"
            chunked_memory = f"{mebibytes(chunked['peak_bytes'])} ({mebibytes(chunked[key])})"
        print(
            f"| {batch_size} | {plain_memory} | {chunked_memory} | {chunked[key] / plain[key]:.2f} "
            f"| {plain['steps_per_second']:.2f} | {chunked['steps_per_second']:.2f} "
            f"| {chunked['steps_per_second'] / plain['steps_per_second']:.2f} |"
        )


if __name__ == "__main__":
    main()
