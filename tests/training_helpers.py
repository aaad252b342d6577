"""Small, fast training set-ups shared by the training, checkpoint, DDP and evaluation tests.

The data is conftest's `write_data` stream over a 97-token alphabet (each token is the previous one
plus 1, 2 or 3, mod 97), so a 1-layer model with a 128-row vocabulary learns it in a few dozen
updates: the loss falls from ln(128) ~ 4.85 towards ln(3) ~ 1.10.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import ONE_THREAD_ENV, REPO, smallgpt, write_data  # noqa: F401 (used here and re-exported)
from safetensors.torch import load_file

from smallgpt.recipe import resolve_config

# A model and recipe small enough that an update takes milliseconds on a CPU.
TINY_SETTINGS = {
    "vocab_size": 128,
    "vocab_multiple": 64,
    "block_size": 16,
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "dropout": 0.0,
    "batch_size": 4,
    "micro_batch_size": 2,
    "max_iters": 30,
    "learning_rate": 1e-2,
    "min_lr": 1e-3,
    "warmup_iters": 5,
    "eval_interval": 10,
    "eval_iters": 2,
    "log_interval": 1,
    "sample_tokens": 0,
    "device": "cpu",
    # Not auto: on shapes this small the probe's bf16-vs-fp32 verdict sits near its margin and can
    # differ between two micro-batch sizes, and tests compare runs. bf16 is tested where it is named.
    "dtype": "float32",
}

# The modern recipe on the same tiny shape: Qwen3 blocks trained by Muon + AdamW.
MODERN_SETTINGS = {"arch": "qwen3", "bias": False, "optimizer": "muon", "schedule": "wsd", "min_lr": 0.0}


def tiny_run(**changes):
    """The tiny RunConfig with `changes` applied (any model or training field), on the seed's recipe
    (the `tiny` preset) unless `changes` pick the modern one."""
    return resolve_config("tiny", overrides={**TINY_SETTINGS, **changes})


def cli_args(**changes) -> list[str]:
    """The same settings as `smallgpt train` words: the `tiny` preset, then `key=value` pairs."""
    return ["--preset", "tiny", *(f"{key}={value}" for key, value in {**TINY_SETTINGS, **changes}.items())]


def start_smallgpt(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smallgpt", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD_ENV,
    )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 180.0) -> None:
    """Block until the run's metrics.jsonl has logged `step` (the run is then mid-way)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file():
            complete_lines = metrics.read_text().splitlines()[:-1]  # the last may be half-written
            if any(json.loads(line)["step"] >= step for line in complete_lines):
                return
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {process.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"run did not reach step {step} in {timeout} s")


def final_weights(run_dir: Path) -> dict:
    """The weights of the newest step checkpoint of a run."""
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(newest / "model.safetensors"))


def metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]
