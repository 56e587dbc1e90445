"""Does the data keep up with the model? `MMFTDataCollator` images/s with 0, 1, 2 and N DataLoader workers, next to
the images/s a training step of the model consumes.

Data: `--num_images` JPEG files of 500x375 pixels (the size of a typical DTD/Caltech photo) written to a temporary
directory, three captions each, read through a `datasets.Image()` column exactly as `MMFTTrainer` reads them
(`EpochKeyedDataset` rows, `EpochSampler` order, decode + random resized crop + processor + tokenizer in the
collator). The bare baseline, in the same run, is the least any CLIP loader must do: decode each file and call the
processor on the image and one caption, in the main process. Each loader runs `--epochs` epochs; the first is not
timed (worker start-up: workers are persistent, as `MMFTTrainingArguments` sets them up), and each timed epoch runs
from `iter(loader)`, when the workers receive their first indices, to its last batch, so prefetching cannot hide
work. N is the number of CPUs.

Model: a training step (forward, MMFT loss, backward, AdamW) on one prepared batch, on the GPU when there is one.
The default is a randomly initialised CLIP with ViT-B/32's shape (the compute of `openai/clip-vit-base-patch32`);
`--model_name_or_path` loads a real one. `data/model` above 1 means the loader feeds the model in time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dataloader_throughput.py
"""

import argparse
import os
import tempfile
import time

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from mmft_hf import MMFTDataCollator, mmft_loss
from mmft_hf.synthetic import build_clip, build_word_tokenizer
from mmft_hf.training.arguments import dataloader_defaults
from mmft_hf.training.collator import EpochKeyedDataset, EpochSampler

CLASS_NAMES = ["banded", "dotted", "striped", "woven"]


def write_images(directory: str, count: int, seed: int = 0) -> datasets.Dataset:
    """`count` 500x375 JPEGs (smooth colour fields plus noise, so that they compress like photos)."""
    rng = np.random.default_rng(seed)
    paths, labels, captions = [], [], []
    for index in range(count):
        base = rng.integers(0, 255, size=(4, 5, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(base).resize((500, 375), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-25, 25, size=field.shape), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"{index:05d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        name = CLASS_NAMES[index % len(CLASS_NAMES)]
        paths.append(path)
        labels.append(index % len(CLASS_NAMES))
        captions.append([f"a {name} surface number {index}", f"the {name} pattern repeats", f"{name} texture"])
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=CLASS_NAMES),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict({"image": paths, "label": labels, "captions": captions}, features=features)


def load_model(model_name_or_path: str | None):
    words = " ".join(CLASS_NAMES) + " a photo of the surface number pattern repeats texture"
    tokenizer = build_word_tokenizer(words.split() + [str(i) for i in range(10)])
    _, processor = build_clip(tokenizer, image_size=224, patch_size=32)
    if model_name_or_path:
        from transformers import AutoModel, AutoProcessor

        return AutoModel.from_pretrained(model_name_or_path), AutoProcessor.from_pretrained(model_name_or_path)
    config = CLIPConfig(  # ViT-B/32's shape, random weights
        text_config=dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return CLIPModel(config), processor


def bare_images_per_second(dataset: datasets.Dataset, processor, batch_size: int, epochs: int) -> float:
    """Decode + processor on the image and its first caption, in the main process: the baseline."""
    dataset = dataset.cast_column("image", datasets.Image(decode=False))

    def collate(rows):
        images = [Image.open(row["image"]["path"]).convert("RGB") for row in rows]
        texts = [row["captions"][0] for row in rows]
        return processor(images=images, text=texts, padding=True, return_tensors="pt")

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate)
    return time_loader(loader, epochs)


def collator_images_per_second(
    dataset: datasets.Dataset, processor, batch_size: int, epochs: int, workers: int
) -> float:
    """`MMFTDataCollator` on keyed rows, as `MMFTTrainer` feeds it, with `workers` persistent worker processes."""
    keyed = EpochKeyedDataset(dataset.cast_column("image", datasets.Image(decode=False)))
    collator = MMFTDataCollator(processor=processor, class_names=CLASS_NAMES, seed=0)
    sampler = EpochSampler(len(keyed), seed=0)
    loader = torch.utils.data.DataLoader(
        keyed, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip
    return time_loader(loader, epochs)


def time_loader(loader, epochs: int) -> float:
    """Images/s over epochs 1 .. `epochs - 1`, each timed from `iter(loader)` to its last batch; epoch 0 warms up."""
    images, elapsed = 0, 0.0
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(batch["input_ids"]) for batch in loader)
        if epoch:
            images, elapsed = images + count, elapsed + time.perf_counter() - start
    return images / elapsed


def model_images_per_second(model, batch: dict, steps: int, device: torch.device) -> float:
    """Training steps on one prepared batch (no data loading): images/s the model consumes."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    batch = {name: value.to(device) for name, value in batch.items()}
    labels = batch.pop("labels")

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch)
        loss = mmft_loss(out.logits_per_image.float(), out.logits_per_text.float(), labels, supcon_weight=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * labels.numel() / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=256, help="Images per epoch.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per loader; the first is not timed.")
    parser.add_argument("--model_steps", type=int, default=2, help="Timed training steps of the model.")
    parser.add_argument("--workers", type=int, nargs="*", help="Worker counts (default 0 1 2 and N).")
    parser.add_argument("--model_name_or_path", default=None)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    default_workers = dataloader_defaults(use_cpu=not torch.cuda.is_available())["dataloader_num_workers"]
    workers = args.workers if args.workers is not None else sorted({0, 1, 2, cpus})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cpus={cpus} threads={torch.get_num_threads()} device={device} default dataloader_num_workers="
          f"{default_workers} {vars(args)}")  # fmt: skip
    model, processor = load_model(args.model_name_or_path)
    with tempfile.TemporaryDirectory() as directory:
        dataset = write_images(directory, args.num_images)
        bare = bare_images_per_second(dataset, processor, args.batch_size, args.epochs)
        print(f"bare baseline (decode + processor, main process): {bare:8.1f} images/s")
        rates = {}
        for count in workers:
            rates[count] = collator_images_per_second(dataset, processor, args.batch_size, args.epochs, count)
            print(f"MMFTDataCollator, {count:2d} workers: {rates[count]:8.1f} images/s "
                  f"(x{rates[count] / bare:.2f} the bare baseline)")  # fmt: skip
        keyed = EpochKeyedDataset(dataset)
        collator = MMFTDataCollator(processor=processor, class_names=CLASS_NAMES, seed=0)
        batch = collator(keyed.__getitems__([(0, index) for index in range(args.batch_size)]))
    model_rate = model_images_per_second(model, batch, args.model_steps, device)
    print(f"model training step ({device}): {model_rate:8.1f} images/s "
          f"({model_rate / args.batch_size:.3f} steps/s at batch {args.batch_size})")  # fmt: skip
    for count, rate in rates.items():
        verdict = "keeps up" if rate >= model_rate else "the model waits"
        print(f"data/model with {count:2d} workers: {rate / model_rate:6.2f} ({verdict})")


if __name__ == "__main__":
    main()
