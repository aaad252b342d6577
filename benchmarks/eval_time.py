"""`smallgpt eval` time of this checkout against another source tree, on one checkpoint and one split.

    .venv/bin/python benchmarks/eval_time.py --baseline-src /tmp/old/src      (~2 min on 2 quiet cores)

The baseline is another checkout's `src/` (e.g. `git worktree add /tmp/old COMMIT`). Both run the
real command, `python -m smallgpt eval CHECKPOINT --data DATA --json`, in child processes on one
thread, alternately, `--repeats` times; the figures are each side's best wall time and its CPU time
(user + system of the child, robust to other jobs on a shared machine). The checkpoint is a freshly
initialised smallgpt-10m (speed does not depend on the weights); the data is the bundled corpus's
validation split cut to `--tokens`. Each side runs in the precision its `eval` picks (`dtype=auto`:
on a CPU with fast bf16, bf16 since issue 21); their losses must agree within `LOSS_TOLERANCE`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from smallgpt.checkpoint import save_weights
from smallgpt.config import get_preset
from smallgpt.model import GPT

SRC = Path(__file__).resolve().parents[1] / "src"


LOSS_TOLERANCE = 0.02  # nats: what bf16 matmuls may move a loss by (issue 21's parity bound)


def timed_eval(src: Path, checkpoint: Path, data: Path) -> tuple[float, float, dict]:
    """(wall seconds, child CPU seconds, its JSON result) of one `smallgpt eval` with `src` on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "smallgpt", "eval", str(checkpoint), "--data", str(data), "--json"]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, cpu, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, required=True, help="the other checkout's src/")
    parser.add_argument("--tokens", type=int, default=16_385, help="validation tokens scored")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from smallgpt.prepare import default_data_dir

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, data = Path(tmp) / "model.safetensors", Path(tmp) / "data"
        torch.manual_seed(0)
        save_weights(GPT(get_preset("smallgpt-10m")), checkpoint)
        data.mkdir()
        val = np.fromfile(default_data_dir() / "val.bin", dtype=np.uint16)[: args.tokens]
        val.tofile(data / "val.bin")
        runs: dict[str, list[tuple[float, float, float]]] = {"baseline": [], "this checkout": []}
        for _ in range(args.repeats):
            runs["baseline"].append(timed_eval(args.baseline_src, checkpoint, data))
            runs["this checkout"].append(timed_eval(SRC, checkpoint, data))
    reported = {name: results[-1][2] for name, results in runs.items()}
    base_loss, new_loss = (r["loss"] for r in reported.values())
    assert abs(base_loss - new_loss) < LOSS_TOLERANCE, f"the two sides disagree on the loss: {reported}"
    best = {name: (min(r[0] for r in results), min(r[1] for r in results)) for name, results in runs.items()}
    print(f"smallgpt eval, smallgpt-10m, {args.tokens - 1:,} tokens, 1 thread, best of {args.repeats}:")
    for name, (wall, cpu) in best.items():
        result = reported[name]
        print(f"  {name:>13}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, loss {result['loss']:.4f} "
              f"({result.get('dtype', 'float32')})")  # fmt: skip
    (base_wall, base_cpu), (new_wall, new_cpu) = best.values()
    print(f"  speed-up: {base_wall / new_wall:.2f}x wall, {base_cpu / new_cpu:.2f}x CPU")


if __name__ == "__main__":
    main()
