"""Exact resume: a demo run killed with SIGKILL and resumed with `--resume_from_checkpoint last` ends with the
weights and metrics of the uninterrupted run, with 0 and with 2 DataLoader workers; and the output-dir rules of
transformers' example scripts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

from mmft_hf import MMFTTrainingArguments
from mmft_hf.commands import finetune
from mmft_hf.training.arguments import last_complete_checkpoint, resolve_resume_checkpoint

FINETUNE = Path(REPO_ROOT) / "examples" / "finetune.py"
# 4 classes x 8 training images, batch 8: 4 steps per epoch, 12 steps; a checkpoint and an evaluation every 3
# steps, so the kill and the resume fall inside an epoch.
DEMO = [
    "--demo_num_classes", "4", "--demo_train_per_class", "8", "--num_train_epochs", "3",
    "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "3",
    "--eval_strategy", "steps", "--eval_steps", "3", "--load_best_model_at_end", "false",
    "--save_total_limit", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "7",
]  # fmt: skip
KILL_AFTER = "checkpoint-6"  # a complete checkpoint in the middle of epoch 2


def finetune_command(out: Path, workers: int, *extra: str) -> list[str]:
    return [sys.executable, str(FINETUNE), "--output_dir", str(out), *DEMO, "--dataloader_num_workers",
            str(workers), *extra]  # fmt: skip


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}


def run_to_end(out: Path, workers: int, *extra: str) -> None:
    result = subprocess.run(
        finetune_command(out, workers, *extra), env=environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def run_and_kill(out: Path, workers: int) -> None:
    """Starts the run, and SIGKILLs it as soon as `KILL_AFTER` is complete (its trainer_state.json is written)."""
    process = subprocess.Popen(
        finetune_command(out, workers), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    marker = out / KILL_AFTER / "trainer_state.json"
    deadline = time.monotonic() + 300
    try:
        while not marker.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{process.stderr.read()[-4000:]}")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        try:  # DataLoader workers notice their parent's death and exit; end any straggler of this session
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # killed before the end


def logged(out: Path, key: str) -> list[tuple[int, float]]:
    """`(step, value)` of every `key` in the log history of the run's last checkpoint."""
    state = json.loads((Path(last_complete_checkpoint(str(out))) / "trainer_state.json").read_text())
    return [(entry["step"], entry[key]) for entry in state["log_history"] if key in entry]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference run, in this process (one import less; one thread, as in the subprocesses)."""
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    finetune.main(finetune_command(out, workers=0)[2:])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(uninterrupted, tmp_path, workers):
    out = tmp_path / "resumed"
    run_and_kill(out, workers)
    resumed_from = last_complete_checkpoint(str(out))
    assert int(resumed_from.rsplit("-", 1)[1]) < 12  # the resumed run has steps left to train
    run_to_end(out, workers, "--resume_from_checkpoint", "last")

    reference = load_file(str(uninterrupted / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    difference = max((reference[name] - resumed[name]).abs().max().item() for name in reference)
    print(f"resumed from {os.path.basename(resumed_from)} of 12 steps, {workers} workers: max |resumed - uninterrupted|"
          f" weight difference {difference:.3g}")  # fmt: skip
    assert difference == 0.0
    reference_results = json.loads((uninterrupted / "all_results.json").read_text())
    resumed_results = json.loads((out / "all_results.json").read_text())
    assert resumed_results["after"]["test_accuracy"] == reference_results["after"]["test_accuracy"]
    for key in ("eval_accuracy", "loss"):  # every logged step, before and after the kill
        assert logged(out, key) == logged(uninterrupted, key)


def training_args(out: Path, **overrides) -> MMFTTrainingArguments:
    return MMFTTrainingArguments(output_dir=str(out), use_cpu=True, **overrides)


def write_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_output_dir_rules_follow_the_example_scripts(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume_checkpoint(training_args(out)) is None  # a new directory: a new run
    out.mkdir()
    assert resolve_resume_checkpoint(training_args(out)) is None  # an empty one too
    (out / "README.md").write_text("a finished run")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        resolve_resume_checkpoint(training_args(out))
    assert resolve_resume_checkpoint(training_args(out, overwrite_output_dir=True)) is None
    with pytest.raises(ValueError, match="no checkpoint-\\* folder"):
        resolve_resume_checkpoint(training_args(out, resume_from_checkpoint="last"))

    write_checkpoint(out, 4)
    last = write_checkpoint(out, 12)
    write_checkpoint(out, 16, complete=False)  # killed while saving it
    for flag in (None, "true", "last", "True"):
        assert resolve_resume_checkpoint(training_args(out, resume_from_checkpoint=flag)) == str(last)
    assert resolve_resume_checkpoint(training_args(out, overwrite_output_dir=True)) is None
    named = str(out / "checkpoint-4")
    assert resolve_resume_checkpoint(training_args(out, resume_from_checkpoint=named)) == named
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(training_args(out, resume_from_checkpoint=str(out / "checkpoint-99")))


def test_stateless_draws_do_not_depend_on_the_sampler_stream():
    """The collator's keys come with the indices: the same key gives the same draw whatever came before."""
    from mmft_hf.training.collator import EpochSampler

    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(0)
    list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first and {epoch for epoch, _ in first} == {2}
    assert sorted(index for _, index in first) == list(range(10))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert [index for _, index in first] == expected
