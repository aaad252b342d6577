"""Next-token cross-entropy fused with the output projection, computed in row chunks.

With a 50k-token vocabulary the head dominates memory: 8 x 256 positions x 50,304 logits is 412 MB in
fp32, and a plain `F.cross_entropy(head(x), y)` writes it, reads it for the softmax, and keeps a gradient
of the same size. Here each chunk of rows is projected, turned into its loss *and* its gradients
straight away, and dropped: the full logits never exist. The arithmetic is the same as the plain
version (forward 2NVC FLOPs, backward 4NVC), so this is a pure memory/bandwidth win.

For softmax cross-entropy with logits z = h W^T and target t, the gradient is the textbook one:
    dL/dz = softmax(z) - onehot(t)        (divided by the number of counted rows for the mean)
    dL/dh = dL/dz @ W,   dL/dW = (dL/dz)^T @ h
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1  # targets with this value contribute nothing (e.g. padding)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_rows):  # type: ignore[override]
        n_rows = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        needs_grad = hidden.requires_grad or weight.requires_grad
        # The softmax and the sums run in at least fp32 even when the matmuls run in bf16/fp16.
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n_rows, chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            ok = valid[start : start + chunk_rows]
            logits = (h @ weight.t()).to(acc)
            # Padded vocabulary rows are not tokens: give them no probability.
            logits[:, vocab_size:] = float("-inf")
            log_z = torch.logsumexp(logits, dim=-1)
            safe_t = t.clamp(min=0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((log_z - target_logit) * ok).sum()
            if needs_grad:
                # softmax - onehot, for the mean over counted rows; ignored rows get zero gradient.
                grad_logits = torch.exp_(logits.sub_(log_z[:, None]))
                grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad_logits *= (ok / n_valid)[:, None]
                grad_logits = grad_logits.to(h.dtype)
                grad_hidden[start : start + chunk_rows] = grad_logits @ weight.to(h.dtype)
                grad_weight += grad_logits.t() @ h
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (only the first `vocab_size` columns are tokens).

    hidden: (N, C) final hidden states; weight: (V_padded, C) output embedding; targets: (N,) ids.
    """
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), vocab_size, chunk_rows
    )
