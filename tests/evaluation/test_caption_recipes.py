"""The caption recipes as benchmark methods: `mmft-sentence` (DreamLIP-style sentence sampling) and `mmft-mix`
(VeCLIP-style mixing with the class template), parsed and run side by side with `mmft` and `flyp`."""

import json

import datasets
import pytest

from mmft_hf.commands import benchmark
from mmft_hf.evaluation import parse_method
from mmft_hf.synthetic import make_synthetic_dataset

QUICK_FLAGS = ["--num_train_epochs", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
               "--per_device_eval_batch_size", "64", "--use_cpu", "true", "--disable_tqdm", "true",
               "--save_total_limit", "1", "--report_to", "none"]  # fmt: skip


def test_recipe_methods_set_what_defines_them():
    assert parse_method("mmft-sentence").overrides == {
        "text_source": "captions", "supcon_weight": 0.1, "caption_sampling": "sentence"}  # fmt: skip
    assert parse_method("mmft-mix").overrides["template_probability"] == 0.5
    assert parse_method("mmft-mix0.25").overrides["template_probability"] == 0.25
    assert parse_method("mmft-mix1").overrides["template_probability"] == 1.0
    both = parse_method("mmft-sentence-mix0.3-w0").overrides
    assert (both["caption_sampling"], both["template_probability"], both["supcon_weight"]) == ("sentence", 0.3, 0.0)
    assert "caption_sampling" not in parse_method("mmft").overrides  # the default recipe is unchanged
    with pytest.raises(ValueError, match="template probability in 'mix2' must be in"):
        parse_method("mmft-mix2")
    for name in ("mmft-sentences", "mmft-mixed"):
        with pytest.raises(ValueError, match="unknown option"):
            parse_method(name)


def test_benchmark_runs_the_recipes_side_by_side_on_long_synthetic_captions(tmp_path):
    """One command, one table: flyp, mmft and the recipes on a long-caption synthetic dataset (a small random CLIP
    built from its words); each record carries the recipe it was trained with."""
    raw = make_synthetic_dataset(num_classes=4, train_per_class=4, eval_per_class=2, caption_types=("long",))
    location = tmp_path / "shapes-long"
    raw.save_to_disk(str(location))
    out = tmp_path / "results"
    methods = ["flyp", "mmft", "mmft-sentence", "mmft-mix"]
    summary = benchmark.main(["--dataset", f"shapes_long={location}", "--methods", ",".join(methods),
                              "--shots", "2", "--seeds", "1", "--output_dir", str(out), *QUICK_FLAGS])  # fmt: skip
    assert len(summary["ran"]) == 4
    records = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(records) == set(methods)
    recipes = {
        m: (r["settings"]["caption_sampling"], r["settings"]["template_probability"]) for m, r in records.items()
    }
    assert recipes["mmft"] == ("caption", 0.0) and recipes["flyp"] == ("caption", 0.0)
    assert recipes["mmft-sentence"] == ("sentence", 0.0) and recipes["mmft-mix"] == ("caption", 0.5)
    assert len({r["fingerprint"] for r in records.values()}) == 4
    for record in records.values():
        assert 0.0 <= record["accuracy"] <= 1.0 and record["train_steps"] > 0 and record["test_samples"] == 8
    table = (out / "results.md").read_text()
    assert all(f"| {method} |" in table for method in methods)
    # the long captions do not fit CLIP's 77 tokens with their prefix: what sentence sampling is for
    assert all(len(caption.split()) > 70 for row in datasets.load_from_disk(str(location))["train"]["captions"]
               for caption in row)  # fmt: skip


def test_a_recipe_the_arguments_cannot_run_fails_before_any_cell_trains(tmp_path):
    """`mmft-notemplate-mix` mixes in a template it does not have: the sweep stops before training `mmft`."""
    out = tmp_path / "results"
    with pytest.raises(ValueError, match="--template_probability 0.5 trains some rows on the class template alone"):
        benchmark.main(["--dataset", "synthetic", "--synthetic_num_classes", "2", "--synthetic_train_per_class", "2",
                        "--synthetic_eval_per_class", "1", "--methods", "mmft,mmft-notemplate-mix", "--shots", "1",
                        "--seeds", "1", "--output_dir", str(out), *QUICK_FLAGS])  # fmt: skip
    assert not (out / "results.jsonl").exists()
