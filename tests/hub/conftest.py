"""A real Hub HTTP API on loopback: olah (a self-hosted Hub mirror) serving local git repositories.

The test session itself stays offline (`HF_HUB_OFFLINE=1` is read when huggingface_hub is imported), so the
checks that talk to the Hub run in subprocesses with `HF_ENDPOINT` pointing at olah and the offline switches
unset, each with its own cache, and a timeout.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.without_mmft_hf import BLOCK_MMFT_HF

pytest.importorskip("olah", reason="the Hub-protocol tests need olah (pip install -e '.[test]')")

LAUNCHER = Path(__file__).with_name("olah_launcher.py")

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
STARTUP_TIMEOUT = 60  # seconds for olah to answer its first API request


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackHub:
    """olah on 127.0.0.1 serving `<root>/mirrors/{models,datasets}/<org>/<name>` git repositories (branch main)."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.mirrors = root / "mirrors"

    def commit(self, folder: str | os.PathLike, repo_id: str, repo_type: str = "model") -> str:
        """Copies `folder` into a git repository for `repo_id` and commits it on `main`; returns the commit sha."""
        if not (Path(folder) / "README.md").is_file():
            raise ValueError(f"{folder} has no README.md; olah serves only repositories with one.")
        target = self.mirrors / f"{repo_type}s" / repo_id
        shutil.copytree(folder, target)
        git = ["git", "-c", "user.name=mmft-hf tests", "-c", "user.email=tests@localhost", "-C", str(target)]
        for command in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "upload"]):
            subprocess.run([*git, *command], check=True, capture_output=True, timeout=60)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    def start(self, script: str, *args, block_mmft_hf: bool = False) -> "HubClient":
        """Starts `script` in a fresh Python process talking to this Hub (collect it with `HubClient.result`)."""
        workdir = Path(tempfile.mkdtemp(dir=self.root, prefix="client-"))
        path = workdir / "client.py"
        path.write_text((BLOCK_MMFT_HF if block_mmft_hf else "") + textwrap.dedent(script))
        env = {key: value for key, value in os.environ.items() if key not in (*OFFLINE_SWITCHES, "PYTHONPATH")}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(workdir / "hf-home"),  # an empty cache: every file comes over HTTP
            HF_DATASETS_CACHE=str(workdir / "datasets-cache"),
            HF_MODULES_CACHE=str(workdir / "modules"),
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            OMP_NUM_THREADS="1",
        )
        if not block_mmft_hf:
            env["PYTHONPATH"] = str(REPO_ROOT)
        stdout, stderr = open(workdir / "stdout", "w+"), open(workdir / "stderr", "w+")
        # cwd is not the repository: with block_mmft_hf its root must not be importable
        command = [sys.executable, str(path), *map(str, args)]
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=stdout, stderr=stderr, text=True)
        return HubClient(process, stdout, stderr)


class HubClient:
    """A running client process; `result()` waits for it and fails the test on an error or a timeout."""

    def __init__(self, process: subprocess.Popen, stdout, stderr):
        self.process, self.stdout, self.stderr = process, stdout, stderr

    def result(self, timeout: float = 240) -> str:
        try:
            self.process.wait(timeout=timeout)
            problem = None if self.process.returncode == 0 else f"exited with {self.process.returncode}"
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            problem = f"timed out after {timeout} s"
        outputs = []
        for stream in (self.stdout, self.stderr):
            stream.seek(0)
            outputs.append(stream.read())
            stream.close()
        if problem:
            pytest.fail(f"Hub client {problem}:\n{outputs[0][-2000:]}\n{outputs[1][-5000:]}")
        return outputs[0]


def wait_until_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"olah exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"olah did not answer {url} within {STARTUP_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def loopback_hub(tmp_path_factory):
    """olah started once per session on a free loopback port, in offline mode (it never contacts the real Hub)."""
    root = tmp_path_factory.mktemp("loopback-hub")
    port = free_port()
    hub = LoopbackHub(root, port)
    (hub.mirrors / "models").mkdir(parents=True)
    (hub.mirrors / "datasets").mkdir()
    config = root / "olah.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [basic]
            host = "127.0.0.1"
            port = {port}
            repos-path = "{root / "repos"}"
            mirrors-path = ["{hub.mirrors}"]
            mirror-scheme = "http"
            mirror-netloc = "127.0.0.1:{port}"
            mirror-lfs-netloc = "127.0.0.1:{port}"

            [accessibility]
            offline = true
            """
        )
    )
    readiness = root / "readiness"  # olah serves only git repositories with a README.md: one to probe
    readiness.mkdir()
    (readiness / "README.md").write_text("readiness probe\n")
    hub.commit(readiness, "mmft-tests/readiness")
    log = root / "olah.log"
    command = [sys.executable, str(LAUNCHER), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--repos-path", str(root / "repos"), "--log-path", str(root / "logs")]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, f"{hub.endpoint}/api/models/mmft-tests/readiness/revision/main", log)
        yield hub
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
