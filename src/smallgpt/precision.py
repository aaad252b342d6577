"""Which number format a CPU computes in: measured on the machine at hand, once, then remembered.

GPUs all multiply bf16 (or fp16) far faster than fp32, so `dtype=auto` picks it there by name. CPUs
differ: one with AMX or AVX-512 BF16 multiplies bf16 several times faster than fp32, one without
emulates it and is slower. So on a CPU `auto` times the model's own matmul shapes both ways (about a
second) and trains in bf16 autocast, with fp32 master weights and fp32 softmax and sums, only where
bf16 wins by BF16_MARGIN. Two kinds of work get their own verdicts, because their kernels are not the
big matmuls': Muon's Newton-Schulz iterations (small square matmuls: torch's bf16, unless fp32 is
faster by that margin) and attention with its backward (PyTorch's CPU flash-attention kernel, whose
bf16 backward can be several times slower than its fp32 one at small head sizes). The result is
stored in the cache directory under a key of everything it depends on (CPU model and flags, the
instruction-set caps oneDNN and ATen are given, torch version, shapes), so later runs on the same
machine pay nothing; an unreadable or foreign cache file is measured again and rewritten, never
trusted and never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
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
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # environment variables that limit the kernels
CACHE_VERSION = 2
BF16_MARGIN = 1.25  # bf16 must be this much faster: autocast's casts and a rounding cost are not free
BURST_SECONDS, ROUNDS = 0.01, 5  # a shape is timed in bursts of ~10 ms; the best of 5 counts


@dataclass(frozen=True)
class Decision:
    """The measured verdict: the training dtype, Muon's Newton-Schulz dtype, attention's, and why."""

    dtype: torch.dtype
    ns_dtype: torch.dtype
    speedup: float  # fp32 time / bf16 time over the model's matmul shapes
    ns_speedup: float  # the same for the Newton-Schulz shapes
    attention_dtype: torch.dtype | None = None  # training's attention (forward + backward); None: dtype's
    attention_speedup: float = float("nan")  # fp32 time / bf16 time of attention's forward + backward
    cached: bool = False
    measured: bool = True  # False: named by the config, or by the device (GPUs)

    def describe(self) -> str:
        if not self.measured:
            return name(self.dtype)
        how = "cached" if self.cached else "measured now"
        attention = f", attention in {name(self.attention_dtype)}" if self.attention_dtype else ""
        return (
            f"{name(self.dtype)} (auto: bf16 matmuls {self.speedup:.1f}x fp32 on this CPU, "
            f"Newton-Schulz in {name(self.ns_dtype)}{attention}; {how})"
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


def attention_shape(config: ModelConfig, rows: int) -> tuple[int, int, int, int]:
    """(batch, heads, T, head_dim) of one micro-batch's attention."""
    return (max(1, rows // config.block_size), config.n_head, config.block_size, config.head_dim)


def matmul(m: int, k: int, n: int):
    """A probe: given a dtype, a call that multiplies an m x k by a k x n matrix in it."""

    def make(dtype: torch.dtype):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        return lambda: a @ b

    return make


def attention(batch: int, heads: int, T: int, head_dim: int):
    """A probe: causal attention forward and backward, as training runs it."""

    def make(dtype: torch.dtype):
        q, k, v = (torch.randn(batch, heads, T, head_dim).to(dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(batch, heads, T, head_dim).to(dtype)
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(
            grad
        )

    return make


def probes(config: ModelConfig, rows: int) -> list[list]:
    """What the verdicts weigh: the model's matmuls, Newton-Schulz's, attention forward + backward."""
    return [
        [matmul(*shape) for shape in model_shapes(config, rows)],
        [matmul(*shape) for shape in newton_schulz_shapes(config)],
        [attention(*attention_shape(config, rows))],
    ]


def seconds_per_probe(probe_lists: list[list]) -> dict[torch.dtype, list[float]]:
    """Per dtype, the summed time of one call of each probe in each list, best of ROUNDS.

    What is compared is the core's instruction set (AMX, AVX-512 BF16 or neither), so the probe runs
    on one thread and counts that thread's CPU time: a machine busy with other jobs then delays the
    probe without skewing it. fp32 and bf16 also take turns in every round, so a moment of contention
    for the caches slows one burst of each rather than one dtype's whole measurement.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best_times(probe_lists)
    finally:
        torch.set_num_threads(threads)


def _best_times(probe_lists: list[list]) -> dict[torch.dtype, list[float]]:
    dtypes = (torch.float32, torch.bfloat16)
    calls = {d: [[make(d) for make in probes_] for probes_ in probe_lists] for d in dtypes}
    best = {d: [[math.inf] * len(probes_) for probes_ in probe_lists] for d in dtypes}
    repeats = {}
    for round_ in range(ROUNDS):
        for d, (i, j) in itertools.product(dtypes, _indices(probe_lists)):
            call = calls[d][i][j]
            if round_ == 0:  # warm-up (kernel choice, packing), then repeats for a burst of BURST_SECONDS
                call()
                started = time.thread_time()
                call()
                repeats[d, i, j] = max(1, round(BURST_SECONDS / max(time.thread_time() - started, 1e-7)))
            started = time.thread_time()
            for _ in range(repeats[d, i, j]):
                call()
            best[d][i][j] = min(best[d][i][j], (time.thread_time() - started) / repeats[d, i, j])
    return {d: [sum(times) for times in best[d]] for d in dtypes}


def _indices(probe_lists):
    return [(i, j) for i, probes_ in enumerate(probe_lists) for j in range(len(probes_))]


def measure(config: ModelConfig, rows: int) -> Decision:
    """Time the model's shapes, Newton-Schulz's and attention in fp32 and bf16; pick each one's dtype."""
    times = seconds_per_probe(probes(config, rows))
    speedup, ns_speedup, attention_speedup = (fp32 / bf16 for fp32, bf16 in zip(*times.values(), strict=True))
    dtype = torch.bfloat16 if speedup >= BF16_MARGIN else torch.float32
    return Decision(
        dtype=dtype,
        # torch.optim.Muon's own choice, bf16, unless fp32 is faster by the margin here
        ns_dtype=torch.float32 if ns_speedup * BF16_MARGIN <= 1 else torch.bfloat16,
        speedup=speedup,
        ns_speedup=ns_speedup,
        # in a bf16 run, attention in whichever of the two is faster here (its inputs are cast either way)
        attention_dtype=torch.float32 if dtype == torch.bfloat16 and attention_speedup < 1 else None,
        attention_speedup=attention_speedup,
    )


def machine_key(config: ModelConfig, rows: int) -> str:
    """A digest of everything a verdict depends on: CPU model and flags, torch, shapes."""
    facts = {
        "cpu": cpu_description(),
        # A capped instruction set (e.g. ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, a Xeon without native bf16)
        # changes the verdict on the same CPU.
        "isa_caps": {name: os.environ.get(name) for name in ISA_CAPS},
        "torch": torch.__version__,
        "shapes": model_shapes(config, rows) + newton_schulz_shapes(config) + [attention_shape(config, rows)],
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
        attention_dtype = entry["attention_dtype"] and getattr(torch, entry["attention_dtype"])
        if {dtype, ns_dtype, attention_dtype} - {torch.float32, torch.bfloat16, None}:
            return None
        return Decision(
            dtype, ns_dtype, float(entry["speedup"]), float(entry["ns_speedup"]),
            attention_dtype, float(entry["attention_speedup"]), cached=True,
        )  # fmt: skip
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
        "attention_dtype": decision.attention_dtype and name(decision.attention_dtype),
        "attention_speedup": decision.attention_speedup,
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
