"""Next-token cross-entropy fused with the output projection, computed tile by tile over the vocabulary.

With a 50k-token vocabulary the head dominates: 1,024 positions x 50,304 logits is 206 MB in fp32, and
a plain `F.cross_entropy(head(x), y)` writes it, reads it back for every elementwise pass of the softmax,
and keeps a gradient of the same size. On a CPU that traffic, not the arithmetic, sets the speed. Here
the vocabulary is cut into tiles of columns small enough that a tile's logits stay in the cache while
they are reduced or turned into gradients; the full logits never exist.

For softmax cross-entropy with logits z = h W^T, target t and log-partition lse = log sum_v exp(z_v):
    loss = lse - z_t
    dL/dz = softmax(z) - onehot(t) = exp(z - lse) - onehot(t)   (divided by the counted rows for the mean)
    dL/dh = dL/dz @ W,   dL/dW = (dL/dz)^T @ h

The gradient needs the row's lse, which is known only after every tile has been seen. So:
  forward   each tile's logits -> their logsumexp, merged into the running lse; then loss = lse - z_t
            (z_t as a row-wise dot product h . W_t). 2NVC FLOPs; nothing of size N x V is kept.
  backward  each tile's logits again (2NVC more) -> dL/dz for that tile in two passes (subtract, exp)
            -> dL/dh += dL/dz @ W_tile and dL/dW_tile = (dL/dz)^T @ h at once (4NVC).
Recomputing the logits costs a third more matmul work than keeping them, and saves writing and reading
N x V numbers from memory, which on a CPU is the slower of the two (benchmarks/RESULTS.md). It also
makes fp16 safe: the loss scale that `torch.amp.GradScaler` puts into the incoming gradient multiplies
dL/dz in fp32 before it is cast for the matmuls, so probabilities of ~1e-5 / rows do not underflow. It is a
multiplication, not a shift inside the exp, so that a gradient scaled by a power of two (1/accumulation
steps, a loss scale) is exactly that multiple: accumulating micro-batches and averaging them over DDP
processes then compute the same bits.
Under `torch.no_grad` (evaluation) only the forward runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

IGNORE_INDEX = -1  # targets with this value contribute nothing (e.g. padding)
# The logits of one tile: 1M numbers (4 MB in fp32, what the L2 caches of two CPU cores hold; half
# that in bf16). Measured on a 2-core Xeon with AMX: 1M-4M elements run the head 3.5x faster than the
# whole vocabulary at once; below ~256k elements the matmuls get too thin to reach their speed.
TILE_ELEMENTS = 1 << 20
MIN_TILE_COLUMNS = 256


@functools.cache
def l2_cache_bytes() -> int:
    """This CPU's L2 cache per core (Linux reports it), else 2 MiB."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(size.removesuffix("K")) * 1024 if size.endswith("K") else int(size)
    except (OSError, ValueError):
        return 2 << 20


def tile_columns(rows: int) -> int:
    """Vocabulary columns per tile for `rows` rows: about TILE_ELEMENTS logits, a multiple of 64."""
    return max(MIN_TILE_COLUMNS, TILE_ELEMENTS // max(rows, 1) // 64 * 64)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `hidden @ weight.T` runs in: autocast's when it is on, else the inputs' own."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _TileBuffers:
    """The logits of one tile, in buffers allocated once per call and reused by every tile: fresh
    megabyte-sized tensors would each cost the allocator page faults. `logits(h, w_tile)` is
    h @ w_tile^T in the accumulation dtype (through a matmul-dtype buffer under autocast)."""

    def __init__(self, rows: int, columns: int, mm_dtype: torch.dtype, acc: torch.dtype, device):
        self.acc = torch.empty(rows * columns, dtype=acc, device=device)
        self.mm = None if mm_dtype == acc else torch.empty(rows * columns, dtype=mm_dtype, device=device)
        self.rows = rows

    def view(self, buffer: torch.Tensor, columns: int) -> torch.Tensor:
        return buffer[: self.rows * columns].view(self.rows, columns)

    def logits(self, h: torch.Tensor, w_tile: torch.Tensor) -> torch.Tensor:
        acc = self.view(self.acc, len(w_tile))
        if self.mm is None:
            return torch.mm(h, w_tile.t(), out=acc)
        return acc.copy_(torch.mm(h, w_tile.t(), out=self.view(self.mm, len(w_tile))))

    def in_mm_dtype(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (a tile in the accumulation dtype) cast into the matmul-dtype buffer."""
        return values if self.mm is None else self.view(self.mm, values.shape[1]).copy_(values)


def _tiles(vocab_size: int, columns: int):
    return (slice(start, min(start + columns, vocab_size)) for start in range(0, vocab_size, columns))


class _TiledLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, columns):  # type: ignore[override]
        mm_dtype = _matmul_dtype(hidden, weight)
        h_mm, w_mm = hidden.to(mm_dtype), weight.to(mm_dtype)
        # The softmax and the sums run in at least fp32 even when the matmuls run in bf16/fp16.
        acc = torch.promote_types(mm_dtype, torch.float32)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        row_factor = valid.to(acc) / valid.sum().clamp(min=1)  # the mean over counted rows
        buffers = _TileBuffers(len(targets), columns, mm_dtype, acc, hidden.device)
        # Online logsumexp: a running max M and a running sum S of exp(z - M) over the tiles seen;
        # a larger max rescales the sum by exp(M_old - M_new). Then lse = M + log S.
        running_max = torch.full((len(targets), 1), float("-inf"), dtype=acc, device=hidden.device)
        running_sum = torch.zeros(len(targets), 1, dtype=acc, device=hidden.device)
        for tile in _tiles(vocab_size, columns):
            logits = buffers.logits(h_mm, w_mm[tile])
            new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
            running_sum *= torch.exp(running_max - new_max)
            running_sum += logits.sub_(new_max).exp_().sum(dim=1, keepdim=True)
            running_max = new_max
        log_z = (running_max + running_sum.log()).squeeze(1)
        target_logit = (h_mm.to(acc) * w_mm[safe_targets].to(acc)).sum(dim=1)
        ctx.save_for_backward(h_mm, w_mm, safe_targets, row_factor, log_z)
        ctx.vocab_size, ctx.columns, ctx.input_dtypes = vocab_size, columns, (hidden.dtype, weight.dtype)
        return ((log_z - target_logit) * row_factor).sum()

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        h_mm, w_mm, targets, row_factor, log_z = ctx.saved_tensors
        # dL/dz = (softmax(z) - onehot(t)) * f per row, with f the mean's 1/rows times the incoming gradient
        # (which may hold a loss scale); an ignored row has f = 0. The incoming gradient's sign is applied
        # to h and dL/dh instead, so f stays positive.
        scale = (row_factor * grad_loss.abs())[:, None]
        sign = grad_loss.sign().to(h_mm.dtype)
        shift = log_z[:, None]
        signed_hidden = h_mm * sign
        buffers = _TileBuffers(len(targets), ctx.columns, h_mm.dtype, log_z.dtype, h_mm.device)
        grad_hidden = torch.zeros(h_mm.shape, dtype=log_z.dtype, device=h_mm.device)
        grad_weight = torch.zeros(w_mm.shape, dtype=ctx.input_dtypes[1], device=w_mm.device)
        for tile in _tiles(ctx.vocab_size, ctx.columns):
            w_tile = w_mm[tile]
            probs = buffers.logits(h_mm, w_tile).sub_(shift).exp_().mul_(scale)
            grad_logits = buffers.in_mm_dtype(probs)
            # - onehot(t) * f, for the rows whose target falls in this tile
            hit = (targets >= tile.start) & (targets < tile.stop)
            column = (targets - tile.start).clamp(0, tile.stop - tile.start - 1)[:, None]
            grad_logits.scatter_add_(1, column, -(scale * hit[:, None]).to(h_mm.dtype))
            grad_hidden += grad_logits @ w_tile
            grad_weight[tile] = grad_logits.t() @ signed_hidden
        return (grad_hidden * sign).to(ctx.input_dtypes[0]), grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    columns: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (only the first `vocab_size` columns are tokens).

    hidden: (N, C) final hidden states; weight: (V_padded, C) output embedding; targets: (N,) ids.
    `columns`: vocabulary columns per tile (default: sized for the cache, `tile_columns`).
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    columns = columns or tile_columns(len(targets))
    return _TiledLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, columns)
