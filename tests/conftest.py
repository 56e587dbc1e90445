"""Shared offline fixtures (a tiny CLIP built from configs, tiny labelled image datasets on real files) and a
launcher for multi-process runs."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once at `import huggingface_hub`: set before any HF import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets keys the cache of a local folder on its name and card, not its files: keep each test session's cache
# apart, so a same-named folder from an earlier run is never served from the user's cache
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmft-hf-datasets-cache-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmft_hf.synthetic import (  # noqa: E402
    build_clip,
    build_word_tokenizer,
    caption_vocabulary,
    make_synthetic_dataset,
)

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(nproc: int, script, *args, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs `script args` in `nproc` CPU processes with `torch.distributed.run --standalone` and checks it succeeds.

    `--standalone` binds its rendezvous port itself (no free port picked here and bound later by another process).
    The processes run offline, one thread each, with this checkout importable. A failure or a timeout fails the
    test with the captured output; on a timeout the launcher gets SIGTERM, which it passes on to its workers (each
    runs in a session of its own), then SIGKILL if it has not exited within 30 s.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command += [str(script), *map(str, args)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    # files, not pipes: a worker that outlives the launcher cannot keep the output from being read
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=True)
        try:
            problem = None if process.wait(timeout=timeout) == 0 else f"exited with {process.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"timed out after {timeout} s"
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if problem:
        pytest.fail(f"{' '.join(command)} {problem}.\n{output[-3000:]}\n{errors[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, errors)


@pytest.fixture(scope="session")
def synthetic_dataset() -> datasets.DatasetDict:
    """4 classes of drawn shapes: 8 train, 4 validation and 4 test images per class, 3 captions each."""
    return make_synthetic_dataset(num_classes=4, train_per_class=8, eval_per_class=4, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(synthetic_dataset):
    return build_word_tokenizer(caption_vocabulary(synthetic_dataset["train"], extra_text="a photo of a"))


@pytest.fixture
def tiny_clip(tiny_tokenizer):
    """A fresh random `CLIPModel` (~70k parameters) and its `CLIPProcessor`; EOS id 1 in tokenizer and config."""
    torch.manual_seed(0)
    return build_clip(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny CLIP saved with `save_pretrained`, as a stand-in for a Hub checkpoint."""
    torch.manual_seed(0)
    model, processor = build_clip(tiny_tokenizer)
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def image_files_dataset(tmp_path_factory) -> datasets.Dataset:
    """A labelled dataset backed by real PNG and JPEG files (RGB, grayscale, RGBA), with captions."""
    root = tmp_path_factory.mktemp("images")
    colors = {"banded": (200, 30, 30), "dotted": (30, 200, 30), "striped": (30, 30, 200)}
    rows = {"image": [], "label": [], "captions": []}
    for index in range(12):
        name = list(colors)[index % 3]
        mode, suffix = [("RGB", "png"), ("L", "jpg"), ("RGBA", "png")][index % 3]
        image = Image.new("RGB", (24 + index, 20 + 2 * index), colors[name]).convert(mode)
        path = root / f"{index:02d}_{name}.{suffix}"
        image.save(path)
        rows["image"].append(str(path))
        rows["label"].append(name)
        rows["captions"].append([f"a {name} texture number {index}", f"the {name} pattern repeats"])
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(colors)),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def batch_api():
    """Starts loopback OpenAI APIs with the Batch endpoints (`batch_api(**options)`); all stop after the test."""
    from tests.fake_batch_api import start_fake_batch_api

    servers = []

    def start(**kwargs):
        servers.append(start_fake_batch_api(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
