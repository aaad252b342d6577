"""The fused head + cross-entropy (smallgpt.loss) in reduced precision and under no_grad, with the
forward's exps kept for the backward and recomputed there."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from smallgpt import loss as loss_module
from smallgpt.loss import MIN_TILE_COLUMNS, linear_cross_entropy, tile_columns

N, V, C = 1024, 1024, 32  # rows, vocabulary, width: small enough for CPU fp16, big enough to underflow


def head_inputs():
    """Final hidden states (LayerNorm output) and a head at GPT-2's initialisation (std 0.02)."""
    gen = torch.Generator().manual_seed(0)
    hidden = F.layer_norm(torch.randn(N, C, generator=gen), (C,))
    weight = torch.randn(V, C, generator=gen) * 0.02
    return hidden, weight, torch.randint(0, V, (N,), generator=gen)


def fused(hidden, weight, targets, keep=None):
    return linear_cross_entropy(hidden, weight, targets, V, columns=256, keep=keep)


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def gradients(loss_fn, dtype, scale=2.0**16, **options):
    """dL/dhidden and dL/dweight with the matmuls in `dtype`, the loss scaled as GradScaler scales it."""
    hidden, weight, targets = head_inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(hidden, weight, targets, **options)
    (loss * scale).backward()
    return hidden.grad / scale, weight.grad / scale


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_head_gradients_are_as_accurate_as_the_plain_loss(dtype, keep):
    """fp16 once lost the head gradient: dL/dz = (softmax - onehot) / rows was cast to fp16 before the
    loss scale was applied, so small probabilities underflowed (3.5x the plain loss's error here)."""
    reference = gradients(plain, torch.float32, scale=1.0)
    pairs = zip(gradients(fused, dtype, keep=keep), gradients(plain, dtype), reference, strict=True)
    for fused_grad, plain_grad, exact in pairs:
        fused_error, plain_error = relative_error(fused_grad, exact), relative_error(plain_grad, exact)
        assert fused_error <= 1.1 * plain_error, (fused_error, plain_error)
        assert plain_error < (1e-3 if dtype == torch.float16 else 1e-2)  # the dtype's own rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_work_is_the_forward_alone_under_no_grad(dtype, monkeypatch):
    """Evaluation pays for the logits only (2NVC FLOPs); training adds the two gradient matmuls (4NVC)
    with the exps kept, and recomputes the logits too (2NVC) when keeping them would pass KEEP_BYTES."""
    hidden, weight, targets = head_inputs()
    weight.requires_grad_()  # as the model's head always is, even during evaluation
    forward = 2 * N * V * C
    kept_bytes = N * V * (4 if dtype == torch.float32 else 2)
    for keep_bytes, expected in ((kept_bytes, 3 * forward), (kept_bytes - 1, 4 * forward)):
        monkeypatch.setattr(loss_module, "KEEP_BYTES", keep_bytes)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            with FlopCounterMode(display=False) as no_grad_flops, torch.no_grad():
                fused(hidden, weight, targets)
            with FlopCounterMode(display=False) as training_flops:
                fused(hidden, weight, targets).backward()
        assert no_grad_flops.get_total_flops() == forward
        assert training_flops.get_total_flops() == expected


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("factor", [-2.0, 0.0, 3.0])
def test_the_incoming_gradient_scales_both_gradients_whatever_its_sign(factor, keep):
    """backward multiplies dL/dz by the incoming gradient's size and applies its sign apart."""
    hidden, weight, targets = head_inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    (factor * fused(hidden, weight, targets, keep)).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (factor * plain(hidden, weight, targets)).backward()
    torch.testing.assert_close(got[0], hidden.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(got[1], weight.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("keep", [True, False])
def test_a_power_of_two_scale_gives_exactly_that_multiple_of_the_gradients(keep):
    """What makes accumulating micro-batches (loss / steps) and averaging over DDP processes compute the
    same bits: halving the loss halves every gradient exactly, not just to rounding."""
    hidden, weight, targets = head_inputs()
    grads = []
    for factor in (1.0, 0.5, 2.0**-16):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (factor * fused(h, w, targets, keep)).backward()
        grads.append((h.grad / factor, w.grad / factor))
    for h_grad, w_grad in grads[1:]:
        assert torch.equal(h_grad, grads[0][0]) and torch.equal(w_grad, grads[0][1])


def test_tiles_hold_about_two_million_logits_whatever_the_rows():
    assert tile_columns(1024) == 2048 and tile_columns(2048) == 1024
    assert tile_columns(1 << 20) == MIN_TILE_COLUMNS and tile_columns(1) % 64 == 0


def test_two_forwards_before_their_backwards_keep_their_own_exps():
    """The kept buffers are reused between steps: a second forward before the first backward (two
    losses summed, as a user's own loop may do) must not overwrite the first one's exps."""
    hidden, weight, targets = head_inputs()
    other_targets = targets.roll(1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused(h, w, targets, keep=True) + 2 * fused(h, w, other_targets, keep=True)).backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (plain(h_ref, w_ref, targets) + 2 * plain(h_ref, w_ref, other_targets)).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-7, rtol=1e-4)
