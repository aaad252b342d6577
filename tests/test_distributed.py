"""DDP under torchrun: 2 gloo processes on the CPU train exactly what one process with twice the
gradient accumulation trains (the same samples per update, the gradients averaged)."""

import shutil
import subprocess
import sys

import torch
from training_helpers import (
    ONE_THREAD_ENV,
    REPO,
    cli_args,
    final_weights,
    metrics,
    tiny_run,
    write_data,
)

from smallgpt.train import train


def torchrun_train(data, out, settings) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "smallgpt", "train", "--data", str(data), "--out", str(out), *cli_args(**settings)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ONE_THREAD_ENV, timeout=240)


def test_two_gloo_processes_match_one_process_with_doubled_accumulation(tmp_path):
    data = write_data(tmp_path / "data")
    settings = dict(max_iters=20, batch_size=4, micro_batch_size=2)  # 1 process: 2 micro-batches per update
    single = tmp_path / "single"
    train(tiny_run(**settings), data, single)

    ddp = tmp_path / "ddp"  # 2 processes: 1 micro-batch each per update
    result = torchrun_train(data, ddp, settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("budget:") == 1  # rank 0 speaks

    single_losses = [r["loss"] for r in metrics(single, "train")]
    ddp_losses = [r["loss"] for r in metrics(ddp, "train")]
    assert len(ddp_losses) == len(single_losses) == 20
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), atol=1e-5, rtol=1e-5)
    assert_close_weights(final_weights(ddp), final_weights(single))
    final_single, final_ddp = metrics(single, "final")[0], metrics(ddp, "final")[0]
    assert abs(final_single["val_loss"] - final_ddp["val_loss"]) < 1e-5  # full pass split over ranks

    # Resume across world sizes: the DDP run's step-10 checkpoint, continued by one process.
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000020")
    train(tiny_run(**settings), data, resumed, resume=True)
    assert_close_weights(final_weights(resumed), final_weights(single))


def assert_close_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4)
