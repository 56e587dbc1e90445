"""The built wheel is a complete library: every data file the package reads (card templates, `py.typed`) is inside,
and its `mmft-hf` console script runs from the installed copy, not from this checkout."""

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("mmft_hf", "setup.cfg", "pyproject.toml", "README.md")


def package_data_files() -> set[str]:
    """Every file under `mmft_hf/` that is not Python source or a byte-code cache, as a wheel path."""
    files = set()
    for path in (REPO_ROOT / "mmft_hf").rglob("*"):
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts:
            files.add(path.relative_to(REPO_ROOT).as_posix())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (so the build leaves nothing in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy
        copy(REPO_ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, text=True, timeout=120)
    (built,) = dist.glob("mmft_hf-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (without dependencies) into a folder of its own; its console scripts are in `bin/`."""
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    return target


def test_wheel_holds_every_data_file_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "mmft_hf/py.typed" in names
    assert {"mmft_hf/templates/model_card.md", "mmft_hf/templates/dataset_card.md"} <= names
    missing = package_data_files() - names
    assert not missing, (
        f"files under mmft_hf/ left out of the wheel (add them to package_data in setup.cfg): {missing}"
    )


def test_wheel_declares_the_console_script_and_no_evaluate(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(archive.read(entry_points).decode())
    assert parser["console_scripts"]["mmft-hf"] == "mmft_hf.cli:main"
    (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    requirements = [line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    base = [line for line in requirements if "extra ==" not in line]
    assert not [line for line in requirements if "evaluate" in line]
    assert not [line for line in base if "==" in line], f"exact pins in the base requirements: {base}"


# Runs the installed console script in one process (importing the stack once): its top-level and `finetune`
# `--help`, then reports where mmft_hf came from and whether the card templates it reads are there.
CONSOLE_SCRIPT_DRIVER = """
import contextlib, io, json, os, runpy, sys
script, report = sys.argv[1], {}
for args in ([], ["finetune"]):
    sys.argv = [script, *args, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
            code = None
        except SystemExit as exit:
            code = exit.code
    report[" ".join(args) or "top"] = {"exit": code, "stdout": out.getvalue()}
import mmft_hf.captioning.builder as builder, mmft_hf.model_card as model_card
report["module"] = model_card.__file__
report["templates"] = [os.path.isfile(model_card.TEMPLATE_PATH), os.path.isfile(builder.CARD_TEMPLATE)]
print(json.dumps(report))
"""


def test_installed_console_script_runs_from_the_wheel(installed):
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = installed / "bin" / "mmft-hf"
    command = [sys.executable, "-c", CONSOLE_SCRIPT_DRIVER, str(script)]
    # PYTHONPATH comes before site-packages and the checkout's editable hook, so the wheel's copy is the one imported
    run = subprocess.run(command, cwd=installed.parent, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["top"]["exit"] == 0
    assert all(command in report["top"]["stdout"] for command in ("caption", "finetune", "benchmark"))
    assert report["finetune"]["exit"] == 0
    assert "--output_dir" in report["finetune"]["stdout"] and "--model_name_or_path" in report["finetune"]["stdout"]
    assert Path(report["module"]).is_relative_to(installed)
    assert report["templates"] == [True, True]


def declared_requirements() -> list[Requirement]:
    """The base requirements and those of every extra, as written in setup.cfg."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    lines += [line for extra in config["options.extras_require"].values() for line in extra.splitlines()]
    return [Requirement(line) for line in lines if line.strip()]


def test_every_range_starts_at_the_floor_that_make_test_floor_installs():
    floors = {}
    for line in (REPO_ROOT / "constraints" / "floor.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            pinned = Requirement(line.split("#")[0])
            floors[canonicalize_name(pinned.name)] = Version(str(pinned.specifier).removeprefix("=="))
    for requirement in declared_requirements():
        lower = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        assert not [spec for spec in requirement.specifier if spec.operator in ("==", "~=", "===")], requirement
        assert lower, f"{requirement} has no floor: declare >= the oldest version the suite passed with"
        assert floors.get(canonicalize_name(requirement.name)) == lower[0], (
            f"{requirement}: constraints/floor.txt must pin {requirement.name}=={lower[0]} (make test-floor runs it)"
        )


def loaded_after(statements: str, modules: tuple[str, ...]) -> dict:
    """Runs `statements` in a fresh interpreter; returns which of `modules` it left in `sys.modules`."""
    code = f"import json, sys\n{statements}\nprint(json.dumps({{m: m in sys.modules for m in {list(modules)!r}}}))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


HEAVY = ("peft", "transformers.trainer", "mmft_hf.training.trainer", "transformers.pipelines", "torch")


def test_importing_the_captioning_stage_loads_no_trainer_no_peft():
    loaded = loaded_after(
        "import mmft_hf.captioning, mmft_hf.captioning.cache, mmft_hf.captioning.caption, mmft_hf.captioning.engine",
        HEAVY,
    )
    assert loaded == {name: False for name in HEAVY}, loaded
    # the package itself loads nothing heavy: `mmft-hf --help` and importing caption_dataset stay quick
    assert loaded_after("import mmft_hf", (*HEAVY, "transformers", "datasets")) == dict.fromkeys(
        (*HEAVY, "transformers", "datasets"), False
    )


def test_the_pipeline_task_is_registered_whichever_is_imported_first():
    check = (
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert 'mmft-classification' in PIPELINE_REGISTRY.get_supported_tasks()\n"
        "import mmft_hf, transformers\n"
        "assert mmft_hf.pipeline is transformers.pipeline  # the function, never a module\n"
        "from mmft_hf import MMFTClassificationPipeline\n"
        "assert PIPELINE_REGISTRY.check_task('mmft-classification')[1]['impl'] is MMFTClassificationPipeline"
    )
    loaded_after(f"import mmft_hf\n{check}", ())  # the registry loads after mmft_hf
    loaded_after(f"import transformers.pipelines\nimport mmft_hf\n{check}", ())  # or before it
    # or from inside an import of the package (the prototypes import the Hub copy, which subclasses `Pipeline`)
    loaded_after(f"import mmft_hf.classification.prototypes\n{check}", ())
    loaded_after(
        "import mmft_hf.training.trainer\nfrom transformers import pipeline\n"
        "assert pipeline.__module__ == 'transformers.pipelines'\n"
        "from transformers.pipelines import check_task\nassert check_task('mmft-classification')[0]",
        (),
    )


def test_every_public_name_resolves_and_every_documented_import_exists():
    import mmft_hf

    assert len(set(mmft_hf.__all__)) == len(mmft_hf.__all__)
    for name in mmft_hf.__all__:
        assert getattr(mmft_hf, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        mmft_hf.not_a_name  # noqa: B018
    # `from mmft_hf import ...` in the README, the docs, the examples and the tests names only exported names
    pattern = re.compile(r"from mmft_hf import \(([^)]*)\)|from mmft_hf import ([A-Za-z_][\w ,]*)")
    for folder in ("README.md", "docs", "examples", "tests", "benchmarks"):
        root = REPO_ROOT / folder
        for path in [root] if root.is_file() else [*root.rglob("*.py"), *root.rglob("*.md")]:
            if path == Path(__file__):  # its own pattern
                continue
            for match in pattern.finditer(path.read_text(encoding="utf-8")):
                body = re.sub(r"#[^\n]*", "", match.group(1) or match.group(2))
                for name in filter(None, (part.split(" as ")[0].strip() for part in body.split(","))):
                    exported = hasattr(mmft_hf, name) or importlib.util.find_spec(f"mmft_hf.{name}") is not None
                    assert exported, f"{path.relative_to(REPO_ROOT)} imports {name} from mmft_hf"  # or a submodule
