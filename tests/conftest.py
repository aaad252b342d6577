"""Shared test helpers and fixtures. Tests never touch the network: HF libraries are forced offline here.

- `smallgpt(*args)`: the CLI in a real subprocess, as a user runs it (also the `smallgpt` fixture);
  the `cli` fixture runs it in the test's own process, faster;
- `single_thread` (automatic): every test runs torch on one thread, like its subprocesses;
- `write_data(dir)` / the `tiny_data` fixture: a small prepared-data directory;
- `shared_data`: the benchmark corpora beside the checkout, or a clean skip;
- `no_space()`: raises what a full disk raises, for tests that make one write fail.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# One thread everywhere: the test models are too small to gain from more, runs in and out of the test
# process then do identical arithmetic, and a busy machine cannot stall a thread team.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def smallgpt(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m smallgpt ARGS` to completion on one thread, capturing its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "smallgpt", *args],
        capture_output=True,
        text=True,
        cwd=kwargs.pop("cwd", REPO),
        env=ONE_THREAD_ENV,
        timeout=timeout,
        **kwargs,
    )


def no_space(*args, **kwargs):
    """Stand in for a write on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_one_line_error(result: subprocess.CompletedProcess, message: str = "") -> None:
    """The CLI's contract for bad input: exit status 1 and one `error: ...` line, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def write_data(directory: Path, train_tokens: int = 20_000, val_tokens: int = 2_000) -> Path:
    """A prepared-data directory (train.bin, val.bin) holding a learnable synthetic stream over a
    97-token alphabet: each token is the previous one plus 1, 2 or 3, mod 97."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", train_tokens), ("val", val_tokens)):
        (np.cumsum(rng.integers(1, 4, count)) % 97).astype(np.uint16).tofile(directory / f"{split}.bin")
    return directory


@pytest.fixture(name="smallgpt", scope="session")
def smallgpt_fixture():
    return smallgpt


@pytest.fixture
def cli(monkeypatch, capsys):
    """`cli(*args)` runs `smallgpt ARGS` in this process, which saves the seconds a new one spends
    importing torch, and returns (exit code, stdout, stderr)."""
    from smallgpt.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["smallgpt", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        return exited.value.code, captured.out, captured.err

    return run


@pytest.fixture(autouse=True)
def single_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return write_data(tmp_path / "data")


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
