"""Training and evaluation batches from prepared token files (`train.bin` / `val.bin`).

A prepared split is one long stream of uint16 GPT-2 ids (documents separated by `<|endoftext|>`). A
training example is any window of `block_size + 1` consecutive tokens: the first `block_size` are the
input x, the last `block_size` the target y, so y[t] is the token that follows x[t].

The files are memory-mapped, so a 9B-token corpus costs no RAM: only the windows a batch touches are
read. Random sampling is *counter-based*: the k-th batch drawn by rank r of a world of W processes uses
global micro-batch number g = k * W + r and seeds a fresh generator with (seed, g). Nothing hidden
accumulates, so the whole sampler state is one counter (exact resume), and W ranks drawing one batch
each see exactly what one process sees drawing W batches (gradient accumulation ≡ data parallelism).
`EpochBatches` draws the same way but visits every window once per epoch, in a shuffled order.

Opening a split checks its ids against the model's vocabulary once, so a foreign or damaged file is
refused in one line instead of failing inside the embedding: `meta.json` records each split's largest
id, and a file it does not describe (other size, or newer) is scanned instead. `training_data` opens
both splits for a run and refuses a corpus too small to train on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from smallgpt.errors import SmallGPTError

SPLITS = ("train", "val")
SCAN_CHUNK = 1 << 24  # tokens per step of the largest-id scan: 32 MB read at a time, memory stays flat


def load_split(data_dir: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """The tokens of `data_dir/{split}.bin` as a read-only uint16 memory map (ids < `vocab_size`)."""
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
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if vocab_size is not None:
        require_vocabulary(tokens, vocab_size, str(path), _recorded_largest_id(path, len(tokens)))
    return tokens


def require_vocabulary(tokens: np.ndarray, vocab_size: int, where: str, largest: int | None = None) -> None:
    """Refuse tokens with an id the model has no embedding for (`largest`: known in advance)."""
    if largest is None and len(tokens):
        largest = max(int(tokens[i : i + SCAN_CHUNK].max()) for i in range(0, len(tokens), SCAN_CHUNK))
    if largest is not None and largest >= vocab_size:
        raise SmallGPTError(
            f"{where} holds token id {largest}, but the model's vocabulary has only {vocab_size} ids: "
            "prepare the data with the model's tokenizer, or raise vocab_size"
        )


def _recorded_largest_id(path: Path, length: int) -> int | None:
    """The split's largest id from meta.json, if meta.json describes this very file; else None."""
    meta = path.with_name("meta.json")
    try:
        stats = json.loads(meta.read_text())["splits"][path.stem]
        largest = stats["max_token_id"]
        fresh = stats["tokens"] == length and path.stat().st_mtime <= meta.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):  # absent, damaged, or written before the field
        return None
    return largest if fresh and type(largest) is int else None


def data_identity(data_dir: str | Path) -> dict:
    """What a run trains on, recorded in its checkpoints: where it was, the tokenizer that made it
    (meta.json's hash; None without meta.json) and each split's token count."""
    data_dir = Path(data_dir).resolve()
    try:
        tokenizer = json.loads((data_dir / "meta.json").read_text())["tokenizer"]["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    tokens = {split: (data_dir / f"{split}.bin").stat().st_size // 2 for split in SPLITS}
    return {"path": str(data_dir), "tokenizer_hash": tokenizer, "tokens": tokens}


def same_data(recorded: dict, current: dict) -> bool:
    """Same tokenizer and token counts: the same data, even if it has moved."""
    return all(recorded.get(key) == current[key] for key in ("tokenizer_hash", "tokens"))


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
        starts = self.window_starts(self.calls * self.world_size + self.rank)
        self.calls += 1
        return _windows(self.tokens, starts, self.block_size)

    def window_starts(self, global_index: int) -> np.ndarray:
        """Where the windows of the world's micro-batch number `global_index` start: anywhere, each
        drawn independently (so a window may repeat before another is ever seen)."""
        rng = np.random.default_rng((self.seed, global_index))
        # A window needs block_size + 1 tokens, so the last valid start is len - block_size - 1.
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

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


class EpochBatches(RandomBatches):
    """Random (x, y) windows that visit the split evenly: each epoch, every one of n non-overlapping
    windows once, in a shuffled order, from a random offset (`TrainConfig.sampling = "epochs"`).

    Drawn independently, windows cover only ~63% of the split in a pass's worth of tokens and repeat
    the rest; here a budget of one epoch sees every token once. Still counter-based: window number k of
    the world's stream is window (a * i + b) mod n of epoch k // n, i = k mod n, with a (coprime to n,
    so i -> a * i + b is a permutation), b and the offset drawn from (seed, epoch) alone: O(1) memory
    for any corpus, and resume and world sizes behave as for `RandomBatches`.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, *args, **kwargs) -> None:
        super().__init__(tokens, block_size, *args, **kwargs)
        # One block_size of slack for the offset, when the split has room for it.
        self.n_windows = max((len(tokens) - 1) // block_size - 1, 1)
        self.max_offset = min(block_size - 1, len(tokens) - self.n_windows * block_size - 1)

    def epoch_order(self, epoch: int) -> tuple[int, int, int]:
        """Epoch `epoch`'s permutation i -> (a * i + b) mod n and its offset, from (seed, epoch)."""
        rng = np.random.default_rng((self.seed, epoch, 1))  # 1: not a RandomBatches stream
        n = self.n_windows
        a = 0  # gcd(0, n) = n: drawn below, unless n = 1 (one window: any a will do)
        while math.gcd(a, n) != 1:
            a = int(rng.integers(1, n))
        return a, int(rng.integers(0, n)), int(rng.integers(0, self.max_offset + 1))

    def window_starts(self, global_index: int) -> np.ndarray:
        k = global_index * self.batch_size + np.arange(self.batch_size)
        epochs, positions = np.divmod(k, self.n_windows)
        starts = np.empty_like(k)
        for epoch in np.unique(epochs):  # a micro-batch can straddle two epochs
            a, b, offset = self.epoch_order(int(epoch))
            here = epochs == epoch
            starts[here] = offset + (a * positions[here] + b) % self.n_windows * self.block_size
        return starts


SAMPLERS = {"random": RandomBatches, "epochs": EpochBatches}  # TrainConfig.sampling -> the sampler


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


def training_data(data_dir: Path, block_size: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and val splits, refused in one line when too small to train on or beyond the vocabulary.

    Training draws windows of block_size + 1 tokens from the train split, so that is the smallest
    trainable corpus; a validation split shorter than one window is scored in shorter windows.
    """
    val_file = data_dir / "val.bin"
    if val_file.is_file() and val_file.stat().st_size == 0:
        raise SmallGPTError(
            f"{data_dir} has no validation split (prepared with --val-fraction 0): prepare it again "
            "without that option (a corpus of few documents gets the end of its text held out)"
        )
    train_tokens, val_tokens = (load_split(data_dir, split, vocab_size) for split in ("train", "val"))
    if len(train_tokens) < block_size + 1:
        shorter = (
            f"block_size={len(train_tokens) - 1} or less" if len(train_tokens) > 1 else "no shorter context"
        )
        raise SmallGPTError(
            f"{data_dir} has {len(train_tokens):,} training tokens, fewer than one training window of "
            f"block_size + 1 = {block_size + 1}: add text, or train a shorter context ({shorter})"
        )
    return train_tokens, val_tokens
