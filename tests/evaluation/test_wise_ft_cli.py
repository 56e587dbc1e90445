"""`mmft-hf finetune --wise_ft_alpha` (one alpha, a curve) and `--retention_dataset`, and the benchmark's `wiseft`
method, on the tiny offline demo (a small random CLIP, synthetic shapes, 1-2 epochs)."""

import json
import os

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from mmft_hf.classification.prototypes import load_class_prototypes
from mmft_hf.commands import benchmark, finetune
from mmft_hf.evaluation import DEFAULT_WISE_FT_ALPHAS, read_results
from mmft_hf.evaluation.retention import load_retention_set, zero_shot_accuracy
from mmft_hf.synthetic import make_synthetic_dataset

TINY_DEMO = ["--demo_num_classes", "4", "--demo_train_per_class", "4", "--num_train_epochs", "2",
             "--per_device_train_batch_size", "8", "--eval_strategy", "epoch"]  # fmt: skip


def run_finetune(output_dir, *flags):
    results = finetune.main([*TINY_DEMO, "--output_dir", str(output_dir), *flags])
    with open(os.path.join(output_dir, "all_results.json")) as handle:
        assert json.load(handle) == json.loads(json.dumps(results))
    return results


def saved_test_accuracy(output_dir) -> float:
    """Test accuracy of the saved model with its saved prototypes, computed here from the files alone."""
    model = CLIPModel.from_pretrained(output_dir).eval()
    processor = CLIPProcessor.from_pretrained(output_dir)
    prototypes, labels, _ = load_class_prototypes(output_dir)
    test = make_synthetic_dataset(num_classes=4, train_per_class=4, eval_per_class=8, seed=0)["test"]
    assert labels == test.features["label"].names
    with torch.no_grad():
        pixels = processor.image_processor(images=[image.convert("RGB") for image in test["image"]],
                                           return_tensors="pt")["pixel_values"]  # fmt: skip
        features = model.get_image_features(pixel_values=pixels)
        features = torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)
    predictions = (features @ prototypes.T).argmax(-1)
    return (predictions == torch.tensor(test["label"])).float().mean().item()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_alpha_zero_saves_the_starting_model(tmp_path, lora):
    lora_flags = ["--use_lora", "true", "--learning_rate", "1e-2"] if lora else []
    results = run_finetune(tmp_path / "out", "--wise_ft_alpha", "0", "--retention_dataset", "synthetic", *lora_flags)

    assert results["wise_ft_alpha"] == 0.0 and len(results["wise_ft_curve"]) == 1
    # alpha 0 is the model before fine-tuning, prototypes re-encoded: the same test and retention accuracy
    assert results["after"]["test_accuracy"] == results["before"]["test_before_accuracy"]
    assert results["retention_accuracy_after"] == results["retention_accuracy_before"]
    assert saved_test_accuracy(tmp_path / "out") == pytest.approx(results["after"]["test_accuracy"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### WiSE-FT" in card and "**α = 0.0**" in card and "best of the α" not in card
    assert not (tmp_path / "out" / "wise_ft_curve.png").exists()  # no curve for one alpha


def test_curve_saves_the_best_alpha_on_validation_and_records_every_point(tmp_path):
    out = tmp_path / "out"
    results = run_finetune(out, "--wise_ft_alpha", "0,0.5,1", "--retention_dataset", "synthetic")

    curve = results["wise_ft_curve"]
    assert [point["alpha"] for point in curve] == [0.0, 0.5, 1.0]
    assert all(
        set(point) == {"alpha", "validation_accuracy", "test_accuracy", "retention_accuracy"} for point in curve
    )
    best = max(curve, key=lambda point: point["validation_accuracy"])  # the first of equals, as documented
    assert results["wise_ft_alpha"] == best["alpha"]
    assert results["after"]["test_accuracy"] == pytest.approx(best["test_accuracy"])
    assert saved_test_accuracy(out) == pytest.approx(best["test_accuracy"])
    # alpha 0 is the starting model
    assert curve[0]["test_accuracy"] == results["before"]["test_before_accuracy"]
    assert curve[0]["retention_accuracy"] == results["retention_accuracy_before"]
    # retention after, against an independent evaluation of the saved model on the retention set
    retention = load_retention_set("synthetic")
    saved = CLIPModel.from_pretrained(out)
    independent = zero_shot_accuracy(saved, CLIPProcessor.from_pretrained(out), retention.dataset,
                                     retention.class_names)  # fmt: skip
    assert results["retention_accuracy_after"] == pytest.approx(independent) == best["retention_accuracy"]
    assert results["retention_dataset"] == "synthetic"

    card = (out / "README.md").read_text()
    assert "best of the α below on validation accuracy" in card
    assert "| alpha | validation (%) | test (%) | zero-shot on synthetic (%) |" in card
    for point in curve:
        assert f"| {point['alpha']:g} | {100 * point['validation_accuracy']:.2f} |" in card
    assert f"**{100 * results['retention_accuracy_before']:.2f} %** before fine-tuning" in card
    assert "![WiSE-FT curve](wise_ft_curve.png)" in card and (out / "wise_ft_curve.png").stat().st_size > 0


def test_bad_alphas_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--wise_ft_alpha '0,2': 2.0 is outside"):
        finetune.main([*TINY_DEMO, "--output_dir", str(tmp_path / "out"), "--wise_ft_alpha", "0,2"])
    assert not (tmp_path / "out").exists()


def test_benchmark_wiseft_chooses_alpha_on_validation_and_reports_retention(tmp_path):
    flags = ["--dataset", "synthetic", "--methods", "zeroshot,wiseft", "--shots", "2", "--seeds", "1",
             "--num_train_epochs", "1", "--synthetic_num_classes", "4", "--synthetic_train_per_class", "4",
             "--synthetic_eval_per_class", "2", "--output_dir", str(tmp_path)]  # fmt: skip
    summary = benchmark.main([*flags, "--retention_dataset", "synthetic"])
    records = {record["method"]: record for record in read_results(str(tmp_path / "results.jsonl"))}

    wiseft = records["wiseft"]
    assert [point["alpha"] for point in wiseft["wise_ft_curve"]] == list(DEFAULT_WISE_FT_ALPHAS)
    assert all(set(point) == {"alpha", "validation_accuracy"} for point in wiseft["wise_ft_curve"])  # no test peek
    best = max(wiseft["wise_ft_curve"], key=lambda point: point["validation_accuracy"])
    assert wiseft["wise_ft_alpha"] == best["alpha"]
    assert wiseft["validation_accuracy"] == best["validation_accuracy"]
    assert wiseft["settings"]["wise_ft_alphas"] == list(DEFAULT_WISE_FT_ALPHAS)
    # every cell starts from the same model: one "before"; a zero-shot cell's model is never changed
    assert wiseft["retention_accuracy_before"] == records["zeroshot"]["retention_accuracy_before"]
    assert records["zeroshot"]["retention_accuracy_after"] == records["zeroshot"]["retention_accuracy_before"]
    assert wiseft["settings"]["retention"]["dataset"] == "synthetic"
    table = summary["table"]
    assert "| wiseft |" in table and "**Zero-shot retention on synthetic**" in table
    assert f"{100 * wiseft['retention_accuracy_after']:.2f}†" in table.split("Zero-shot retention")[1]
    # a rerun without the retention set would mix cells measured differently: refused
    with pytest.raises(ValueError, match="retention"):
        benchmark.main(flags)
