"""What a training run shows and records: progress bar, `metrics.jsonl`, TensorBoard, loss plot, MFU.

MFU (model FLOPs utilisation) = FLOPs the model needs per token x tokens per second / the peak of all
the devices that train (one per process). The peak is measured: `measure_matmul_peak` times a large
matmul in the training dtype on this very device, so the figure says how much of the attainable speed
the whole training step reaches (data loading, optimizer and Python included). Where the datasheet's
peak is known (`datasheet_peak`), MFU against it is reported beside, labelled, as papers quote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from smallgpt.evaluate import perplexity
from smallgpt.files import WriteError, atomic_write_text, writing
from smallgpt.plot import METRICS_NAME, plot_run, read_metrics


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the attainable peak MFU is relative to.

    The best of several timings, so that a moment of contention (another process, clock ramp-up)
    does not lower the peak and inflate the MFU.
    """
    size, repeats = (8192, 10) if device.type == "cuda" else (1024, 3)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, caches, clocks
    best = 0.0
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s; the first matching name wins.
DATASHEET_BF16_PEAKS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet's bf16/fp16 peak FLOP/s of this GPU, where this module knows it."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_PEAKS.items() if key in name), None)


def trim_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step`: a resumed run redoes those steps and logs them again."""
    path = run_dir / METRICS_NAME
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def progress_display(console: Console, enabled: bool = True) -> Progress:
    """A progress bar: what, done/total, bar, status, time left (started by the caller)."""
    return Progress(
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


class PassProgress:
    """How far a validation pass has got: a bar on a terminal; in a log or a pipe, a line every `every` s."""

    def __init__(self, progress: Progress, what: str, every: float = 10.0) -> None:
        self.progress, self.what, self.every = progress, what, every
        self.task, self.last_line = None, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.what, total=total, status="tokens")
        self.progress.update(self.task, completed=done)
        now, console = time.perf_counter(), self.progress.console
        if not console.is_terminal and now - self.last_line >= self.every and done < total:
            self.last_line = now
            console.print(f"{self.what}: {done:,} / {total:,} tokens", highlight=False)


class RunMonitor:
    """Rank 0's window on the run; every method is a no-op on other ranks (enabled=False)."""

    def __init__(
        self,
        run_dir: Path,
        console: Console,
        *,
        start_step: int,
        max_steps: int,
        tokens_per_step: int,
        flops_per_token: int,
        measure_peak: Callable[[], float],
        enabled: bool,
        devices: int = 1,
        datasheet_peak: float | None = None,
    ) -> None:
        self.run_dir, self.console, self.enabled = run_dir, console, enabled
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        # tokens_per_step counts every process's tokens, so the peak is that of every device.
        self.devices, self.datasheet_peak = devices, datasheet_peak
        # Re-measured at every evaluation, keeping the best: a peak timed while other jobs held the
        # cores would understate the device and overstate MFU.
        self.measure_peak = measure_peak
        self.peak_flops = measure_peak() if enabled else 1.0
        self.last_step, self.last_time = start_step, time.perf_counter()
        with writing(run_dir / METRICS_NAME):
            self.metrics = open(run_dir / METRICS_NAME, "a") if enabled else None  # noqa: SIM115
        self.tensorboard = _tensorboard_writer(run_dir) if enabled else None
        self.progress = progress_display(console, enabled)
        self.task = self.progress.add_task("step", total=max_steps, completed=start_step, status="")
        self.progress.start()

    def _check_not_deleted(self) -> None:
        """Stop in one line when the run directory (or its metrics.jsonl) was deleted under the run:
        appending to a file with no name left would lose every record without an error."""
        if os.fstat(self.metrics.fileno()).st_nlink == 0:
            gone = self.run_dir / METRICS_NAME if self.run_dir.is_dir() else self.run_dir
            raise WriteError(gone, f"{gone} was deleted during the run")

    def _record(self, record: dict) -> None:
        self._check_not_deleted()
        with writing(self.run_dir / METRICS_NAME):
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "step", "tokens"):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["tokens"])

    def log_train(self, step: int, loss: float, lr: float) -> None:
        """Record the loss after `step` updates; speed is measured since the previous log."""
        if not self.enabled:
            return
        now = time.perf_counter()
        tokens_per_s = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        flops_per_s = self.flops_per_token * tokens_per_s / self.devices
        record = {"kind": "train", "step": step, "tokens": step * self.tokens_per_step, "loss": loss,
                  "lr": lr, "tokens_per_s": tokens_per_s, "mfu": flops_per_s / self.peak_flops}  # fmt: skip
        status = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  MFU {record['mfu']:.1%}"
        if self.datasheet_peak:
            record["mfu_datasheet"] = flops_per_s / self.datasheet_peak
            status += f" ({record['mfu_datasheet']:.1%} of datasheet peak)"
        self._record(record)
        self.progress.update(self.task, completed=step, status=status)
        if not self.console.is_terminal:  # logs and pipes get a line instead of a redrawn bar
            self.console.print(f"step {step}: {status}", highlight=False)

    def log_eval(self, step: int, val_loss: float, *, final: bool = False) -> None:
        if not self.enabled:
            return
        kind = "final" if final else "eval"
        self._record(
            {"kind": kind, "step": step, "tokens": step * self.tokens_per_step, "val_loss": val_loss,
             "val_perplexity": perplexity(val_loss)}
        )  # fmt: skip
        self.peak_flops = max(self.peak_flops, self.measure_peak())
        what = "full validation pass" if final else "validation estimate"
        self.console.print(
            f"step {step}: {what}: loss {val_loss:.4f}, perplexity {perplexity(val_loss):.1f}",
            highlight=False,
        )
        self._check_not_deleted()  # then the plot can read what was recorded
        plot_run(self.run_dir)

    def pass_progress(self, what: str) -> PassProgress:
        """Progress of a validation pass, shown under the training bar."""
        return PassProgress(self.progress, what)

    def close(self) -> None:
        self.progress.stop()
        if self.metrics is not None:
            with contextlib.suppress(OSError):  # a record the disk refused was reported already
                self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
