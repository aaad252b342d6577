"""Next-token cross-entropy fused with the output projection, computed tile by tile over the vocabulary.

With a 50k-token vocabulary the head dominates: 1,024 positions x 50,304 logits is 206 MB in fp32, and
a plain `F.cross_entropy(head(x), y)` writes it, reads it back for every elementwise pass of the softmax,
and keeps a gradient of the same size. On a CPU that traffic, not the arithmetic, sets the speed. Here
the vocabulary is cut into tiles of columns small enough that a tile's logits stay in the cache while
they are reduced; the fp32 logits and their gradient never exist.

For softmax cross-entropy with logits z = h W^T, target t and log-partition lse = log sum_v exp(z_v):
    loss = lse - z_t
    dL/dz = softmax(z) - onehot(t) = exp(z - lse) - onehot(t)   (divided by the counted rows for the mean)
    dL/dh = dL/dz @ W,   dL/dW = (dL/dz)^T @ h

The gradient needs the row's lse, which is known only after every tile has been seen. So:
  forward   each tile's logits -> exp(z - m), m the row's running max so far, summed into the running
            sum (online logsumexp); then loss = lse - z_t (z_t as a row-wise dot product h . W_t).
            2NVC FLOPs. In training each tile's exp(z - m) is kept in the matmul dtype (bf16: 2 bytes a
            logit, 103 MB for 1,024 rows), with its m.
  backward  exp(z - lse) = exp(z - m) * exp(m - lse): the second factor is one number per row and tile,
            so it multiplies h and the N x C product instead of the N x V tile, and so do the mean's
            1/rows and the incoming gradient: two matmuls a tile (4NVC), no elementwise pass over it.
            The one-hot term once for all tiles: -onehot(t) W is -W_t.
Keeping the exps costs writing and reading them once; recomputing them (when they would pass
`KEEP_BYTES`) costs the logits matmul again plus a subtraction and an exp over every tile, which on a
CPU take longer than the matmul itself in bf16 (benchmarks/RESULTS.md). Under `torch.no_grad`
(evaluation) only the forward runs and nothing is kept.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -1  # targets with this value contribute nothing (e.g. padding)
# The logits of one tile: 2M numbers (8 MB in fp32, 4 MB kept in bf16). Measured on a 2-core Xeon with
# AMX: 1M-4M elements run the head 3.5x faster than the whole vocabulary at once, and with the exps
# kept, 2M-8M train ~8% faster than 1M (fewer, wider gradient matmuls); below ~256k elements the
# matmuls get too thin to reach their speed.
TILE_ELEMENTS = 1 << 21
MIN_TILE_COLUMNS = 256
# Training keeps every tile's exps for the backward up to this size (1,024 rows x 50k in bf16 is
# 103 MB); beyond it the backward recomputes them, so memory never grows with rows x vocabulary.
KEEP_BYTES = 1 << 30


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
    """Where a tile's logits go, allocated once per call (on first use) and reused by every tile: fresh
    megabyte-sized tensors would each cost the allocator page faults. `mm` takes the matmul's output
    (bf16/fp16 under autocast) unless the tile has a kept slot of its own; `acc` holds it in fp32 for
    the softmax's passes (PyTorch's CPU kernels for the reductions and exp run 2-3x faster on fp32 than
    on bf16, casting in their loops). Without autocast both are the one fp32 buffer and every pass is
    in place. A training step that keeps its tiles needs `acc` under autocast and, in fp32, neither."""

    def __init__(self, rows: int, columns: int, mm_dtype: torch.dtype, acc: torch.dtype, device):
        self.rows, self.size, self.device = rows, rows * columns, device
        self.mm_dtype, self.acc_dtype = mm_dtype, acc

    @functools.cached_property
    def acc(self) -> torch.Tensor:
        return torch.empty(self.size, dtype=self.acc_dtype, device=self.device)

    @functools.cached_property
    def mm(self) -> torch.Tensor:
        if self.mm_dtype == self.acc_dtype:
            return self.acc
        return torch.empty(self.size, dtype=self.mm_dtype, device=self.device)

    def logits(self, h: torch.Tensor, w_tile: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """h @ w_tile^T in the matmul dtype, into `out` if given."""
        return torch.mm(h, w_tile.t(), out=self._view(self.mm, len(w_tile)) if out is None else out)

    def in_acc_dtype(self, logits: torch.Tensor) -> torch.Tensor:
        """The tile in the accumulation dtype: itself, or a copy under autocast."""
        if logits.dtype == self.acc_dtype:
            return logits
        return self._view(self.acc, logits.shape[1]).copy_(logits)

    def _view(self, buffer: torch.Tensor, columns: int) -> torch.Tensor:
        return buffer[: self.rows * columns].view(self.rows, columns)


def _tiles(vocab_size: int, columns: int) -> list[slice]:
    return [slice(start, min(start + columns, vocab_size)) for start in range(0, vocab_size, columns)]


class _TiledLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, columns, keep):  # type: ignore[override]
        mm_dtype = _matmul_dtype(hidden, weight)
        h_mm, w_mm = hidden.to(mm_dtype), weight.to(mm_dtype)
        # The softmax and the sums run in at least fp32 even when the matmuls run in bf16/fp16.
        acc = torch.promote_types(mm_dtype, torch.float32)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        row_factor = valid.to(acc) / valid.sum().clamp(min=1)  # the mean over counted rows
        rows, tiles = len(targets), _tiles(vocab_size, columns)
        buffers = _TileBuffers(rows, columns, mm_dtype, acc, hidden.device)
        kept, shifts = [], []  # each kept tile's exp(z - m) in the matmul dtype, and its m
        # Online logsumexp: a running max M and a running sum S of exp(z - M) over the tiles seen;
        # a larger max rescales the sum by exp(M_old - M_new). Then lse = M + log S.
        running_max = torch.full((rows, 1), float("-inf"), dtype=acc, device=hidden.device)
        running_sum = torch.zeros(rows, 1, dtype=acc, device=hidden.device)
        for tile in tiles:
            # A block of its own per tile: a few MB, which the allocator reuses from step to step
            # (glibc maps blocks over 32 MiB from the OS afresh each time: 100 MB of page faults).
            slot = (
                torch.empty(rows, tile.stop - tile.start, dtype=mm_dtype, device=hidden.device)
                if keep
                else None
            )
            logits = buffers.in_acc_dtype(buffers.logits(h_mm, w_mm[tile], out=slot))
            new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
            running_sum *= torch.exp(running_max - new_max)
            exps = logits.sub_(new_max).exp_()
            running_sum += exps.sum(dim=1, keepdim=True)
            if keep:
                kept.append(slot)
                shifts.append(new_max)
                if exps.data_ptr() != slot.data_ptr():
                    slot.copy_(exps)
            running_max = new_max
        target_logit = (h_mm.to(acc) * w_mm[safe_targets].to(acc)).sum(dim=1)
        log_z = running_max + running_sum.log()
        if keep:
            ctx.save_for_backward(h_mm, w_mm, safe_targets, row_factor, log_z, torch.cat(shifts, 1), *kept)
        else:  # the row max is one of the logits, so the matmul dtype holds it exactly
            ctx.save_for_backward(h_mm, w_mm, safe_targets, row_factor, log_z, running_max.to(mm_dtype))
        ctx.tiles, ctx.columns, ctx.input_dtypes = tiles, columns, (hidden.dtype, weight.dtype)
        ctx.vocab_size, ctx.keep = vocab_size, keep
        return ((log_z.squeeze(1) - target_logit) * row_factor).sum()

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        h_mm, w_mm, targets, row_factor, log_z, *exps_or_max = ctx.saved_tensors
        # dL/dz = f * (softmax(z) - onehot(t)) per row, with f the mean's 1/rows times the incoming
        # gradient (which may hold a loss scale); an ignored row has f = 0. Row factors can leave the
        # N x V tiles: diag(f) P W = f * (P W) and P^T diag(f) h = P^T (f h), so they multiply h and dL/dh
        # (N x C), not the logits. The factors are fp32 multiplications, so a gradient scaled by a power
        # of two (1/accumulation steps, a loss scale) is exactly that multiple: accumulating
        # micro-batches and averaging them over DDP processes then compute the same bits.
        factor = (row_factor * grad_loss)[:, None]
        hidden = h_mm.to(log_z.dtype)
        grad_weight = torch.empty(w_mm.shape, dtype=ctx.input_dtypes[1], device=w_mm.device)
        grad_weight[ctx.vocab_size :].zero_()  # the padding columns are never tokens
        gradient_tiles = _from_kept if ctx.keep else _recomputed
        softmax_w = gradient_tiles(ctx, h_mm, w_mm, hidden, factor, log_z, *exps_or_max, grad_weight)
        # The one-hot part, once for all tiles: -onehot(t) W is -W_t in each row, and -onehot(t)^T (f h)
        # adds -f h into row t of dL/dW.
        grad_hidden = softmax_w - factor * w_mm[targets].to(hidden.dtype)
        grad_weight.index_add_(0, targets, (-factor * hidden).to(grad_weight.dtype))
        return grad_hidden.to(ctx.input_dtypes[0]), grad_weight, None, None, None, None


def _from_kept(ctx, h_mm, w_mm, hidden, factor, log_z, shifts, *kept_and_grad_weight) -> torch.Tensor:
    """f softmax(z) W, and f softmax(z)^T h into `grad_weight`, from the kept exp(z - m) tiles:
    softmax(z) = exp(z - m) * exp(m - lse), a per-row number for each tile."""
    *kept, grad_weight = kept_and_grad_weight
    scales = factor * torch.exp(shifts - log_z)  # (rows, tiles)
    softmax_w = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    for index, (tile, exps) in enumerate(zip(ctx.tiles, kept, strict=True)):
        scale = scales[:, index, None]
        softmax_w.addcmul_(exps @ w_mm[tile], scale)
        grad_weight[tile] = exps.t() @ (hidden * scale).to(h_mm.dtype)
    return softmax_w


def _recomputed(ctx, h_mm, w_mm, hidden, factor, log_z, row_max, grad_weight) -> torch.Tensor:
    """The same from each tile's logits computed again: exp(z - M) in place in the matmul dtype (M the
    row max, exact there: a subtraction and an exp, no casts), times the per-row exp(M - lse)."""
    per_prob = factor * torch.exp(row_max.to(log_z.dtype) - log_z)  # multiplies exp(z - M)
    buffers = _TileBuffers(len(hidden), ctx.columns, h_mm.dtype, h_mm.dtype, h_mm.device)
    exp_times_w = torch.zeros(hidden.shape, dtype=hidden.dtype, device=h_mm.device)
    hidden_per_prob = (hidden * per_prob).to(h_mm.dtype)
    for tile in ctx.tiles:
        w_tile = w_mm[tile]
        exps = buffers.logits(h_mm, w_tile).sub_(row_max).exp_()
        exp_times_w += exps @ w_tile
        grad_weight[tile] = exps.t() @ hidden_per_prob
    return per_prob * exp_times_w


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    columns: int | None = None,
    keep: bool | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (only the first `vocab_size` columns are tokens).

    hidden: (N, C) final hidden states; weight: (V_padded, C) output embedding; targets: (N,) ids.
    `columns`: vocabulary columns per tile (default: sized for the cache, `tile_columns`).
    `keep`: keep the forward's exps for the backward (default: when training and within `KEEP_BYTES`).
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    columns = columns or tile_columns(len(targets))
    if keep is None:
        training = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        kept_bytes = len(targets) * vocab_size * _matmul_dtype(hidden, weight).itemsize
        keep = training and kept_bytes <= KEEP_BYTES
    return _TiledLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, columns, keep)
