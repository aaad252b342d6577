"""The loss curve of a run: train and validation loss against tokens seen, from `metrics.jsonl`.

Training writes `RUN_DIR/loss.png` at every evaluation and at the end; `smallgpt plot RUN_DIR` redraws
it (for instance from a run still in progress, or one copied from a GPU machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smallgpt.errors import SmallGPTError

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`; a line cut short by a killed run is skipped."""
    path = Path(run_dir) / METRICS_NAME
    if Path(run_dir).is_file():
        raise SmallGPTError(f"{run_dir} is a file; give the run directory that holds {METRICS_NAME}")
    if not path.is_file():
        raise SmallGPTError(f"no {METRICS_NAME} in {run_dir} (is it a training run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_run(run_dir: str | Path) -> Path:
    """Draw `RUN_DIR/loss.png` (written atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["tokens"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not train and not val:
        raise SmallGPTError(f"{run_dir / METRICS_NAME} has no losses to plot yet")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train (micro-batch mean)", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", color="tab:orange")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(f"{run_dir.name}: loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    final = run_dir / PLOT_NAME
    tmp = run_dir / f".{PLOT_NAME}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, final)
    return final
