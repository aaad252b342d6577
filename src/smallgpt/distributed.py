"""Where a training run executes: device, number format, processes, and how batches and signals arrive.

One process trains on one device. Under `torchrun` there are WORLD_SIZE processes (RANK 0..W-1, one per
GPU, possibly on several machines); each draws its own micro-batches, and DistributedDataParallel
averages the gradients so every process applies the same update. Rank 0 alone logs and writes files.
NCCL carries the gradients between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smallgpt.errors import SmallGPTError
from smallgpt.loader import RandomBatches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` = CUDA, then Apple's MPS, then CPU; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SmallGPTError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmallGPTError("device cuda requested but PyTorch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SmallGPTError("device mps requested but MPS is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: bf16 on GPUs that have it, else fp16 on CUDA; fp32 on CPU and MPS."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision: matmuls in `dtype`, reductions and the weights themselves in fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: its rank, the world size, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor every rank holds (the tensor itself when alone)."""
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world_size
        return values

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. a Ctrl-C that reached only some ranks)."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor(float(flag), device=self.device)).item() > 0)


def start(device_name: str = "auto") -> Runtime:
    """Join the torchrun process group if launched by torchrun, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(0, 0, 1, pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process on each machine
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise SmallGPTError("multi-process training needs CUDA GPUs or CPUs, not MPS")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device)


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


class DeviceBatches:
    """Micro-batches already on the device, one drawn ahead; on CUDA copied from pinned memory so the
    copy overlaps the previous step's compute. `state_dict` excludes the batch drawn ahead."""

    def __init__(self, sampler: RandomBatches, device: torch.device):
        self.sampler, self.device = sampler, device
        self._fetch()

    def _fetch(self) -> None:
        self.state_before_ahead = self.sampler.state_dict()
        x, y = self.sampler.next_batch()
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        self.ahead = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.ahead
        self._fetch()
        return batch

    def state_dict(self) -> dict:
        return self.state_before_ahead

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._fetch()


class StopSignal:
    """Ctrl-C / SIGTERM ask the loop to save and stop after the current update; a second Ctrl-C kills."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, self.previous[signum])

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
