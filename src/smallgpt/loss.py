"""Next-token cross-entropy fused with the output projection, computed in row chunks.

With a 50k-token vocabulary the head dominates memory: 8 x 256 positions x 50,304 logits is 412 MB in
fp32, and a plain `F.cross_entropy(head(x), y)` writes it, reads it for the softmax, and keeps a gradient
of the same size. Here each chunk of rows is projected, turned into its loss *and* its gradients
straight away, and dropped: the full logits never exist. The arithmetic is the same as the plain
version (forward 2NVC FLOPs, backward 4NVC), so this is a pure memory/bandwidth win.

For softmax cross-entropy with logits z = h W^T and target t, the gradient is the textbook one:
    dL/dz = softmax(z) - onehot(t)        (divided by the number of counted rows for the mean)
    dL/dh = dL/dz @ W,   dL/dW = (dL/dz)^T @ h

fp16 is the exception. Its smallest normal number is 6e-5, so dL/dz (probabilities of ~1e-5 divided by
thousands of rows) underflows when cast for the matmuls, unless it is first multiplied by the loss
scale that `torch.amp.GradScaler` puts into the incoming gradient, and that arrives only in `backward`.
So under fp16 the forward computes the loss alone and `backward` recomputes each chunk's logits (one
more 2NVC matmul) to form dL/dz already scaled, as autograd does for the plain version.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1  # targets with this value contribute nothing (e.g. padding)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `hidden @ weight.T` runs in: autocast's when it is on, else the inputs' own."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int, acc: torch.dtype) -> torch.Tensor:
    logits = (h @ weight.t()).to(acc)
    logits[:, vocab_size:] = float("-inf")  # padded vocabulary rows are not tokens: no probability
    return logits


def _chunk_gradients(logits, log_z, targets, row_factor, h, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dh and dL/dW of one chunk; `row_factor` multiplies each row's dL/dz (0 for ignored rows).

    Overwrites `logits`. dL/dz is formed in the accumulation dtype and cast to the matmul dtype last.
    """
    grad_logits = torch.exp_(logits.sub_(log_z[:, None]))  # softmax
    grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    grad_logits *= row_factor[:, None]
    grad_logits = grad_logits.to(h.dtype)
    return grad_logits @ weight, grad_logits.t() @ h


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_rows, needs_grad):  # type: ignore[override]
        mm_dtype = _matmul_dtype(hidden, weight)
        h_mm, w_mm = hidden.to(mm_dtype), weight.to(mm_dtype)
        # The softmax and the sums run in at least fp32 even when the matmuls run in bf16/fp16.
        acc = torch.promote_types(mm_dtype, torch.float32)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        row_factor = valid.to(acc) / valid.sum().clamp(min=1)  # the mean over counted rows
        deferred = needs_grad and mm_dtype == torch.float16  # gradients in backward (module docstring)
        in_forward = needs_grad and not deferred
        if in_forward:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=acc)
        log_z_all = torch.empty(len(targets), dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, len(targets), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _chunk_logits(h_mm[rows], w_mm, vocab_size, acc)
            log_z = log_z_all[rows] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            total += ((log_z - target_logit) * row_factor[rows]).sum()
            if in_forward:
                grad_h, grad_w = _chunk_gradients(
                    logits, log_z, safe_targets[rows], row_factor[rows], h_mm[rows], w_mm
                )
                grad_hidden[rows] = grad_h
                grad_weight += grad_w
        ctx.deferred, ctx.vocab_size, ctx.chunk_rows = deferred, vocab_size, chunk_rows
        ctx.input_dtypes = hidden.dtype, weight.dtype
        if deferred:
            ctx.save_for_backward(h_mm, w_mm, safe_targets, row_factor, log_z_all)
        elif in_forward:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if not ctx.deferred:
            grad_hidden, grad_weight = ctx.saved_tensors
            grad_hidden, grad_weight = grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss
            return grad_hidden, grad_weight, None, None, None, None
        h_mm, w_mm, targets, row_factor, log_z_all = ctx.saved_tensors
        acc = log_z_all.dtype
        row_factor = row_factor * grad_loss  # the loss scale enters before the cast to fp16
        grad_hidden = torch.empty(h_mm.shape, dtype=ctx.input_dtypes[0], device=h_mm.device)
        grad_weight = torch.zeros(w_mm.shape, dtype=acc, device=w_mm.device)
        for start in range(0, len(targets), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = _chunk_logits(h_mm[rows], w_mm, ctx.vocab_size, acc)
            grad_h, grad_w = _chunk_gradients(
                logits, log_z_all[rows], targets[rows], row_factor[rows], h_mm[rows], w_mm
            )
            grad_hidden[rows] = grad_h
            grad_weight += grad_w
        return grad_hidden, grad_weight.to(ctx.input_dtypes[1]), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (only the first `vocab_size` columns are tokens).

    hidden: (N, C) final hidden states; weight: (V_padded, C) output embedding; targets: (N,) ids.
    Under `torch.no_grad` (evaluation) no gradient work is done at all.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), vocab_size, chunk_rows, needs_grad
    )
