"""The `mmft-hf` command: dispatch, `--help` per subcommand, errors naming flags, and the module path under
`python -m` and `accelerate launch -m`."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from fake_chat_server import start_fake_api

from mmft_hf import cli
from mmft_hf.commands import benchmark, finetune
from mmft_hf.commands.flags import as_flags, command_parser
from mmft_hf.evaluation.retention import RetentionArguments
from mmft_hf.training.arguments import MMFTTrainingArguments
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
    assert all(f"  {name}" in out for name in ("help", "caption", "finetune", "benchmark"))
    assert "accelerate launch -m mmft_hf.cli" in out
    assert cli.main(["help"]) == 0 and capsys.readouterr().out == out
    assert cli.main([]) == 2 and "usage: mmft-hf <command>" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"mmft-hf {__version__}"
    assert cli.main(["fine-tune"]) == 2 and "unknown command 'fine-tune'" in capsys.readouterr().err


def test_top_level_help_imports_neither_a_command_nor_torch():
    """`mmft-hf --help` and `mmft-hf help` print three lines: they must not pay for torch and transformers."""
    heavy = "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m.startswith('mmft_hf.commands'))"
    for argument in ("--help", "help"):
        finished = run_module("-c", f"import sys; from mmft_hf import cli; cli.main([{argument!r}]); print({heavy})")
        assert finished.returncode == 0, finished.stderr
        assert finished.stdout.splitlines()[-1] == "[]" and "  finetune " in finished.stdout


def show_help(*argv: str) -> None:
    """Runs `mmft-hf <argv>`, a help request: it prints (read it with capsys) and exits with status 0."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 0


def flag_entries(text: str) -> dict[str, str]:
    """`--flag` -> its whole entry (flag, metavar, help over continuation lines) in an argparse help text."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",") if not line.startswith("  -h") else "--help"
            entries[current] = " ".join(line.split())
        elif current and line.startswith(" " * 10):
            entries[current] += " " + " ".join(line.split())
        else:
            current = None
    return entries


def section(text: str, title: str) -> str:
    """The lines of the help section whose heading starts with `title`, up to the next heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title) and line.endswith(":"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("command", [finetune, benchmark])
def test_subcommand_help_teaches_the_recipe(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main sets sys.argv[0] to name the subcommand
    name = command.__name__.rsplit(".", 1)[1]
    show_help(name, "--help")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"usage: mmft-hf {name} [--flag value ...]   (--help: the main flags; --help-all: every flag)"
    assert lines[2] == command.__doc__.strip().splitlines()[0]  # the module docstring is the description
    headings = [line for line, after in zip(lines, lines[1:]) if line.endswith(":") and after.startswith("  -")]
    own = ["model:", "data:"] if command is finetune else ["sweep (datasets, methods, shots, seeds):"]
    own.append("retention:")
    assert headings[: len(own)] == own  # the command's own flags first, then MMFT's, the recipe, the run's
    assert [heading.split(" ")[0] for heading in headings[len(own) :]] == ["MMFT", "recipe:", "run", "help:"]
    # the paper's recipe, with its defaults (method.md §6; MMFTTrainingArguments)
    recipe = flag_entries(section(out, "recipe:"))
    for flag, default in {"--learning_rate": "1e-05", "--num_train_epochs": "50", "--weight_decay": "0.0001",
                          "--per_device_train_batch_size": "64", "--lr_scheduler_type": "cosine",
                          "--warmup_steps": "0", "--optim": "adamw_torch"}.items():  # fmt: skip
        assert recipe[flag].endswith(f"(default: {default})"), recipe[flag]
    assert "--supcon_weight" in flag_entries(section(out, "MMFT (MMFTTrainingArguments)"))
    assert "--output_dir" in flag_entries(section(out, "run "))
    # every listed flag says what it does and its default, once
    for flag, entry in flag_entries(out).items():
        if flag in ("--help", "--help-all"):
            continue
        assert len(entry.split(None, 2)) == 3, f"{flag} has no help: {entry!r}"
        assert len(re.findall(r"\bdefault", entry, re.IGNORECASE)) == 1, f"{flag}: {entry!r}"
    # the other ~80 TrainingArguments flags: only under --help-all, which lists everything
    assert "--adam_beta1" not in out and re.search(
        r"\n\d+ more flags \(all other transformers\.TrainingArguments\)", out
    )
    show_help(name, "--help-all")
    everything = capsys.readouterr().out
    assert set(flag_entries(out)) < set(flag_entries(everything)) and "--adam_beta1" in everything
    assert "all other transformers.TrainingArguments:" in everything and "more flags" not in everything
    show_help("help", name)
    assert capsys.readouterr().out == out  # `mmft-hf help <command>`


def test_finetune_and_benchmark_take_the_retention_flags_of_one_declaration(tmp_path, capsys, monkeypatch):
    """`--retention_*` are `RetentionArguments`' fields, in both commands' parsers and nowhere else; both parse the
    same flags into it and list them, the same, in their --help section "retention"."""
    names = [field.name for field in dataclasses.fields(RetentionArguments)]
    assert names == ["retention_dataset", "retention_dataset_config_name", "retention_split", "retention_class_names"]
    argv = ["--retention_dataset", "synthetic", "--retention_dataset_config_name", "c", "--retention_split", "val",
            "--retention_class_names", str(tmp_path / "names.txt"), "--output_dir", str(tmp_path)]  # fmt: skip
    parsed = {}
    for command in (finetune, benchmark):
        assert RetentionArguments in command.ARGUMENT_DATACLASSES
        others = [cls for cls in command.ARGUMENT_DATACLASSES if cls is not RetentionArguments]
        assert not [field.name for cls in others for field in dataclasses.fields(cls) if "retention" in field.name]
        (parsed[command],) = [args for args in command.parse_arguments(argv) if isinstance(args, RetentionArguments)]
        defaults = [args for args in command.parse_arguments(argv[-2:]) if isinstance(args, RetentionArguments)]
        assert defaults == [RetentionArguments()]
    assert parsed[finetune] == parsed[benchmark] == RetentionArguments("synthetic", "c", "val", argv[7])
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    entries = {}
    for name in ("finetune", "benchmark"):
        show_help(name, "--help")
        entries[name] = flag_entries(section(capsys.readouterr().out, "retention:"))
    assert list(entries["finetune"]) == [f"--{name}" for name in names] and entries["finetune"] == entries["benchmark"]
    assert entries["finetune"]["--retention_split"].endswith("(default: test)")


def test_help_sections_come_from_the_dataclasses():
    """A field added to a TrainingArguments subclass lands in its own section, a redeclared TrainingArguments field in
    the recipe with transformers' help and the new default: nothing lists flags by name for these sections."""

    @dataclasses.dataclass
    class LaterArguments(MMFTTrainingArguments):
        brand_new_weight: float = dataclasses.field(default=0.5, metadata={"help": "A flag added later."})
        max_grad_norm: float = 0.25

    out = command_parser((LaterArguments,), "Docs.").format_help()
    mmft = flag_entries(section(out, "MMFT (LaterArguments)"))
    assert mmft["--brand_new_weight"] == "--brand_new_weight FLOAT A flag added later. (default: 0.5)"
    assert "--supcon_weight" in mmft  # inherited from MMFTTrainingArguments
    recipe = flag_entries(section(out, "recipe:"))["--max_grad_norm"]
    assert recipe.startswith("--max_grad_norm FLOAT Maximum gradient norm") and recipe.endswith("(default: 0.25)")


def test_caption_help_lists_its_flags_under_its_own_heading_with_one_default_each(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    show_help("caption", "--help")
    out = capsys.readouterr().out
    assert "training (" not in out and "TrainingArguments" not in out
    entries = flag_entries(section(out, "captioning"))
    assert entries["--image_column"] == "--image_column STR Image column (default: image)."
    assert entries["--split"].endswith("(default: train)")
    for flag, entry in entries.items():
        assert len(re.findall(r"\bdefault", entry, re.IGNORECASE)) == 1, f"{flag}: {entry!r}"


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


@pytest.fixture
def caption_source(synthetic_dataset, tmp_path):
    """A saved DatasetDict without captions: train (4 rows), validation and test (2 rows each)."""
    source = datasets.DatasetDict(
        {split: synthetic_dataset[split].remove_columns("captions").select(range(rows))
         for split, rows in (("train", 4), ("validation", 2), ("test", 2))}
    )  # fmt: skip
    source.save_to_disk(str(tmp_path / "source"))
    return str(tmp_path / "source")


@pytest.fixture
def chat_server():
    server = start_fake_api()
    yield server
    server.shutdown()
    server.server_close()


def caption_argv(source: str, server, cache_dir) -> list[str]:
    return ["caption", "--dataset_name", source, "--domain", "shapes", "--caption_types", "shape",
            "--captioner", "openai:fake-mllm", "--base_url", server.base_url, "--api_key_env", "none",
            "--cache_dir", str(cache_dir)]  # fmt: skip


def test_caption_without_a_destination_stops_before_any_request(caption_source, chat_server, tmp_path, capsys):
    assert cli.main(caption_argv(caption_source, chat_server, tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmft-hf caption: error: no destination: give --output_dir DIR") and "--push_to_hub" in err
    assert f"kept in the cache ({tmp_path / 'cache'})" in err
    assert chat_server.requests == []


def test_caption_pays_for_the_train_split_only_and_writes_every_split(caption_source, chat_server, tmp_path, capsys):
    argv = caption_argv(caption_source, chat_server, tmp_path / "cache")
    assert cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    assert len(chat_server.requests) == 4  # 4 train images x 1 caption type; validation and test are not captioned
    assert f"Captions are cached in {tmp_path / 'cache'}: rerunning this command" in capsys.readouterr().out
    written = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))
    assert sorted(written) == ["test", "train", "validation"]
    assert [len(captions) for captions in written["train"]["captions"]] == [1] * 4
    assert [len(captions) for captions in written["test"]["captions"]] == [0] * 2
    # the same command to another folder writes the dataset again from the cache, paying nothing
    assert cli.main([*argv, "--output_dir", str(tmp_path / "again")]) == 0 and len(chat_server.requests) == 4
    assert cli.main([*argv, "--split", "train", "test", "--output_dir", str(tmp_path / "both")]) == 0
    assert len(chat_server.requests) == 6  # --split names the others
