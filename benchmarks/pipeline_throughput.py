"""Throughput of the "mmft-classification" pipeline against a bare loop on the same batches, plus load time.

The bare loop does what the pipeline must do at minimum: processor on a batch of PIL images, `get_image_features`,
L2 normalisation, `exp(logit_scale) * features @ prototypes.T`, softmax and top-k. The pipeline adds per-image
preprocessing, its DataLoader and per-image post-processing; the printed ratio (pipeline / bare images per second)
should be >= 0.9 when compute dominates. Also timed: building a 1,000-class classifier from a directory.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pipeline_throughput.py

Model: `mmft_hf.synthetic.build_clip` with 224x224 images, patch 32, hidden size 256, 4 layers per tower,
projection 256 (random weights: speed does not depend on them). Offline, CPU unless CUDA is present.

On an idle 2-core machine the ratio was 0.89-0.99 over four runs. On a loaded one, fresh large allocations (glibc mmap + page
faults) dominated both loops and hit the pipeline harder (it concatenates per-image tensors into a new batch
buffer): 0.86. Keeping freed memory in the heap removes that effect:
`MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=2000000000` before the command (1.03 then).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPModel, pipeline  # noqa: E402

import mmft_hf.classification.pipeline  # noqa: E402, F401  (registers the task)
from mmft_hf.classification.prototypes import load_class_prototypes, save_class_prototypes  # noqa: E402
from mmft_hf.synthetic import build_clip, build_word_tokenizer  # noqa: E402


def bare_loop(model, processor, prototypes, images, batch_size, top_k, device):
    results = []
    scale = model.logit_scale.exp()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            features = model.get_image_features(pixel_values=pixels.to(device)).pooler_output
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            probabilities = (scale * features @ prototypes.T).softmax(dim=-1)
            results.append(probabilities.topk(top_k))
    return results


def timed(function, repeats):
    """Median wall time of `function()`; on CUDA the clock is read after the queued kernels have finished."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load_classes", type=int, default=1000)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["a", "photo", "of"])
    model, processor = build_clip(
        tokenizer, image_size=224, patch_size=32, hidden_size=256, num_hidden_layers=4, projection_dim=256
    )
    model.eval().to(device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(args.num_images)]
    labels = [f"class {i}" for i in range(args.num_classes)]
    prototypes = torch.nn.functional.normalize(torch.randn(args.num_classes, 256), dim=-1).to(device)
    classifier = pipeline(
        "mmft-classification",
        model=model,
        processor=processor,
        class_prototypes=prototypes,
        labels=labels,
        device=device,
    )

    def run_pipeline():
        return classifier(images, batch_size=args.batch_size, top_k=5)

    def run_bare():
        return bare_loop(model, processor, prototypes, images, args.batch_size, 5, device)

    run_pipeline(), run_bare()  # warm-up
    pipeline_times, bare_times = [], []
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        pipeline_times.append(timed(run_pipeline, 1))
        bare_times.append(timed(run_bare, 1))
    pipe_rate = args.num_images / statistics.median(pipeline_times)
    bare_rate = args.num_images / statistics.median(bare_times)
    print(f"device={device} threads={torch.get_num_threads()} images={args.num_images} batch={args.batch_size}")
    print(f"model: build_clip(image_size=224, patch_size=32, hidden_size=256, layers=4), {args.num_classes} classes")
    print(f"bare loop : {bare_rate:8.1f} images/s (median of {args.repeats})")
    print(f"pipeline  : {pipe_rate:8.1f} images/s (median of {args.repeats})")
    print(f"ratio pipeline/bare: {pipe_rate / bare_rate:.3f}x (target >= 0.9x)")

    with tempfile.TemporaryDirectory() as directory:
        cpu_model = model.to("cpu")
        cpu_model.save_pretrained(directory)
        processor.save_pretrained(directory)
        many = torch.nn.functional.normalize(torch.randn(args.load_classes, 256), dim=-1)
        save_class_prototypes(many, [f"class {i}" for i in range(args.load_classes)], directory)

        def load_pipeline():
            return pipeline("mmft-classification", model=directory, device=device)

        def load_bare():
            CLIPModel.from_pretrained(directory).to(device)
            load_class_prototypes(directory)

        load_pipeline(), load_bare()
        pipeline_load = timed(load_pipeline, args.repeats)
        bare_load = timed(load_bare, args.repeats)
        print(
            f"load {args.load_classes}-class classifier: pipeline() {pipeline_load * 1000:.0f} ms, "
            f"CLIPModel.from_pretrained + load_class_prototypes {bare_load * 1000:.0f} ms (medians)"
        )


if __name__ == "__main__":
    main()
