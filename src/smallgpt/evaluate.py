"""Validation loss and perplexity: a quick estimate during training, an exact pass at the end or on demand.

The loss is the mean next-token cross-entropy in nats; perplexity = exp(loss), the number of equally
likely tokens the model is, on average, choosing between (50,257 for a uniform guess over GPT-2's
vocabulary, ~20-80 for a small trained model). The quick estimate averages a fixed set of random
windows (the same ones every time, so successive estimates are comparable); the full pass scores every
non-overlapping block of the split exactly once, so it is deterministic: same checkpoint, same number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from smallgpt.distributed import Runtime, autocast, keep_freed_memory, pick_device
from smallgpt.errors import SmallGPTError
from smallgpt.loader import RandomBatches, load_split, require_vocabulary, sequential_batches
from smallgpt.model import GPT
from smallgpt.precision import name, resolve_precision


def _scored(model: GPT, batches, runtime: Runtime, dtype: torch.dtype) -> float:
    """Token-weighted mean loss of `model` over `batches`, summed over all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # (sum of losses, tokens)
    try:
        with torch.no_grad():
            for x, y in batches:
                x, y = x.to(runtime.device), y.to(runtime.device)
                with autocast(runtime.device, dtype):
                    loss = model(x, y)
                total[0] += loss.double() * y.numel()
                total[1] += y.numel()
    finally:
        model.train(was_training)
    loss_sum, count = runtime.all_reduce_sum(total).tolist()
    return loss_sum / max(count, 1)


def estimate_loss(
    model: GPT, tokens: np.ndarray, batch_size: int, batches: int, seed: int, runtime: Runtime, dtype
) -> float:
    """Mean loss over `batches` fixed random batches, shared out over the ranks."""
    sampler = RandomBatches(
        tokens, scoring_block(model, tokens), batch_size, seed, runtime.rank, runtime.world_size
    )
    per_rank = -(-batches // runtime.world_size)
    return _scored(model, (sampler.next_batch() for _ in range(per_rank)), runtime, dtype)


def full_pass_loss(
    model: GPT,
    tokens: np.ndarray,
    batch_size: int,
    runtime: Runtime,
    dtype,
    *,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Mean loss over every non-overlapping block of `tokens` (ranks take disjoint blocks).

    `max_tokens` keeps the blocks that fit in the split's first `max_tokens` tokens (at least one), to
    bound the time of a pass over a big split; `progress(done, total)` hears this rank's token counts.
    """
    block = scoring_block(model, tokens)
    if max_tokens is not None:
        tokens = tokens[: max(max_tokens // block, 1) * block + 1]
    blocks = sequential_batches(tokens, block, batch_size, runtime.rank, runtime.world_size)
    if progress is not None:
        own_blocks = len(range(runtime.rank, (len(tokens) - 1) // block, runtime.world_size))
        blocks = _reporting(blocks, progress, own_blocks * block)
    return _scored(model, blocks, runtime, dtype)


def _reporting(batches, progress: Callable[[int, int], None], total: int):
    """The batches unchanged, telling `progress` how many of `total` tokens have been scored."""
    done = 0
    for x, y in batches:
        yield x, y
        done += y.numel()
        progress(done, total)


def scoring_block(model: GPT, tokens: np.ndarray) -> int:
    """The model's context, or less for a split shorter than one block: scored as one shorter block."""
    return max(min(model.config.block_size, len(tokens) - 1), 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def tokens_of_file(path: Path, text_field: str = "text") -> np.ndarray:
    """A raw .txt/.jsonl/.jsonl.gz/.parquet file as one token stream, read as `smallgpt prepare` reads it."""
    from smallgpt.prepare import document_batches, encode_documents, open_source

    dataset, field = open_source(str(path), text_field, "train", None)
    batches = document_batches(dataset, field, None, str(path))
    # Blank documents are skipped, as `smallgpt prepare` skips them.
    parts = [encode_documents([t for t in texts if t and not t.isspace()]) for texts in batches]
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)
    if len(tokens) < 2:
        raise SmallGPTError(f"{path} holds no text to evaluate on")
    return tokens


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    text_field: str = "text",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Full-pass loss and perplexity of a checkpoint on a prepared split (DATA = dir) or a raw file.

    `dtype` auto: the precision training would pick on this device (`smallgpt.precision`).
    """
    from smallgpt.checkpoint import load_model, resolve_weights

    if batch_size < 1:
        raise SmallGPTError(f"batch size must be at least 1, got {batch_size}")
    from smallgpt.prepare import data_dir_for

    data = data_dir_for(data, raw_files=True)
    runtime = Runtime(0, 0, 1, pick_device(device))
    keep_freed_memory(runtime.device)
    weights = resolve_weights(checkpoint)
    model = load_model(weights, runtime.device)
    vocab = model.config.vocab_size
    if data.is_dir():
        tokens = load_split(data, split, vocab)
    else:
        tokens = tokens_of_file(data, text_field)
        require_vocabulary(tokens, vocab, str(data))
    block_size = scoring_block(model, tokens)
    precision = resolve_precision(dtype, runtime.device, model.config, batch_size * block_size)
    loss = full_pass_loss(model, tokens, batch_size, runtime, precision.dtype, progress=progress)
    return {
        "checkpoint": str(weights),
        "data": str(data) + (f" ({split})" if data.is_dir() else ""),
        "tokens": int((len(tokens) - 1) // block_size * block_size),
        "loss": loss,
        "perplexity": perplexity(loss),
        "dtype": name(precision.dtype),
    }
