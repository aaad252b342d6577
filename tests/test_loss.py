"""The fused head + cross-entropy (smallgpt.loss) in reduced precision and under no_grad."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from smallgpt.loss import MIN_TILE_COLUMNS, linear_cross_entropy, tile_columns

N, V, C = 1024, 1024, 32  # rows, vocabulary, width: small enough for CPU fp16, big enough to underflow


def head_inputs():
    """Final hidden states (LayerNorm output) and a head at GPT-2's initialisation (std 0.02)."""
    gen = torch.Generator().manual_seed(0)
    hidden = F.layer_norm(torch.randn(N, C, generator=gen), (C,))
    weight = torch.randn(V, C, generator=gen) * 0.02
    return hidden, weight, torch.randint(0, V, (N,), generator=gen)


def fused(hidden, weight, targets):
    return linear_cross_entropy(hidden, weight, targets, V, columns=256)


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def gradients(loss_fn, dtype, scale=2.0**16):
    """dL/dhidden and dL/dweight with the matmuls in `dtype`, the loss scaled as GradScaler scales it."""
    hidden, weight, targets = head_inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(hidden, weight, targets)
    (loss * scale).backward()
    return hidden.grad / scale, weight.grad / scale


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_head_gradients_are_as_accurate_as_the_plain_loss(dtype):
    """fp16 once lost the head gradient: dL/dz = (softmax - onehot) / rows was cast to fp16 before the
    loss scale was applied, so small probabilities underflowed (3.5x the plain loss's error here)."""
    reference = gradients(plain, torch.float32, scale=1.0)
    pairs = zip(gradients(fused, dtype), gradients(plain, dtype), reference, strict=True)
    for fused_grad, plain_grad, exact in pairs:
        fused_error, plain_error = relative_error(fused_grad, exact), relative_error(plain_grad, exact)
        assert fused_error <= 1.1 * plain_error, (fused_error, plain_error)
        assert plain_error < (1e-3 if dtype == torch.float16 else 1e-2)  # the dtype's own rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_work_is_the_forward_alone_under_no_grad(dtype):
    """Evaluation pays for the logits only (2NVC FLOPs); training recomputes them in backward (2NVC)
    and adds the two gradient matmuls (4NVC), in every dtype."""
    hidden, weight, targets = head_inputs()
    weight.requires_grad_()  # as the model's head always is, even during evaluation
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        with FlopCounterMode(display=False) as no_grad_flops, torch.no_grad():
            fused(hidden, weight, targets)
        with FlopCounterMode(display=False) as training_flops:
            fused(hidden, weight, targets).backward()
    forward = 2 * N * V * C
    assert no_grad_flops.get_total_flops() == forward
    assert training_flops.get_total_flops() == 4 * forward


@pytest.mark.parametrize("factor", [-2.0, 0.0, 3.0])
def test_the_incoming_gradient_scales_both_gradients_whatever_its_sign(factor):
    """backward multiplies dL/dz by the incoming gradient's size and applies its sign apart."""
    hidden, weight, targets = head_inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    (factor * fused(hidden, weight, targets)).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (factor * plain(hidden, weight, targets)).backward()
    torch.testing.assert_close(got[0], hidden.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(got[1], weight.grad, atol=1e-7, rtol=1e-4)


def test_a_power_of_two_scale_gives_exactly_that_multiple_of_the_gradients():
    """What makes accumulating micro-batches (loss / steps) and averaging over DDP processes compute the
    same bits: halving the loss halves every gradient exactly, not just to rounding."""
    hidden, weight, targets = head_inputs()
    grads = []
    for factor in (1.0, 0.5, 2.0**-16):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (factor * fused(h, w, targets)).backward()
        grads.append((h.grad / factor, w.grad / factor))
    for h_grad, w_grad in grads[1:]:
        assert torch.equal(h_grad, grads[0][0]) and torch.equal(w_grad, grads[0][1])


def test_tiles_hold_about_a_million_logits_whatever_the_rows():
    assert tile_columns(1024) == 1024 and tile_columns(2048) == 512
    assert tile_columns(1 << 20) == MIN_TILE_COLUMNS and tile_columns(1) % 64 == 0
