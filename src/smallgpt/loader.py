"""Training and evaluation batches from prepared token files (`train.bin` / `val.bin`).

A prepared split is one long stream of uint16 GPT-2 ids (documents separated by `<|endoftext|>`). A
training example is any window of `block_size + 1` consecutive tokens: the first `block_size` are the
input x, the last `block_size` the target y, so y[t] is the token that follows x[t].

The files are memory-mapped, so a 9B-token corpus costs no RAM: only the windows a batch touches are
read. Random sampling is *counter-based*: the k-th batch drawn by rank r of a world of W processes uses
global micro-batch number g = k * W + r and seeds a fresh generator with (seed, g). Nothing hidden
accumulates, so the whole sampler state is one counter (exact resume), and W ranks drawing one batch
each see exactly what one process sees drawing W batches (gradient accumulation ≡ data parallelism).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from smallgpt.errors import SmallGPTError

SPLITS = ("train", "val")


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """The tokens of `data_dir/{split}.bin` as a read-only uint16 memory map."""
    if split not in SPLITS:
        raise SmallGPTError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise SmallGPTError(f"no {split}.bin in {data_dir}: prepare the data first with `smallgpt prepare`")
    size = path.stat().st_size
    if size == 0:
        raise SmallGPTError(f"{path} is empty (was it prepared with --val-fraction 0?)")
    if size % 2:
        raise SmallGPTError(f"{path} has an odd number of bytes: not a uint16 token file")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _check_layout(tokens: np.ndarray, block_size: int, batch_size: int, rank: int, world_size: int) -> None:
    if block_size < 1 or batch_size < 1:
        raise SmallGPTError(
            f"block_size and batch_size must be at least 1, not {block_size} and {batch_size}"
        )
    if not 0 <= rank < world_size:
        raise SmallGPTError(f"rank {rank} is outside a world of size {world_size}")
    if len(tokens) < block_size + 1:
        raise SmallGPTError(
            f"the split has {len(tokens):,} tokens, fewer than block_size + 1 = {block_size + 1}: "
            "use a smaller block size or more data"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows tokens[s : s + block_size + 1] and cut them into (x, y) int64 tensors."""
    windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


class RandomBatches:
    """Random (x, y) windows for training; reproducible from (seed, batch counter) alone."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_layout(tokens, block_size, batch_size, rank, world_size)
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.calls = 0  # batches this rank has drawn so far

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape (batch_size, block_size); y is x shifted left by one token."""
        global_index = self.calls * self.world_size + self.rank
        rng = np.random.default_rng((self.seed, global_index))
        # A window needs block_size + 1 tokens, so the last valid start is len - block_size - 1.
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        self.calls += 1
        return _windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict:
        """JSON-serialisable and identical on every rank: the seed and how far the world has got."""
        return {"seed": self.seed, "calls": self.calls, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off, even under a different number of ranks.

        The world had drawn calls * world_size micro-batches; that count must split evenly over the
        new world so that no micro-batch is skipped or drawn twice.
        """
        drawn = int(state["calls"]) * int(state["world_size"])
        if drawn % self.world_size:
            raise SmallGPTError(
                f"cannot resume {drawn} micro-batches drawn by {state['world_size']} ranks "
                f"on {self.world_size} ranks: the count does not divide evenly"
            )
        self.seed = int(state["seed"])
        self.calls = drawn // self.world_size


def sequential_batches(
    tokens: np.ndarray, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every non-overlapping block once, in order, for deterministic evaluation.

    Block i is tokens[i*T : i*T + T] with target tokens[i*T + 1 : i*T + T + 1]; there are
    (len - 1) // T of them. Rank r takes blocks r, r + W, r + 2W, ...: disjoint across ranks and
    together covering every block. The last batch of a rank may be smaller than batch_size.
    """
    _check_layout(tokens, block_size, batch_size, rank, world_size)
    block_starts = np.arange(rank, (len(tokens) - 1) // block_size, world_size) * block_size
    for first in range(0, len(block_starts), batch_size):
        yield _windows(tokens, block_starts[first : first + batch_size], block_size)
