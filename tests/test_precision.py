"""The precision and compile paths GPUs take, run on the CPU: fp16 autocast with gradient scaling and
torch.compile, each through the real training step against the fp32 eager one (bf16 autocast: in
test_architectures, for every architecture)."""

import functools
import os

import numpy as np
import pytest
import torch
from rich.console import Console
from training_helpers import tiny_run, write_data

from smallgpt.distributed import Runtime
from smallgpt.loader import RandomBatches
from smallgpt.loss import linear_cross_entropy
from smallgpt.train import Trainer

CPU = Runtime(0, 0, 1, torch.device("cpu"))
UPDATES = 3
# Inductor writes and compiles C++ for every kernel: minutes on a 2-core CPU, too long for the default
# suite, whose compile tests use AOTAutograd without code generation (the graph capture, the fused loss's
# autograd.Function and its backward included). SMALLGPT_INDUCTOR_TESTS=1 runs the inductor ones too.
INDUCTOR = pytest.param(
    "inductor",
    marks=pytest.mark.skipif(
        not os.environ.get("SMALLGPT_INDUCTOR_TESTS"), reason="minutes of C++ compilation on a CPU"
    ),
)


class FixedBatches:
    """The same micro-batches, in order, for every trainer compared."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def train_updates(tmp_path, **settings) -> tuple[list[float], dict, Trainer]:
    """Losses and weights after UPDATES real updates (2 micro-batches each) on fixed data."""
    run = tiny_run(batch_size=4, micro_batch_size=2, **settings)
    name = "-".join(f"{k}={v}" for k, v in settings.items()) or "fp32"
    trainer = Trainer(run, write_data(tmp_path / "data"), tmp_path / name, CPU, Console(quiet=True))
    sampler = RandomBatches(np.arange(5000, dtype=np.uint16) % 97, 16, 2, seed=3)
    trainer.batches = FixedBatches(sampler.next_batch() for _ in range(2 * UPDATES))
    losses = [trainer.update().item() for _ in range(UPDATES)]
    return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


def assert_weights_close(got: dict, expected: dict, atol: float) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=0, msg=name)


def test_fp16_training_with_gradient_scaling_tracks_fp32(tmp_path):
    """fp16 autocast, the loss scaled so that small gradients survive (bf16 autocast is checked for every
    architecture in test_architectures). Measured: losses within 2e-5 of fp32, weights 8e-4 apart on
    average (AdamW moves a weight by ~lr each step whatever its gradient's size, so the few whose tiny
    gradients change sign differ by up to 2 lr)."""
    fp32_losses, fp32_weights, _ = train_updates(tmp_path)
    losses, weights, trainer = train_updates(tmp_path, dtype="float16")
    assert trainer.dtype == torch.float16  # selectable on CPU, though `auto` stays fp32 there
    assert losses == pytest.approx(fp32_losses, rel=2e-4)
    assert losses[-1] < losses[0] - 0.1  # it learns
    for name, tensor in fp32_weights.items():
        assert (weights[name] - tensor).abs().mean() < 2.5e-3, name
    # fp16 scales the loss by 2**16 and skips a step whose gradients overflowed: none did here.
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_training_matches_eager(tmp_path, monkeypatch, backend):
    eager_losses, eager_weights, _ = train_updates(tmp_path)
    monkeypatch.setattr("smallgpt.train.torch.compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    losses, weights, trainer = train_updates(tmp_path, compile=True)
    assert trainer.train_model is not trainer.model  # compiled on the CPU when asked to
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert_weights_close(weights, eager_weights, 1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_fused_loss_gradients_match_the_plain_loss(backend):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(48, 16, generator=gen, requires_grad=True)
    weight = torch.randn(128, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 100, (48,), generator=gen)
    targets[:3] = -1  # ignored positions
    torch._dynamo.reset()
    fused = torch.compile(functools.partial(linear_cross_entropy, chunk_rows=16), backend=backend)
    fused(hidden, weight, targets, 100).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t())[:, :100]
    torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1).backward()
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-6, rtol=1e-5)
