"""Where a training run executes: device, number format, processes, and how stop signals arrive.

One process trains on one device. Under `torchrun` there are WORLD_SIZE processes (RANK 0..W-1, one per
GPU, possibly on several machines); each draws its own micro-batches, and DistributedDataParallel
averages the gradients so every process applies the same update. Rank 0 alone logs and writes files.
NCCL carries the gradients between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smallgpt.errors import SmallGPTError

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
    world_size, rank, local_rank = _launch_env()
    if world_size == 1:
        return Runtime(0, 0, 1, pick_device(device_name))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process on each machine
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise SmallGPTError("multi-process training needs CUDA GPUs or CPUs, not MPS")
    if not dist.is_initialized():
        # DDP's first use imports torch.distributed.nn, whose functions take `group=group.WORLD` as a
        # default argument. Imported after the group exists, those defaults would hold it for good, so
        # `stop` could never join its worker threads (see there). Imported now, they hold None.
        from torch.distributed import nn  # noqa: F401

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device)


# glibc's mallopt parameters: allocations above the first come from mmap (fresh, faulting pages);
# free memory above the second at the heap's top goes back to the OS.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(device: torch.device) -> None:
    """On a CPU, let this process reuse the memory it frees instead of handing it back to the OS.

    A CPU training step allocates tens of megabytes afresh for each large tensor (the tied embedding's
    gradient, bf16 copies of the head, loss tiles). By default glibc maps such blocks from the OS and
    unmaps them when freed, so every step pays for zero-filling page faults on first touch: a tenth
    of `tiny-modern`'s step on a 2-core Xeon (benchmarks/RESULTS.md). Raising the mmap and trim
    thresholds keeps the pages in the heap; peak memory is unchanged. Linux/glibc only; a no-op
    elsewhere, and on GPUs (whose tensors are not glibc's)."""
    if device.type != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    # older glibc caps the mmap threshold at 32 MiB (64-bit); then that much
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # (a C int)


LAUNCH_HINT = "launch multi-process training with torchrun --nproc_per_node=N -m smallgpt train ..."


def _launch_env() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them, checked: a stray WORLD_SIZE fails here."""
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = os.environ.get(name)
        try:
            values[name] = None if text is None else int(text)
        except ValueError:
            raise SmallGPTError(f"{name}={text!r} is not a whole number: {LAUNCH_HINT}") from None
    world_size = values["WORLD_SIZE"] if values["WORLD_SIZE"] is not None else 1
    if world_size < 1:
        raise SmallGPTError(f"WORLD_SIZE={world_size} must be at least 1: {LAUNCH_HINT}")
    if world_size == 1:
        return 1, 0, 0
    missing = [n for n in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise SmallGPTError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: {LAUNCH_HINT}")
    rank, local_rank = values["RANK"], values["LOCAL_RANK"]
    if not 0 <= rank < world_size or local_rank < 0:
        raise SmallGPTError(f"RANK={rank} is outside a world of WORLD_SIZE={world_size}: {LAUNCH_HINT}")
    return world_size, rank, local_rank


def stop(runtime: Runtime) -> None:
    """Leave the process group and join its worker threads. Drop every DDP wrapper first.

    gloo runs each collective on a worker thread, which lets go of the collective's tensors only after
    waking the caller. If the process group outlived this call (a DDP wrapper holds it too), those
    threads would still be running while Python shuts down; one releasing the last reference to a
    tensor then needs the interpreter lock, is made to exit by Python mid-destructor, and the C++
    runtime aborts the process ("terminate called without an active exception", SIGABRT). Destroying
    the last reference here joins the threads while the interpreter is fully alive.
    """
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
