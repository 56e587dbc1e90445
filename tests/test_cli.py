"""The `mmft-hf` command: dispatch, `--help` per subcommand, errors naming flags, and the module path under
`python -m` and `accelerate launch -m`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmft_hf import cli
from mmft_hf.commands import benchmark, finetune
from mmft_hf.commands.flags import as_flags
from mmft_hf.version import __version__

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_SWEEP = ["--methods", "zeroshot", "--synthetic_num_classes", "2", "--synthetic_train_per_class", "2",
               "--synthetic_eval_per_class", "2", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip


def run_module(*args, timeout=240) -> subprocess.CompletedProcess:
    """Runs `python <args>` offline, one thread, with this checkout importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_usage_version_and_unknown_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in ("caption", "finetune", "benchmark"))
    assert "accelerate launch -m mmft_hf.cli" in out
    assert cli.main([]) == 2 and "usage: mmft-hf <command>" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"mmft-hf {__version__}"
    assert cli.main(["fine-tune"]) == 2 and "unknown command 'fine-tune'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [finetune, benchmark])
def test_subcommand_help_reads_as_the_command(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main sets sys.argv[0] to name the subcommand
    name = command.__name__.rsplit(".", 1)[1]
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"usage: mmft-hf {name} [--flag value ...]   (every flag is listed below)"
    assert lines[2] == command.__doc__.strip().splitlines()[0]  # the module docstring is the description
    training = out.index("training (transformers.TrainingArguments and MMFTTrainingArguments):")
    own = out.index("\nmodel:\n") if command is finetune else out.index("\nsweep (datasets, methods, shots, seeds):\n")
    assert own < training  # the command's own flags come before the ~150 TrainingArguments flags
    assert out.index("\n  --output_dir OUTPUT_DIR") > training and "\n  --supcon_weight" in out[training:]


def test_messages_name_flags_where_they_name_arguments():
    names = ["label_column", "label", "seed", "supcon_weight", "output_dir"]
    assert as_flags("supcon_weight must be in [0, 1]; pass seed=3 or set `label`.", names) == (
        "--supcon_weight must be in [0, 1]; pass --seed 3 or set `--label`."
    )
    untouched = [
        "--output_dir 'x' exists",  # already a flag
        "no column 'label_column' in the dataset",  # a quoted value
        "cannot read /data/label_column/x.png",  # a path
        "dataset.class_encode_column(label_column)",  # Python code
        "the seed and the label of row 3",  # English words
    ]
    for message in untouched:
        assert as_flags(message, names) == message


def test_errors_are_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["benchmark", "--shots", "", "--output_dir", str(tmp_path), "--use_cpu", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmft-hf benchmark: error: --shots '' names no shot count") and "Traceback" not in err
    assert cli.main(["finetune", "--supcon_weight", "3", "--output_dir", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.startswith("mmft-hf finetune: error: --supcon_weight must be in [0, 1]")


def test_in_process_run_returns_zero_and_writes_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["benchmark", *SMALL_SWEEP, "--output_dir", str(tmp_path)]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["method"] == "zeroshot" and "| zeroshot |" in capsys.readouterr().out


def test_python_dash_m_runs_the_command():
    bad = run_module("-m", "mmft_hf.cli", "benchmark", "--seeds", ",", "--use_cpu", "true")
    assert bad.returncode == 2 and "mmft-hf benchmark: error: --seeds ',' names nothing" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_accelerate_launch_dash_m_runs_the_command(tmp_path):
    out = tmp_path / "out"
    finished = run_module("-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmft_hf.cli", "benchmark",
                          *SMALL_SWEEP, "--output_dir", str(out))  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Launch: world size 1; contrastive batch" in finished.stderr  # the launch is logged, world size first
    assert len((out / "results.jsonl").read_text().splitlines()) == 1 and (out / "results.md").exists()


def test_console_script_is_the_cli():
    script = Path(sys.executable).parent / "mmft-hf"
    if not script.exists():
        pytest.skip("the package is not installed with its console scripts in this environment")
    finished = subprocess.run([str(script), "finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("usage: mmft-hf finetune [--flag value ...]")
    assert "Fine-tune a CLIP-style model with MMFT" in finished.stdout
