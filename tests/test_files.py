"""Atomic outputs when the disk says no: the old version stays whole, no temporary is left, one line.

Failures are injected where the bytes go down (a writer raising `OSError(ENOSPC)`), as the libraries
really report them (torch.save wraps the OSError, safetensors only quotes its number), and on a real
full filesystem in test_train.py.
"""

import errno
import json
import os
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from training_helpers import metrics, tiny_run

from smallgpt import checkpoint, monitor
from smallgpt.checkpoint import load_checkpoint, step_checkpoints
from smallgpt.files import (
    WriteError,
    atomic_write_dir,
    atomic_write_file,
    atomic_write_files,
    os_error_behind,
    writing,
)
from smallgpt.train import train


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def everything_in(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` (hidden temporaries included) with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


class FullFile:
    """A file on a full disk: every write is refused, as the kernel refuses it."""

    def write(self, data):
        no_space()

    def flush(self):
        pass


def test_the_system_error_is_found_behind_each_library():
    assert os_error_behind(OSError(errno.EROFS, "Read-only file system")).errno == errno.EROFS
    with pytest.raises((RuntimeError, OSError)) as torch_error:  # as it happens to surface
        torch.save({"w": torch.zeros(1000)}, FullFile())
    assert os_error_behind(torch_error.value).errno == errno.ENOSPC
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert os_error_behind(rust).strerror == "No space left on device"
    assert os_error_behind(ValueError("a bug")) is None
    try:
        try:
            no_space()
        except OSError:
            raise ValueError("a bug while handling it") from None
    except ValueError as suppressed:
        assert os_error_behind(suppressed) is None  # `from None`: not the cause
    with pytest.raises(ValueError), writing(Path("x")):
        raise ValueError("bugs pass through untouched")


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    atomic_write_file(tmp_path / "notes.json", lambda tmp: tmp.write_text("old"))

    def half_then_full(tmp):
        tmp.write_text("half")
        no_space()

    with pytest.raises(WriteError, match=r"cannot write .*notes.json: No space left on device$") as error:
        atomic_write_file(tmp_path / "notes.json", half_then_full)
    assert error.value.path == tmp_path / "notes.json"
    assert everything_in(tmp_path) == {"notes.json": b"old"}


def test_files_written_together_replace_none_unless_all_are_written(tmp_path):
    old = {"model.safetensors": b"old weights", "config.json": b"old config"}
    atomic_write_files(tmp_path, {name: (lambda tmp, b=b: tmp.write_bytes(b)) for name, b in old.items()})
    weights = {"w": torch.arange(4.0)}
    with pytest.raises(WriteError, match=r"config.json: No space left on device"):
        atomic_write_files(
            tmp_path, {"model.safetensors": lambda tmp: save_file(weights, str(tmp)), "config.json": no_space}
        )
    assert everything_in(tmp_path) == old  # the new weights were written, and thrown away


def test_a_directory_that_cannot_be_written_or_swapped_in_keeps_the_old_one(tmp_path, monkeypatch):
    step = tmp_path / "best"
    atomic_write_dir(step, lambda tmp: (tmp / "state.json").write_text("old"))

    def weights_on_a_full_disk(tmp):
        (tmp / "state.json").write_text("new")
        save_file({"w": torch.zeros(3)}, str(tmp / "model.safetensors"))
        no_space()

    with pytest.raises(WriteError, match=r"cannot write .*best: No space left on device"):
        atomic_write_dir(step, weights_on_a_full_disk)
    assert everything_in(tmp_path) == {"best/state.json": b"old"}

    real_rename = Path.rename

    def rename(self, target):  # the old one is moved aside, then the new one cannot take its place
        return no_space() if self.name.startswith(".best.tmp-") else real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(WriteError, match="No space left on device"):
        atomic_write_dir(step, lambda tmp: (tmp / "state.json").write_text("new"))
    assert everything_in(tmp_path) == {"best/state.json": b"old"}


def test_outputs_get_the_permissions_of_a_plain_open_and_mkdir(tmp_path):
    """safetensors writes mode 600, tempfile.mkdtemp 700: neither may reach a run directory."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("")
    dir_mode, file_mode = ((tmp_path / n).stat().st_mode & 0o777 for n in ("plain", "plain.txt"))
    weights = {"w": torch.zeros(3)}
    atomic_write_dir(tmp_path / "best", lambda tmp: save_file(weights, str(tmp / "model.safetensors")))
    atomic_write_file(tmp_path / "model.safetensors", lambda tmp: save_file(weights, str(tmp)))
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {
        "plain": dir_mode,
        "plain.txt": file_mode,
        "best": dir_mode,
        "best/model.safetensors": file_mode,
        "model.safetensors": file_mode,
    }
    assert torch.equal(load_file(str(tmp_path / "best" / "model.safetensors"))["w"], weights["w"])


# --- training: each write site fails in turn; the run keeps every update it can -----------------------


class FullDiskAt:
    """The metrics file on a disk that fills when the record of `step` is written."""

    def __init__(self, file, step: int) -> None:
        self.file, self.step = file, step

    def write(self, text: str) -> int:
        if f'"step": {self.step},' in text:
            no_space()
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def fail_writes_of(monkeypatch, site: str, code: int) -> None:
    """Make the disk refuse (with `code`) a write of `site`: checkpoint and best/ at step 20, metrics
    at step 15, the plot and config.json at once."""

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    real_save_file, real_write_text, best_writes = checkpoint.save_file, Path.write_text, []

    def save_file(state, path, metadata=None):
        best_writes.extend([path] if ".best.tmp-" in path else [])
        second_best = best_writes[1:] == [path]
        if second_best if site == "best" else ".step-0000020.tmp-" in path:
            refuse()
        real_save_file(state, path, metadata=metadata)

    def write_text(path, text, **kwargs):
        return refuse() if path.name.startswith(".config.tmp-") else real_write_text(path, text, **kwargs)

    def open_metrics(*args, **kwargs):
        return FullDiskAt(open(*args, **kwargs), 15)  # noqa: SIM115 (the monitor closes it)

    if site == "metrics":
        monkeypatch.setattr(monitor, "open", open_metrics, raising=False)
    elif site == "plot":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)
    elif site == "config":
        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize(
    "site, code, failed, stopped_at, saved",
    [
        ("checkpoint", errno.ENOSPC, "checkpoints/step-0000020", 20, 10),  # the previous one stays
        ("checkpoint", errno.EROFS, "checkpoints/step-0000020", 20, 10),
        ("best", errno.ENOSPC, "best", 20, 20),  # the checkpoint is still written
        ("metrics", errno.ENOSPC, "metrics.jsonl", 15, 15),  # a checkpoint is written before stopping
        ("plot", errno.ENOSPC, "loss.png", 10, 10),  # after the checkpoint
        ("config", errno.ENOSPC, "config.json", 0, None),
    ],
)
def test_a_failed_write_stops_in_one_line_after_saving_what_it_can(
    tiny_data, tmp_path, monkeypatch, site, code, failed, stopped_at, saved
):
    run = tmp_path / "run"
    fail_writes_of(monkeypatch, site, code)
    with pytest.raises(WriteError) as error:
        train(tiny_run(max_iters=30, eval_interval=10), tiny_data, run)
    kept = f"the last good checkpoint is {run}/checkpoints/step-{saved:07d}" if saved else "no checkpoint"
    assert str(error.value).startswith(f"cannot write {run}/{failed}: {os.strerror(code)}; ")
    assert f"stopped at step {stopped_at}, {kept}" in str(error.value) and "\n" not in str(error.value)
    assert not list(run.rglob(".*")), "a temporary was left behind"
    if saved:
        state, _ = load_checkpoint(step_checkpoints(run)[-1])
        assert state["step"] == saved
    if site == "best":  # best/ kept step 10; the checkpoint counts that, so a better model replaces it
        best = json.loads((run / "best" / "state.json").read_text())
        assert best["step"] == 10 and state["best_val_loss"] == best["val_loss"]
    if site == "metrics":  # the disk freed, --resume goes on from the checkpoint the failure saved
        monkeypatch.undo()
        result = train(tiny_run(max_iters=30, eval_interval=10), tiny_data, run, resume=True)
        logged = [r["step"] for r in metrics(run, "train")]
        assert result.step == 30 and logged == [*range(1, 15), *range(16, 31)]  # lost: the refused record
