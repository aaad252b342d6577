"""Outputs when the disk says no: the old version stays whole, no temporary is left, one line.

Failures are injected where the bytes go down (a writer raising `OSError(ENOSPC)`), as the libraries
really report them (torch.save wraps the OSError, safetensors only quotes its number): first in the
atomic writers, then at each write site of a training run in turn. Last, the real thing: a small
filesystem that fills up mid-run, and a run directory made read-only.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from conftest import no_space
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from training_helpers import ONE_THREAD_ENV, REPO, cli_args, metrics, tiny_run

from smallgpt import checkpoint, monitor
from smallgpt.checkpoint import RunStart, load_checkpoint, step_checkpoints
from smallgpt.files import (
    WriteError,
    atomic_write_dir,
    atomic_write_file,
    atomic_write_files,
    os_error_behind,
    writing,
)
from smallgpt.train import train


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
    kept = (
        f"the last good checkpoint is {run}/checkpoints/step-{saved:07d} (continue with `smallgpt train "
        f"--resume {run}` once {run} can be written)"
        if saved
        else f"no checkpoint was written (start it again once {run} can be written)"
    )
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
        result = train(tiny_run(max_iters=30, eval_interval=10), tiny_data, run, start=RunStart.resume(run))
        logged = [r["step"] for r in metrics(run, "train")]
        assert result.step == 30 and logged == [*range(1, 15), *range(16, 31)]  # lost: the refused record


def test_a_full_disk_at_a_checkpoint_first_makes_the_room_the_prune_would(tiny_data, tmp_path, monkeypatch):
    """keep_last=2 on a disk with room for two checkpoints, not for the third a save writes before
    the prune: the oldest, which the prune deletes anyway, goes first, and the run ends normally."""
    run, real_save_file, refused = tmp_path / "run", checkpoint.save_file, []

    def save_file(state, path, metadata=None):
        if ".step-" in path and len(step_checkpoints(run)) == 2:
            refused.append(Path(path).parent.name[:13])
            no_space()
        real_save_file(state, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    result = train(tiny_run(max_iters=30, eval_interval=10, keep_last=2), tiny_data, run)
    assert result.step == 30 and refused == [".step-0000030"]
    assert [p.name for p in step_checkpoints(run)] == ["step-0000020", "step-0000030"]


def test_a_run_dir_deleted_mid_run_stops_and_saves_the_updates_in_its_place(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_log_train = monitor.RunMonitor.log_train

    def log_train(self, step, *args):
        if step == 15:
            shutil.rmtree(run)  # as `rm -rf run` from another shell would
        real_log_train(self, step, *args)

    monkeypatch.setattr(monitor.RunMonitor, "log_train", log_train)
    with pytest.raises(WriteError) as error:
        train(tiny_run(max_iters=30, eval_interval=10), tiny_data, run)
    assert str(error.value).startswith(
        f"{run} was deleted during the run; stopped at step 15, the last good checkpoint is "
        f"{run}/checkpoints/step-0000015"
    )
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_dir()) == [
        "checkpoints",
        "checkpoints/step-0000015",
    ]
    monkeypatch.undo()
    assert (
        train(tiny_run(max_iters=30, eval_interval=10), tiny_data, run, start=RunStart.resume(run)).step == 30
    )


# --- the real thing: a small filesystem that fills up, a directory made read-only -----------------

FILL_THE_DISK = r"""
mount -t tmpfs -o size=2m tmpfs "$DISK" || exit 77
RUN="$DISK/run"
"$PYTHON" -m smallgpt train --out "$RUN" "$@" > /dev/null 2> "$OUT/train.err" &
until [ -d "$RUN/checkpoints/step-0000010" ] || ! kill -0 $! 2> /dev/null; do sleep 0.05; done
dd if=/dev/zero of="$DISK/filler" bs=4k 2> /dev/null  # another job takes the rest of the disk
wait $!; echo $? > "$OUT/train.rc"
(cd "$RUN" && find . -printf '%y %m %p\n') > "$OUT/files"
rm "$DISK/filler"
"$PYTHON" -m smallgpt train --resume "$RUN" max_iters=30 > /dev/null 2> "$OUT/resume.err"
echo $? > "$OUT/resume.rc"; ls "$RUN/checkpoints" > "$OUT/resumed"
"""


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare to mount a small filesystem")
def test_a_disk_that_fills_mid_run_on_a_real_small_filesystem(tiny_data, tmp_path):
    """Training on a 2 MB tmpfs (mounted in a user namespace: no root needed) that another writer
    fills after the first checkpoint: one line, every file intact with plain permissions, and
    `--resume` goes on once the space is back."""
    (tmp_path / "disk").mkdir()
    env = {**ONE_THREAD_ENV, "DISK": str(tmp_path / "disk"), "OUT": str(tmp_path), "PYTHON": sys.executable}
    args = ["--data", str(tiny_data), *cli_args(max_iters=400, eval_interval=10)]
    command = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FILL_THE_DISK, "fill", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not (tmp_path / "train.rc").is_file():
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()[:200]}")
    error = (tmp_path / "train.err").read_text()
    listing = [line.split(" ", 2) for line in (tmp_path / "files").read_text().splitlines()]
    newest = "/".join(Path(max(n for _, _, n in listing if n.startswith("./checkpoints/step-"))).parts[:2])
    assert (tmp_path / "train.rc").read_text().strip() == "1" and len(error.strip().splitlines()) == 1, error
    assert error.startswith("error: cannot write ") and ": No space left on device; stopped at step " in error
    assert f"the last good checkpoint is {tmp_path}/disk/run/{newest} " in error
    assert not [name for _, _, name in listing if "/." in name], "a temporary was left behind"
    plain = {"d": 0o777 & ~umask(), "f": 0o666 & ~umask()}  # what mkdir and open give
    assert {name: int(mode, 8) for kind, mode, name in listing} == {n: plain[k] for k, _, n in listing}
    assert (tmp_path / "resume.rc").read_text().strip() == "0", (tmp_path / "resume.err").read_text()
    assert (tmp_path / "resumed").read_text().split()[-1] == "step-0000030"


def test_a_run_dir_made_read_only_mid_run(tiny_data, tmp_path):
    """chmod a-w on the run directory while training: one line naming the refused write and the
    checkpoint that stays. Root writes anyway, so as root the run is a user namespace's user 1000."""
    as_user = []
    if os.geteuid() == 0:
        as_user = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
        if not shutil.which("unshare") or subprocess.run([*as_user, "true"]).returncode != 0:
            pytest.skip("as root, and no user namespace to run as an ordinary user")
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), *cli_args(max_iters=400, eval_interval=10)]
    training = subprocess.Popen(
        [*as_user, sys.executable, "-m", "smallgpt", *args], cwd=REPO, env=ONE_THREAD_ENV, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    while not (run / "checkpoints" / "step-0000010").is_dir() and training.poll() is None:
        time.sleep(0.05)
    for directory in (run, run / "checkpoints"):
        directory.chmod(0o555)
    _, error = training.communicate(timeout=300)
    for directory in (run, run / "checkpoints"):
        directory.chmod(0o755)
    newest = step_checkpoints(run)[-1]
    assert training.returncode == 1 and len(error.strip().splitlines()) == 1, error
    assert (
        error.startswith(f"error: cannot write {run}/") and ": Permission denied; stopped at step " in error
    )
    assert f"the last good checkpoint is {newest} " in error and load_checkpoint(newest)
    assert not list(run.rglob(".*")), "a temporary was left behind"
