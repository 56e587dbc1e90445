"""End-to-end runs of examples/finetune.py: the offline demo in-process, and a real two-process run whose first
optimiser step must equal a one-process step on the same global batch."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from conftest import run_torchrun
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel

from mmft_hf import MMFTTrainer, MMFTTrainingArguments, cli, load_class_prototypes
from mmft_hf.commands import finetune as finetune_command

REPO_ROOT = Path(__file__).resolve().parents[2]
FINETUNE = REPO_ROOT / "examples" / "finetune.py"
REPORT_PROCESS_GROUP = REPO_ROOT / "tests" / "scripts" / "report_process_group.py"


def load_finetune_module():
    return finetune_command


def test_offline_demo_trains_evaluates_and_saves_then_a_rerun_ends_at_once(tmp_path, capfd):
    finetune = load_finetune_module()
    out = tmp_path / "demo"
    argv = [
        "--output_dir", str(out),
        "--num_train_epochs", "8",
        "--demo_num_classes", "4",
        "--demo_train_per_class", "8",
        "--per_device_train_batch_size", "16",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    results = finetune.main(argv)
    before, after = results["before"]["test_before_accuracy"], results["after"]["test_accuracy"]
    assert after > before
    # quiet: no progress bar per checkpoint written, and one line per evaluation, without the per-class dictionary
    log = capfd.readouterr()
    assert "Writing model shards" not in log.err + log.out
    assert "eval_accuracy" in log.out and "accuracy_red circle" not in log.out + log.err
    # a second run finds the finished run and trains nothing
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert finetune.main(argv) == {}
    assert capfd.readouterr().out.strip() == (
        f"{out} is already trained, nothing to do ({finetune.summary_line(results, 4, str(out))}). To train again: "
        "--overwrite_output_dir true (or another --output_dir)."
    )
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((out / "all_results.json").read_text())["after"]["test_accuracy"] == after
    model = CLIPModel.from_pretrained(out)
    prototypes, labels, _ = load_class_prototypes(str(out))
    assert labels == ["red circle", "green square", "blue triangle", "yellow cross"]
    assert prototypes.shape == (4, model.config.projection_dim)
    assert (out / "README.md").is_file()


def test_demo_defaults_yield_to_explicit_flags():
    finetune = load_finetune_module()
    _, _, _, args, demo = finetune.parse_arguments(["--output_dir", "x", "--learning_rate", "0.5"])
    assert demo and args.learning_rate == 0.5 and args.num_train_epochs == 30
    _, _, _, args, demo = finetune.parse_arguments(
        ["--output_dir", "x", "--dataset_name", "d", "--model_name_or_path", "m"]
    )
    assert not demo and args.learning_rate == 1e-5 and args.num_train_epochs == 50  # the paper's defaults


def test_a_dataset_without_a_model_is_an_error_naming_the_flag(tmp_path, capsys, monkeypatch):
    """The demo's small random CLIP trains only in the demo: never silently on the user's data."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = tmp_path / "out"
    assert cli.main(["finetune", "--dataset_name", "me/captioned-dtd", "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        "mmft-hf finetune: error: --model_name_or_path is missing: name the model to fine-tune on --dataset_name "
        "me/captioned-dtd, e.g. --model_name_or_path openai/clip-vit-base-patch32. (The offline demo's small random "
        "CLIP runs only when neither --model_name_or_path nor --dataset_name is given.)\n"
    )
    assert not out.exists()


def test_lora_raises_no_deprecation_warning_of_transformers(tiny_clip):
    model, _ = tiny_clip
    args = MMFTTrainingArguments(output_dir="unused", use_lora=True, use_cpu=True, report_to="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = MMFTTrainer._wrap_lora(model, args)
    assert hasattr(wrapped, "get_base_model")  # a peft model
    assert [str(warning.message) for warning in caught if issubclass(warning.category, FutureWarning)] == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--supcon_weight", "1.5"], r"^--supcon_weight must be in \[0, 1\]"),
        (["--crop_scale_min", "0"], r"^--crop_scale_min must be in \(0, 1\]"),
        (["--class_template", "a photo"], r"^--class_template must contain"),
    ],
)
def test_errors_name_the_command_line_flags(flags, message, tmp_path):
    """The library's checks name Python keywords (`supcon_weight`); under the command they name its flags."""
    finetune = load_finetune_module()
    with pytest.raises(ValueError, match=message):
        finetune.main(["--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_splits_follow_the_benchmark_protocol_and_the_label_column(tmp_path, synthetic_dataset):
    """Labels in another column and no validation split: the seeded hold-out and the k-shot sample read
    `--label_column`; a split named on the command line must exist."""
    finetune = load_finetune_module()
    root = tmp_path / "shapes"
    for split in ("train", "test"):
        dataset = synthetic_dataset[split].rename_column("label", "category")
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    base = ["--output_dir", str(tmp_path / "out"), "--dataset_name", str(root), "--label_column", "category"]
    base += ["--model_name_or_path", "unused"]  # parsed, not loaded
    _, data_args, _, training_args, _ = finetune.parse_arguments([*base, "--num_shots", "2", "--seed", "3"])
    splits, protocol = finetune.load_splits(data_args, training_args, None)
    assert protocol == "seeded 90/10 train/validation split" and list(splits) == ["train", "validation", "test"]
    assert sorted(splits["train"]["category"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(splits["validation"]) == 3 and len(splits["test"]) == 16  # about 10 % of the 32 training rows
    for flag, name in (("--validation_split", "dev"), ("--test_split", "heldout")):
        _, data_args, _, training_args, _ = finetune.parse_arguments([*base, flag, name])
        with pytest.raises(ValueError, match=f"split '{name}' is not in the dataset"):
            finetune.load_splits(data_args, training_args, None)


def write_solid_color_dataset(root: Path) -> Path:
    """8 one-color images (crops of a flat image are identical, so augmentation cannot differ between runs)."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)] * 2
    rows = {
        "image": [Image.new("RGB", (40, 36), color) for color in colors],
        "label": [0, 1, 2, 3, 0, 1, 2, 3],
        "captions": [[f"a flat {name} square"] for name in ("red", "green", "blue", "yellow") * 2],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["red", "green", "blue", "yellow"]),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    for split in ("train", "validation"):
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def run_finetune(nproc: int, batch_size: int, data_dir: Path, model_dir: str, out: Path, *flags: str):
    """Runs examples/finetune.py under torchrun (through `report_process_group.py`), one SGD step, with more `flags`;
    returns the finished process."""
    return run_torchrun(
        nproc, REPORT_PROCESS_GROUP, FINETUNE,
        "--model_name_or_path", model_dir, "--dataset_name", str(data_dir),
        "--output_dir", str(out), "--use_cpu", "true", "--max_steps", "1",
        "--per_device_train_batch_size", str(batch_size), "--optim", "sgd", "--learning_rate", "0.5",
        "--weight_decay", "0", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--disable_tqdm", "true", "--seed", "0", *flags,
    )  # fmt: skip


@pytest.fixture(scope="module")
def global_batch_run(tmp_path_factory, tiny_clip_dir) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The solid-colour dataset, and one process trained on it with the global batch of 8 (what two processes of 4
    each must reproduce): `(data_dir, output_dir, finished process)`."""
    root = tmp_path_factory.mktemp("global-batch")
    data_dir = write_solid_color_dataset(root / "data")
    return data_dir, root / "one", run_finetune(1, 8, data_dir, tiny_clip_dir, root / "one")


def assert_clean_exit(finished: subprocess.CompletedProcess, nproc: int = 2) -> None:
    """Every rank exited 0 (run_torchrun checks) with its process group destroyed and freed by the command."""
    for rank in range(nproc):
        assert f"rank {rank}: process group alive after the command: False" in finished.stdout
        assert f"rank {rank}: gloo threads after the command: none" in finished.stdout


def test_two_processes_train_like_one_process_on_the_global_batch(tmp_path, tiny_clip_dir, global_batch_run):
    data_dir, one_dir, one_process = global_batch_run
    two_processes = run_finetune(2, 4, data_dir, tiny_clip_dir, tmp_path / "two")
    # the launch is logged once, by the main process: world size and the global contrastive batch
    launches = [line for line in two_processes.stderr.splitlines() if "Launch: " in line]
    assert len(launches) == 1 and launches[0].endswith(
        "Launch: world size 2; contrastive batch 8 = per-device batch 4 x 2 devices."
    ), launches
    assert "Launch: world size 1; contrastive batch 8 = per-device batch 8 x 1 device." in one_process.stderr
    assert_clean_exit(two_processes)
    # the card names the local model and dataset by their folders, not by paths of this machine
    card = (tmp_path / "two" / "README.md").read_text()
    assert str(data_dir.parent) not in card and tiny_clip_dir not in card
    assert f"base_model: {Path(tiny_clip_dir).name}\n" in card and "- data\n" in card
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    one = load_file(str(one_dir / "model.safetensors"))
    start = load_file(os.path.join(tiny_clip_dir, "model.safetensors"))
    moved = max((one[name] - start[name]).abs().max().item() for name in one)
    assert moved > 1e-3  # the step changed the weights
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_save_the_wise_ft_interpolation_chosen_on_validation(tmp_path, tiny_clip_dir, global_batch_run):
    """`--wise_ft_alpha 0,0.5,1` under torchrun: every rank evaluates every alpha, rank 0 alone writes; the saved
    weights are (1 - alpha) * start + alpha * fine-tuned, fine-tuned being the one-process run on the global batch."""
    data_dir, one_dir, _ = global_batch_run
    out = tmp_path / "two"
    # evaluation batches of 2: each rank classifies half of the 8 validation rows (with batches of 8, rank 0 would
    # classify all of them and rank 1 only padding, so rank 1's weights would never show)
    flags = ["--wise_ft_alpha", "0,0.5,1", "--do_eval", "true", "--per_device_eval_batch_size", "2"]
    finished = run_finetune(2, 4, data_dir, tiny_clip_dir, out, *flags)
    assert_clean_exit(finished)
    assert finished.stdout.count("validation accuracy after fine-tuning") == 1  # one summary: rank 0's
    results = json.loads((out / "all_results.json").read_text())
    curve = results["wise_ft_curve"]
    assert [point["alpha"] for point in curve] == [0.0, 0.5, 1.0]
    alpha = results["wise_ft_alpha"]
    best = max(curve, key=lambda point: point["validation_accuracy"])  # the first of equals
    assert alpha == best["alpha"]
    # both ends of the curve, on every rank's share of the rows: the starting model (as evaluated before training)
    # and the fine-tuned one (as the one-process run on the global batch evaluated it)
    assert curve[0]["validation_accuracy"] == results["before"]["validation_before_accuracy"]
    one_process = json.loads((one_dir / "all_results.json").read_text())
    assert curve[-1]["validation_accuracy"] == one_process["after"]["validation_accuracy"]
    assert 0 < alpha < 1, f"{curve}: an interior alpha is no longer the best; the weight check below needs a mix"
    # the whole validation split was classified (gathered from both ranks), and the saved model is the chosen
    # point: its accuracy after saving is the curve's
    assert results["after"]["validation_samples"] == 8
    assert results["after"]["validation_accuracy"] == pytest.approx(best["validation_accuracy"])
    assert (out / "wise_ft_curve.png").is_file() and f"**α = {alpha}**" in (out / "README.md").read_text()
    saved = load_file(str(out / "model.safetensors"))
    finetuned = load_file(str(one_dir / "model.safetensors"))
    start = load_file(os.path.join(tiny_clip_dir, "model.safetensors"))
    assert saved.keys() == finetuned.keys()
    for name in saved:
        expected = (
            (1 - alpha) * start[name] + alpha * finetuned[name] if saved[name].is_floating_point() else start[name]
        )
        torch.testing.assert_close(saved[name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_a_retrain_that_stops_early_is_not_reported_as_finished(tmp_path, monkeypatch):
    """`--overwrite_output_dir true` into a finished run's folder, stopped during training: the old run's
    all_results.json must not make the next run report the folder as already trained."""
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--num_train_epochs", "1", "--demo_num_classes", "2",
            "--demo_train_per_class", "4", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]  # fmt: skip
    finetune_command.main(argv)
    args = finetune_command.parse_arguments(argv)[3]
    assert finetune_command.finished_run(args) is not None  # the finished run is detected

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MMFTTrainer, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        finetune_command.main([*argv, "--overwrite_output_dir", "true"])
    assert finetune_command.finished_run(args) is None


@pytest.mark.parametrize("resume, finished", [("False", True), ("none", True), ("last", False)])
def test_resume_flag_is_read_as_resolve_resume_checkpoint_reads_it(tmp_path, resume, finished):
    """A finished folder (final model config + all_results.json): `--resume_from_checkpoint False` asks for no
    checkpoint, so the run is reported as finished; `last` asks to train from the last checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    (out / "all_results.json").write_text(json.dumps({"after": {"test_accuracy": 0.5}}))
    args = finetune_command.parse_arguments(["--output_dir", str(out), "--resume_from_checkpoint", resume])[3]
    assert (finetune_command.finished_run(args) is not None) == finished
