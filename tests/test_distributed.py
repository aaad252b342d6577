"""DDP's launch environment, thread hygiene, micro-batch fitting and MFU accounting. That 2 gloo
processes under torchrun train what one process accumulating twice trains (and resume across world
sizes) is checked for every architecture in test_architectures."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_one_line_error
from rich.console import Console
from training_helpers import (
    ONE_THREAD_ENV,
    REPO,
    cli_args,
    metrics,
    tiny_run,
    write_data,
)

from smallgpt import distributed
from smallgpt import monitor as monitor_module
from smallgpt.errors import SmallGPTError
from smallgpt.monitor import RunMonitor, datasheet_peak
from smallgpt.runs import train_command
from smallgpt.train import micro_batch_for_world, train


def gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    names = [(tasks / t / "comm").read_text().strip() for t in os.listdir(tasks)]
    return [name for name in names if "gloo" in name]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_training_under_a_process_group_leaves_no_gloo_thread_running(tmp_path, monkeypatch):
    """A gloo worker thread still alive when Python shuts down aborts the process if it then lets go of
    a tensor (see distributed.stop): train() must end with the group's threads joined."""
    real_init = dist.init_process_group
    monkeypatch.setattr(
        dist, "init_process_group",  # the launch env says 2 processes; gloo gets a group of 1
        lambda backend: real_init(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1),
    )  # fmt: skip
    launch = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    assert not gloo_threads()
    train(
        tiny_run(max_iters=2, eval_interval=2, batch_size=4, micro_batch_size=2),
        write_data(tmp_path),
        tmp_path / "run",
    )
    assert not dist.is_initialized() and not gloo_threads()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
         "RANK=2 is outside a world of WORLD_SIZE=2"),
    ],
)  # fmt: skip
def test_a_stray_launch_environment_is_refused_in_one_line(env, message, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SmallGPTError, match=re.escape(message) + ".*torchrun"):
        distributed.start("cpu")


def test_world_size_without_rank_fails_in_one_line_at_the_cli(tmp_path):
    env = {k: v for k, v in ONE_THREAD_ENV.items() if k not in ("RANK", "LOCAL_RANK")}
    command = [sys.executable, "-m", "smallgpt", "train", "--data", str(write_data(tmp_path)), *cli_args()]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**env, "WORLD_SIZE": "2"})
    assert_one_line_error(result, "error: WORLD_SIZE=2 is set but RANK")


@pytest.mark.parametrize(
    "batch, micro, world, expected",
    [(8, 8, 2, 4), (8, 8, 1, 8), (32, 8, 2, 8), (24, 8, 2, 6), (8, 8, 3, 8), (12, 4, 8, 4)],
)
def test_the_micro_batch_shrinks_to_share_the_batch_over_the_processes(batch, micro, world, expected):
    console = Console(record=True, width=200)
    run = tiny_run(batch_size=batch, micro_batch_size=micro)
    fitted = micro_batch_for_world(run, world, console)
    assert fitted.train.micro_batch_size == expected
    assert fitted.train.batch_size == batch and fitted.model == run.model
    said = console.export_text()
    assert (f"micro_batch_size {micro} -> {expected}" in said) == (expected != micro)


def test_only_a_micro_batch_the_user_did_not_choose_is_fitted(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("smallgpt.runs.train", lambda *args, **kwargs: seen.append(kwargs["fit_micro_batch"]))
    data = str(write_data(tmp_path / "data"))
    config = tmp_path / "run.toml"
    config.write_text("[train]\nmicro_batch_size = 4\n")
    train_command([], preset="tiny", data=data, out=str(tmp_path / "a"))
    train_command(["micro_batch_size=4"], preset="tiny", data=data, out=str(tmp_path / "b"))
    train_command([], preset="tiny", config_file=str(config), data=data, out=str(tmp_path / "c"))
    assert seen == [True, False, False]


def test_mfu_divides_by_the_peak_of_every_process(tmp_path):
    monitor = RunMonitor(
        tmp_path, Console(quiet=True), start_step=0, max_steps=10, tokens_per_step=1000, flops_per_token=6,
        measure_peak=lambda: 1e6, enabled=True, devices=2, datasheet_peak=4e6,
    )  # fmt: skip
    monitor.log_train(1, 2.0, 1e-3)
    monitor.close()
    record = metrics(tmp_path, "train")[0]
    assert record["mfu"] == pytest.approx(6 * record["tokens_per_s"] / (2 * 1e6))
    assert record["mfu_datasheet"] == pytest.approx(record["mfu"] / 4)


def test_training_speed_leaves_out_the_evaluations_between_logs(tmp_path, monkeypatch):
    clock = iter([0.0, 10.0, 30.0, 31.0])  # start; log at 10 s; an evaluation until 30 s; log at 31 s
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: next(clock))
    monitor = RunMonitor(
        tmp_path, Console(quiet=True), start_step=0, max_steps=20, tokens_per_step=100, flops_per_token=6,
        measure_peak=lambda: 1e6, enabled=True,
    )  # fmt: skip
    monitor.log_train(10, 2.0, 1e-3)  # 10 updates in 10 s
    monitor.resume_clock()  # the evaluation ended at 30 s
    monitor.log_train(11, 2.0, 1e-3)  # one update in the 1 s since
    monitor.close()
    assert [r["tokens_per_s"] for r in metrics(tmp_path, "train")] == [100.0, 100.0]


@pytest.mark.parametrize(
    "name, dtype, peak",
    [("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12), ("NVIDIA H100 PCIe", torch.float16, 756e12),
     ("NVIDIA H200", torch.bfloat16, 989e12), ("NVIDIA H100 80GB HBM3", torch.float32, None),
     ("Tesla T4", torch.float16, None)],
)  # fmt: skip
def test_datasheet_peaks_are_known_for_h100_and_h200_only(name, dtype, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert datasheet_peak(torch.device("cuda"), dtype) == peak
    assert datasheet_peak(torch.device("cpu"), torch.bfloat16) is None
