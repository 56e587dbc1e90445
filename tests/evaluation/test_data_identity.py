"""The sweep fingerprint identifies the data: replacing a dataset's images or captions under the same names and row
counts is caught as a user would meet it (`mmft-hf benchmark --dataset shapes=DIR`, real files in a tmp dir)."""

import json
import os
import shutil

import datasets
import pytest
from PIL import Image

from mmft_hf.commands import benchmark
from mmft_hf.evaluation import dataset_settings, hub_revision, read_results
from mmft_hf.synthetic import make_synthetic_dataset

TINY = ["--shots", "2", "--seeds", "1", "--num_train_epochs", "1", "--per_device_train_batch_size", "8"]


def draw(seed: int) -> datasets.DatasetDict:
    return make_synthetic_dataset(num_classes=4, train_per_class=4, eval_per_class=2, seed=seed)


def replace_folder(path, dataset: datasets.DatasetDict) -> None:
    shutil.rmtree(path)
    dataset.save_to_disk(str(path))


def test_other_images_under_the_same_names_and_counts_are_refused(tmp_path):
    data, out = tmp_path / "shapes", tmp_path / "results"
    draw(seed=0).save_to_disk(str(data))
    command = ["--dataset", f"shapes={data}", "--methods", "zeroshot", *TINY, "--output_dir", str(out)]
    assert len(benchmark.main(command)["ran"]) == 1
    stored = (out / "results.jsonl").read_text()

    replace_folder(data, draw(seed=1))  # other images, same class names and row counts
    with pytest.raises(ValueError, match=r"(?s)other settings.*dataset\.content_sha256\.test"):
        benchmark.main(command)
    assert (out / "results.jsonl").read_text() == stored  # nothing ran, nothing was added

    replace_folder(data, draw(seed=0))  # the original data again: the stored cell is reused
    assert benchmark.main(command)["ran"] == []


def test_image_files_replaced_in_a_folder_dataset_are_refused(tmp_path):
    """An image folder stores paths: the hash must read the files' bytes."""
    data, out = tmp_path / "folder", tmp_path / "results"
    images = draw(seed=0)
    names = images["train"].features["label"].names
    for split in ("train", "test"):
        for index, row in enumerate(images[split]):
            folder = data / split / names[row["label"]].replace(" ", "_")
            os.makedirs(folder, exist_ok=True)
            row["image"].save(folder / f"{index:03d}.png")
    command = ["--dataset", f"folder={data}", "--methods", "zeroshot", *TINY, "--output_dir", str(out)]
    assert len(benchmark.main(command)["ran"]) == 1

    first = next((data / "test").rglob("*.png"))
    Image.new("RGB", (32, 32), (255, 255, 255)).save(first)  # one test image replaced under its own name
    with pytest.raises(ValueError, match=r"(?s)other settings.*dataset\.content_sha256\.test"):
        benchmark.main(command)
    assert len(read_results(str(out / "results.jsonl"))) == 1


def test_replaced_captions_are_refused_for_the_methods_that_read_them(tmp_path):
    data, out = tmp_path / "shapes", tmp_path / "results"
    original = draw(seed=0)
    original.save_to_disk(str(data))
    command = ["--dataset", f"shapes={data}", *TINY, "--output_dir", str(out)]
    assert len(benchmark.main([*command, "--methods", "zeroshot,mmft"])["ran"]) == 2

    recaptioned = original.map(lambda row: {"captions": [f"another caption {i}" for i in range(3)]})
    replace_folder(data, recaptioned)
    # another seed of mmft would be averaged with the old captions' cell: refused, naming the captions' hash
    with pytest.raises(ValueError, match=r"(?s)dataset\.captions_sha256:.*stored: shapes/mmft/2-shot/seed 1"):
        benchmark.main([*command, "--methods", "zeroshot,mmft", "--seeds", "1,2"])
    # zero-shot reads no caption: its stored cell still holds
    assert benchmark.main([*command, "--methods", "zeroshot"])["ran"] == []
    assert len(read_results(str(out / "results.jsonl"))) == 2


def test_hub_datasets_are_identified_by_their_revision(tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "org___shapes" / "default" / "0.0.0" / revision
    small = draw(seed=0)
    small["train"].save_to_disk(str(cache))
    train = datasets.load_from_disk(str(cache))
    assert hub_revision(train) == revision
    assert hub_revision(small["train"]) is None  # in memory: no revision, the content is hashed
    hub = datasets.DatasetDict({**small, "train": train})
    facts = dataset_settings(hub, source="org/shapes")
    assert facts["hub_revision"] == revision and "content_sha256" not in facts
    local = dataset_settings(hub, source=str(cache))
    assert "hub_revision" not in local and set(local["content_sha256"]) == {"train", "validation", "test"}
    assert json.dumps(local)  # JSON values only
