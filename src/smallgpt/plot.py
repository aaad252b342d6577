"""The loss curve of a run: train and validation loss against tokens seen, from `metrics.jsonl`.

Training writes `RUN_DIR/loss.png` at every evaluation and at the end; `smallgpt plot RUN_DIR` redraws
it (for instance from a run still in progress, or one copied from a GPU machine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from smallgpt.errors import SmallGPTError, os_reason
from smallgpt.files import atomic_write_file

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`: JSON objects with a numeric step.

    Anything else (a line cut short by a killed run, an edited or damaged line) is skipped.
    """
    path = Path(run_dir) / METRICS_NAME
    if Path(run_dir).is_file():
        raise SmallGPTError(f"{run_dir} is a file; give the run directory that holds {METRICS_NAME}")
    if not path.is_file():
        raise SmallGPTError(f"no {METRICS_NAME} in {run_dir} (is it a training run directory?)")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SmallGPTError(f"cannot read {path}: {os_reason(exc)}") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            records.append(record)
    return records


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _points(records: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """(tokens, loss) of the records of `kind` that hold both as numbers (a diverged NaN loss too)."""
    return [
        (r["tokens"], r[key])
        for r in records
        if r.get("kind") == kind and _is_number(r.get("tokens")) and type(r.get(key)) in (int, float)
    ]


def plot_run(run_dir: str | Path) -> Path:
    """Draw `RUN_DIR/loss.png` (written atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train, val = _points(records, "train", "loss"), _points(records, "eval", "val_loss")
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
    try:
        atomic_write_file(final, fig.savefig)
    finally:
        plt.close(fig)
    return final
