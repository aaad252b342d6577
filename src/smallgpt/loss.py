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
  backward  each tile's logits again (2NVC more) -> exp(z - M) in place, two passes in the matmul
            dtype -> (exp) W_tile and (exp)^T h at once (4NVC). Softmax's 1/S, the mean's 1/rows and
            the incoming gradient are per-row factors, applied to h and dL/dh (N x C) rather than to
            N x V probabilities; the one-hot term once for all tiles: -onehot(t) W is -W_t.
Recomputing the logits costs a third more matmul work than keeping them, and saves writing and reading
N x V numbers from memory, which on a CPU is the slower of the two (benchmarks/RESULTS.md). On a CPU the
elementwise passes over a tile cost about what its matmuls do, so each pass that can go, goes.
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
    megabyte-sized tensors would each cost the allocator page faults. Under autocast the matmuls
    write `mm` (bf16/fp16) and the forward's softmax sums read it in `acc` (fp32); without autocast
    both are one fp32 buffer and every pass works in place."""

    def __init__(self, rows: int, columns: int, mm_dtype: torch.dtype, acc: torch.dtype, device):
        self.acc = torch.empty(rows * columns, dtype=acc, device=device)
        self.mm = self.acc if mm_dtype == acc else torch.empty(rows * columns, dtype=mm_dtype, device=device)
        self.rows = rows

    def logits(self, h: torch.Tensor, w_tile: torch.Tensor) -> torch.Tensor:
        """h @ w_tile^T in the matmul dtype."""
        return torch.mm(h, w_tile.t(), out=self._view(self.mm, len(w_tile)))

    def in_acc_dtype(self, logits: torch.Tensor) -> torch.Tensor:
        """The tile in the accumulation dtype (a copy under autocast: PyTorch's CPU kernels for the
        reductions and exp run faster on fp32 than on bf16, casting in their loops)."""
        return logits if self.acc is self.mm else self._view(self.acc, logits.shape[1]).copy_(logits)

    def _view(self, buffer: torch.Tensor, columns: int) -> torch.Tensor:
        return buffer[: self.rows * columns].view(self.rows, columns)


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
            logits = buffers.in_acc_dtype(buffers.logits(h_mm, w_mm[tile]))
            new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
            running_sum *= torch.exp(running_max - new_max)
            running_sum += logits.sub_(new_max).exp_().sum(dim=1, keepdim=True)
            running_max = new_max
        target_logit = (h_mm.to(acc) * w_mm[safe_targets].to(acc)).sum(dim=1)
        # The row max is one of the logits, so the matmul dtype holds it exactly (the backward shifts by it).
        ctx.save_for_backward(h_mm, w_mm, safe_targets, row_factor, running_max.to(mm_dtype), running_sum)
        ctx.vocab_size, ctx.columns, ctx.input_dtypes = vocab_size, columns, (hidden.dtype, weight.dtype)
        log_z = (running_max + running_sum.log()).squeeze(1)
        return ((log_z - target_logit) * row_factor).sum()

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        h_mm, w_mm, targets, row_factor, row_max, row_sum = ctx.saved_tensors
        # dL/dz = f * (softmax(z) - onehot(t)) per row, with f the mean's 1/rows times the incoming
        # gradient (which may hold a loss scale); an ignored row has f = 0. Row factors can leave the
        # N x V tiles: diag(f) P W = f * (P W) and P^T diag(f) h = P^T (f h), so they multiply h and dL/dh
        # (N x C), not the logits. So does softmax's 1/S: a tile needs only exp(z - M) = S * softmax(z)
        # (M the row max, S = sum exp(z - M)), computed in place in the matmul dtype: a subtraction and
        # an exp, no casts. The factors are fp32 multiplications, so a gradient scaled by a power of two
        # (1/accumulation steps, a loss scale) is exactly that multiple: accumulating micro-batches and
        # averaging them over DDP processes then compute the same bits.
        factor = (row_factor * grad_loss)[:, None]
        hidden = h_mm.to(row_sum.dtype)
        per_prob = factor / row_sum  # multiplies exp(z - M)
        buffers = _TileBuffers(len(targets), ctx.columns, h_mm.dtype, h_mm.dtype, h_mm.device)
        exp_times_w = torch.zeros(hidden.shape, dtype=hidden.dtype, device=h_mm.device)
        grad_weight = torch.empty(w_mm.shape, dtype=ctx.input_dtypes[1], device=w_mm.device)
        grad_weight[ctx.vocab_size :].zero_()  # the padding columns are never tokens
        hidden_per_prob = (hidden * per_prob).to(h_mm.dtype)
        for tile in _tiles(ctx.vocab_size, ctx.columns):
            w_tile = w_mm[tile]
            exps = buffers.logits(h_mm, w_tile).sub_(row_max).exp_()
            exp_times_w += exps @ w_tile
            grad_weight[tile] = exps.t() @ hidden_per_prob
        # The one-hot part, once for all tiles: -onehot(t) W is -W_t in each row, and -onehot(t)^T (f h)
        # adds -f h into row t of dL/dW.
        grad_hidden = per_prob * exp_times_w - factor * w_mm[targets].to(hidden.dtype)
        grad_weight.index_add_(0, targets, (-factor * hidden).to(grad_weight.dtype))
        return grad_hidden.to(ctx.input_dtypes[0]), grad_weight, None, None, None


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
