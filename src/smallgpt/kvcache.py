"""The KV cache: every layer's keys and values of the sequences being generated, in one preallocated pool.

    pool.keys / pool.values   (n_layer, rows, n_head, block_size, head_dim), allocated once
    pool.lengths              (rows,) tokens fed per row; row r's token t sits at slot t
                              (t mod block_size for a rolling pool, see below)

A sequence owns one row while it generates. `prefill` runs a prompt (or a recomputed window) through
the model into a row; `DecodeStep` runs one new token for each of rows 0..n-1 at once: each writes its
keys and values at its own next slot and attends over its own cached slots under a mask. Because the
scheduler keeps the active sequences in rows 0..n-1 (`move_row` fills a freed row with the last one),
a decode step always covers a prefix of the pool, which is what lets CUDA graphs be recorded once per
batch size. This module is the only one that knows the cache's layout; the model sees just an object
with one `attend(q, k, v)` per layer (see `GPT.forward_cached`).

A rolling pool (models with rotary positions, `Architecture.relative_positions`) never fills: token t
goes to slot t mod block_size, over the oldest, and keeps its true position t for its rotation. Once a
row has block_size tokens every slot is attended, and since rotary scores depend only on the distance
between two positions, a ring of the last block_size keys is all a sliding window needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smallgpt.config import ModelConfig
from smallgpt.generate import PACK_FROM_ROWS, packed_for_decoding
from smallgpt.model import CachedLogits


class KVPool:
    """Keys and values for `rows` sequences of up to block_size tokens each, never reallocated."""

    def __init__(self, config: ModelConfig, rows: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, rows, config.n_head, config.block_size, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.arange(config.block_size, device=device)
        self.rolling = config.architecture.relative_positions

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def prefill(self, model, row: int, ids: list[int], logits: CachedLogits = "last") -> torch.Tensor | None:
        """Run `ids` (at most block_size tokens) into `row`, replacing what it held.

        Returns the logits after the last token (vocab,), after every token (len(ids), vocab), or
        None with logits="none" (the row's cache is all that is wanted).
        """
        idx = torch.tensor([ids], device=self.keys.device)
        positions = torch.arange(len(ids), device=idx.device)[None]
        out = model.forward_cached(idx, positions, _PrefillView(self, row), logits)
        self.lengths[row] = len(ids)
        return None if out is None else out[0]

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` into row `target` and empty `source` (the scheduler keeps rows packed)."""
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]
        self.lengths[target] = self.lengths[source]
        self.lengths[source] = 0

    def clear_row(self, row: int) -> None:
        self.lengths[row] = 0


class _PrefillView:
    """The cache as `forward_cached` sees it during a prefill: one row, T new tokens from slot 0."""

    def __init__(self, pool: KVPool, row: int):
        self.layers = [_PrefillLayer(pool, layer, row) for layer in range(pool.keys.shape[0])]


class _PrefillLayer:
    def __init__(self, pool: KVPool, layer: int, row: int):
        self.keys = pool.keys[layer, row : row + 1]
        self.values = pool.values[layer, row : row + 1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = k.shape[2]
        self.keys[:, :, :T] = k
        self.values[:, :, :T] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the prompt attends to itself


# Slots a decode step attends over come in multiples of this (see `_DecodeView`).
SLOT_CHUNK = 32


class _DecodeView:
    """The cache as `forward_cached` sees it during a decode step: rows 0..n-1, one new token each.

    Attention covers slots 0..span-1 only, the prefix any row has filled, in whole chunks of
    SLOT_CHUNK (all slots when `whole`: a CUDA graph's shapes are fixed). A short batch then reads a
    short prefix of the pool, yet a row's result does not depend on the span: slots past its length
    are masked and add exact zeros to the softmax's sum and to the weighted sum of values. PyTorch's
    CPU kernel sums in vector lanes by slot index (8 or 16 floats) and a leftover tail in another
    order, so an arbitrary span would move a row's rounding; in multiples of 32 slots the extra slots
    only add zeros to the lanes. test_engine checks it bit for bit on the machine that runs it.
    """

    def __init__(self, pool: KVPool, n: int, whole: bool = False):
        lengths = pool.lengths[:n]
        span = pool.capacity
        if not whole and pool.capacity % SLOT_CHUNK == 0:
            span = min(span, -(-(int(lengths.max()) + 1) // SLOT_CHUNK) * SLOT_CHUNK)
        # Each row's new token sits at slot lengths[r] and sees slots 0..lengths[r]: (n, 1, 1, span).
        # In a rolling pool a row past the window writes over its oldest slot and sees all of them.
        self.mask = (pool.slots[None, :span] <= lengths[:, None])[:, None, None, :]
        self.write_at = (lengths % pool.capacity)[:, None, None, None]
        self.layers = [_DecodeLayer(self, pool, layer, n, span) for layer in range(pool.keys.shape[0])]


class _DecodeLayer:
    def __init__(self, view: _DecodeView, pool: KVPool, layer: int, n: int, span: int):
        self.view = view
        self.keys = pool.keys[layer, :n, :, :span]
        self.values = pool.values[layer, :n, :, :span]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        where = self.view.write_at.expand(k.shape)  # (n, n_head, 1, head_dim): row r's slot lengths[r]
        self.keys.scatter_(2, where, k)
        self.values.scatter_(2, where, v)
        return F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=self.view.mask)


def bucket(n: int, rows: int) -> int:
    """The batch size a decode step for n busy rows runs at: the next power of two, at most `rows`.
    A few sizes (about log2(rows) + 1) instead of one per batch size: one CUDA graph each."""
    return min(rows, 1 << (n - 1).bit_length())


class DecodeStep:
    """One new token for each of pool rows 0..n-1 -> their next-token logits (n, vocab).

    A step computes the busy rows padded to a bucket of 1, 2, 4, 8, ... rows (`bucket`): one request
    alone costs a one-row step, not a whole pool's. Rows past n are free (length 0): they compute on a
    stale token and write only their own slot 0, which the next prefill of that row overwrites.

    What that does to "same seed, same text": a matmul's rounding depends on how many rows it
    multiplies (on a CPU, MKL runs one row as a matrix-vector product and switches kernels again at a
    few row counts, which depend on the layer's width and the thread count), and one ulp in the logits
    moves a sampled token now and then. Within one bucket a row's arithmetic is the same whatever its
    batch-mates hold and however many of the bucket's rows are busy (tests/test_engine.py checks it
    bit for bit), so a seeded request gets the same text whenever its steps run at the same bucket
    sizes -- alone, always. `every_row=True` runs every step at the whole pool instead: the text is
    then the same whatever else runs, at a whole pool's cost for every step.

    On a CPU, steps of 4 rows or more run a twin of the model whose matmul weights MKL packed once
    for that many rows (`packed_for_decoding`): 16-row steps 1.1-1.25x as fast here, at the cost of a
    copy of the weights per bucket size. Within a bucket, too, a row's arithmetic does not depend on
    its batch-mates.

    On CUDA a small model is bound by launching ~100 tiny kernels per token, not by arithmetic, so each
    step is recorded as a CUDA graph per bucket and replayed with a single launch (the pool never moves
    and a step's shapes are fixed: one token per row, attention over every slot under a mask).
    """

    def __init__(self, model, pool: KVPool, graphs: bool = False, every_row: bool = False):
        self.model, self.pool, self.graphs, self.every_row = model, pool, graphs, every_row
        self.tokens = pool.lengths.new_zeros(pool.rows, 1)  # static input buffer (rows, 1)
        self.packed = None if graphs else packed_for_decoding(model, pool.rows)  # for steps of 4+ rows
        self.recorded: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def size(self, n: int) -> int:
        """How many rows a step for n busy rows computes."""
        return self.pool.rows if self.every_row else bucket(n, self.pool.rows)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        size = self.size(n)
        self.tokens[:n, 0] = tokens
        if self.graphs:
            graph, logits = self.recorded.get(size) or self._record(size)
            graph.replay()
        else:
            logits = self._run(size)
        self.pool.lengths[:n] += 1
        return logits[:n]

    def _run(self, size: int) -> torch.Tensor:
        positions = self.pool.lengths[:size, None]  # a row's new token sits at position = its length
        view = _DecodeView(self.pool, size, whole=self.graphs)
        packed = self.packed is not None and size >= PACK_FROM_ROWS
        return (self.packed if packed else self.model).forward_cached(self.tokens[:size], positions, view)

    def _record(self, size: int):
        # Warm up on a side stream, as capturing requires; the warm-up writes each row's next slot, which
        # the replay right after overwrites (lengths only move outside the graph, in __call__).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels; nothing runs
            logits = self._run(size)
        self.recorded[size] = (graph, logits)
        return graph, logits
