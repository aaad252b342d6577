"""Which number format a CPU computes in: measured on the machine at hand, once, then remembered.

GPUs all multiply bf16 (or fp16) far faster than fp32, so `dtype=auto` picks it there by name. CPUs
differ: one with AMX or AVX-512 BF16 multiplies bf16 several times faster than fp32, one without
emulates it and is slower. So on a CPU `auto` times the model's own matmul shapes both ways (about a
second) and trains in bf16 autocast, with fp32 master weights and fp32 softmax and sums, only where
bf16 wins by BF16_MARGIN. Muon's Newton-Schulz iterations (small square matmuls) get their own
verdict: torch's bf16, unless fp32 is faster by that margin (a CPU that emulates bf16). The result
is stored in the cache directory under a key of everything it depends on (CPU model and flags, torch
version, shapes), so later runs on the same machine pay nothing; an unreadable or foreign cache file
is measured again and rewritten, never trusted and never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smallgpt.config import ModelConfig
from smallgpt.distributed import DTYPES, pick_dtype
from smallgpt.errors import SmallGPTError
from smallgpt.loss import tile_columns

CACHE_NAME = "precision.json"
CACHE_VERSION = 1
BF16_MARGIN = 1.25  # bf16 must be this much faster: autocast's casts and a rounding cost are not free
BURST_SECONDS, ROUNDS = 0.01, 5  # a shape is timed in bursts of ~10 ms; the best of 5 counts


@dataclass(frozen=True)
class Decision:
    """The measured verdict: the training dtype, Muon's Newton-Schulz dtype, and why."""

    dtype: torch.dtype
    ns_dtype: torch.dtype
    speedup: float  # fp32 time / bf16 time over the model's matmul shapes
    ns_speedup: float  # the same for the Newton-Schulz shapes
    cached: bool = False
    measured: bool = True  # False: named by the config, or by the device (GPUs)

    def describe(self) -> str:
        if not self.measured:
            return name(self.dtype)
        how = "cached" if self.cached else "measured now"
        return (
            f"{name(self.dtype)} (auto: bf16 matmuls {self.speedup:.1f}x fp32 on this CPU, "
            f"Newton-Schulz in {name(self.ns_dtype)}; {how})"
        )


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_shapes(config: ModelConfig, rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the forward matmuls one micro-batch of `rows` tokens makes: each distinct block
    weight, and one tile of the head (`smallgpt.loss`)."""
    C, F = config.n_embd, config.ffn_hidden
    block = {(rows, C, 3 * C), (rows, C, C), (rows, C, F), (rows, F, C)}
    return sorted(block) + [(rows, C, tile_columns(rows))]


def newton_schulz_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(m, k, n) of the Gram matmuls X X^T of Newton-Schulz for the blocks' matrices (short side m)."""
    C, F = config.n_embd, config.ffn_hidden
    return sorted({(C, C, C), (min(C, F), max(C, F), min(C, F))})


def seconds_per_shape(shape_lists: list[list[tuple[int, int, int]]]) -> dict[torch.dtype, list[float]]:
    """Per dtype, the summed time of one matmul of each shape in each list, best of ROUNDS.

    What is compared is the core's instruction set (AMX, AVX-512 BF16 or neither), so the probe runs
    on one thread and counts that thread's CPU time: a machine busy with other jobs then delays the
    probe without skewing it. fp32 and bf16 also take turns in every round, so a moment of contention
    for the caches slows one burst of each rather than one dtype's whole measurement.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best_times(shape_lists)
    finally:
        torch.set_num_threads(threads)


def _best_times(shape_lists: list[list[tuple[int, int, int]]]) -> dict[torch.dtype, list[float]]:
    dtypes = (torch.float32, torch.bfloat16)
    operands = {d: [[(torch.randn(m, k).to(d), torch.randn(k, n).to(d)) for m, k, n in shapes]
                    for shapes in shape_lists] for d in dtypes}  # fmt: skip
    best = {d: [[math.inf] * len(shapes) for shapes in shape_lists] for d in dtypes}
    calls = {}
    for round_ in range(ROUNDS):
        for d, (i, j) in itertools.product(dtypes, _indices(shape_lists)):
            a, b = operands[d][i][j]
            if round_ == 0:  # warm-up (kernel choice, packing), then calls for a burst of BURST_SECONDS
                a @ b
                started = time.thread_time()
                a @ b
                calls[d, i, j] = max(1, round(BURST_SECONDS / max(time.thread_time() - started, 1e-7)))
            started = time.thread_time()
            for _ in range(calls[d, i, j]):
                a @ b
            best[d][i][j] = min(best[d][i][j], (time.thread_time() - started) / calls[d, i, j])
    return {d: [sum(times) for times in best[d]] for d in dtypes}


def _indices(shape_lists):
    return [(i, j) for i, shapes in enumerate(shape_lists) for j in range(len(shapes))]


def measure(config: ModelConfig, rows: int) -> Decision:
    """Time the model's shapes and the Newton-Schulz shapes in fp32 and bf16; pick each one's dtype."""
    times = seconds_per_shape([model_shapes(config, rows), newton_schulz_shapes(config)])
    speedup, ns_speedup = (fp32 / bf16 for fp32, bf16 in zip(*times.values(), strict=True))
    return Decision(
        dtype=torch.bfloat16 if speedup >= BF16_MARGIN else torch.float32,
        # torch.optim.Muon's own choice, bf16, unless fp32 is faster by the margin here
        ns_dtype=torch.float32 if ns_speedup * BF16_MARGIN <= 1 else torch.bfloat16,
        speedup=speedup,
        ns_speedup=ns_speedup,
    )


def machine_key(config: ModelConfig, rows: int) -> str:
    """A digest of everything a verdict depends on: CPU model and flags, torch, shapes."""
    facts = {
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "shapes": model_shapes(config, rows) + newton_schulz_shapes(config),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def cpu_description() -> str:
    """The CPU's model name and feature flags (Linux), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    found = {line for line in lines if line.split(":")[0].strip() in wanted}
    return "\n".join(sorted(found, key=lambda line: (not line.startswith("model name"), line)))


def cache_file() -> Path:
    from smallgpt.prepare import cache_dir  # prepare pulls in the tokenizer: only when asked

    return cache_dir() / CACHE_NAME


def read_cache(path: Path) -> dict:
    """The cache's entries; empty when missing, unreadable, corrupt or of another version."""
    try:
        saved = json.loads(path.read_text())
        return saved["entries"] if saved.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def decision_from(entry) -> Decision | None:
    """A cached entry as a Decision; None when it is damaged in any way."""
    try:
        dtype, ns_dtype = getattr(torch, entry["dtype"]), getattr(torch, entry["ns_dtype"])
        if {dtype, ns_dtype} - {torch.float32, torch.bfloat16}:
            return None
        return Decision(dtype, ns_dtype, float(entry["speedup"]), float(entry["ns_speedup"]), cached=True)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def cpu_decision(config: ModelConfig, rows: int) -> Decision:
    """This machine's verdict for `config` at `rows` tokens per micro-batch: cached, or measured now
    and cached (a cache that cannot be written costs a measurement next time, nothing more)."""
    from smallgpt.files import atomic_write_text

    path, key = cache_file(), machine_key(config, rows)
    entries = read_cache(path)
    found = decision_from(entries.get(key))
    if found is not None:
        return found
    decision = measure(config, rows)
    entries = {k: v for k, v in entries.items() if decision_from(v) is not None}
    entries[key] = {
        "dtype": name(decision.dtype), "ns_dtype": name(decision.ns_dtype),
        "speedup": decision.speedup, "ns_speedup": decision.ns_speedup,
        "cpu": cpu_description().partition("\n")[0], "torch": torch.__version__,  # for a reader
    }  # fmt: skip
    with contextlib.suppress(SmallGPTError):
        atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
    return decision


def resolve_precision(name_: str, device: torch.device, config: ModelConfig, rows: int) -> Decision:
    """The run's precision: a named dtype as given; `auto`: by name on GPUs, by measurement on CPUs."""
    if name_ not in ("auto", *DTYPES):
        raise SmallGPTError(f"unknown dtype {name_!r}: use auto or one of {', '.join(DTYPES)}")
    if name_ == "auto" and device.type == "cpu":
        return cpu_decision(config, rows)
    dtype = pick_dtype(name_, device)
    ns_dtype = torch.bfloat16  # torch.optim.Muon's own
    return Decision(dtype, ns_dtype, speedup=float("nan"), ns_speedup=float("nan"), measured=False)
