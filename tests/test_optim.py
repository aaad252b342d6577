"""The modern recipe's optimizer and schedule: Muon owns exactly the block matrices, the schedule has
its shape, and a Muon run resumes bit for bit. (Muon under torchrun: test_architectures, whose Qwen3
row trains with tiny-modern's recipe, Muon, as the last test here pins.)"""

import dataclasses
import shutil

import pytest
import torch
from training_helpers import (
    MODERN_SETTINGS,
    final_weights,
    tiny_run,
    write_data,
)

from smallgpt.checkpoint import RunStart, load_checkpoint, step_checkpoints
from smallgpt.model import GPT
from smallgpt.optim import (
    Muon,
    learning_rate_at,
    lr_factor,
    make_optimizer,
    muon_momentum_at,
    orthogonalise,
    set_learning_rates,
)
from smallgpt.recipe import TrainConfig, resolve_config
from smallgpt.train import train

MODERN = {**MODERN_SETTINGS, "muon_lr": 0.02, "muon_momentum_start": 0.85, "muon_momentum_warmup": 8}


def test_muon_holds_exactly_the_block_matrices_and_adamw_the_rest():
    run = tiny_run(**MODERN)
    model = GPT(run.model)
    optimizer = make_optimizer(model, run.train, torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_muon == {
        f"transformer.h.0.{name}.weight"
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.c_proj", "mlp.c_gate", "mlp.c_fc",
                     "mlp.c_proj")
    }  # fmt: skip
    assert in_adamw == {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} | {
        f"transformer.h.0.{name}.weight" for name in ("ln_1", "ln_2", "attn.q_norm", "attn.k_norm")
    }
    set_learning_rates(optimizer, run.train, step=4)  # the end of warm-up: the peaks
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 1e-2, 1e-2, 1e-2]
    assert adamw.param_groups[0]["params"] == [model.transformer.wte.weight]
    assert adamw.param_groups[1]["params"] == [model.lm_head.weight]
    # The embedding's and the head's own peaks and the embedding's beta2, when the recipe gives them;
    # everything else keeps its rate.
    own = dataclasses.replace(run.train, embedding_lr=0.05, head_lr=0.03, embedding_beta2=0.99)
    optimizer = make_optimizer(model, own, torch.device("cpu"))
    set_learning_rates(optimizer, own, step=4)
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.05, 0.03, 1e-2]
    assert [g["betas"] for g in optimizer.optimizers[1].param_groups] == [(0.9, 0.99), *[(0.9, 0.95)] * 2]


@pytest.mark.parametrize("recipe", [{}, MODERN], ids=["seed", "modern"])
def test_adam_eps_damps_the_steps_of_gradients_below_it(recipe):
    """AdamW's first step is lr * g / (|g| + eps): a full lr step for a gradient far above eps, a
    damped one for a gradient near or below it (what `adam_eps` trades)."""
    moved = []
    for eps in (1e-8, 1e-5):
        run = tiny_run(**recipe, adam_eps=eps, learning_rate=0.01, weight_decay=0.0)  # the step alone
        model = GPT(run.model)
        optimizer = make_optimizer(model, run.train, torch.device("cpu"))
        set_learning_rates(optimizer, run.train, step=run.train.warmup_iters)  # the peak
        head = model.lm_head.weight
        before = head.detach().clone()
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-5)
        optimizer.step()
        moved.append((before - head.detach()).mean().item())
    # 1e-5 / (1e-5 + 1e-8) = 0.999: the default eps barely damps it; eps 1e-5 halves the step.
    assert moved == pytest.approx([0.01 * 1e-5 / (1e-5 + 1e-8), 0.005], rel=1e-4)


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_zero():
    cfg = TrainConfig(max_iters=1000, warmup_iters=100, learning_rate=1e-3, min_lr=0.0, schedule="wsd")
    factors = [lr_factor(cfg, step) for step in range(1000)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == pytest.approx(1.0)  # linear warm-up
    assert all(f == 1.0 for f in factors[100:501])  # constant until the last half (decay_fraction 0.5)
    assert factors[750] == pytest.approx(0.5) and factors[999] == pytest.approx(0.002)  # linear to zero
    assert all(a > b for a, b in zip(factors[500:], factors[501:], strict=False))
    assert lr_factor(cfg, 1000) == 0.0 and learning_rate_at(cfg, 500) == pytest.approx(1e-3)


def test_muon_momentum_warms_up_holds_then_falls_over_the_decay():
    cfg = TrainConfig(max_iters=1000, optimizer="muon", schedule="wsd", muon_momentum_start=0.85,
                      muon_momentum=0.97, muon_momentum_end=0.9, muon_momentum_warmup=100)  # fmt: skip
    momenta = [muon_momentum_at(cfg, step) for step in range(1000)]
    assert momenta[0] == pytest.approx(0.85) and momenta[50] == pytest.approx(0.91)  # linear warm-up
    assert all(m == pytest.approx(0.97) for m in momenta[100:501])  # held until the decay starts
    assert momenta[750] == pytest.approx(0.935) and muon_momentum_at(cfg, 1000) == pytest.approx(0.9)
    constant = TrainConfig()  # torch.optim.Muon's default, all along
    assert {muon_momentum_at(constant, step) for step in (0, 2500, 4999)} == {0.95}

    model = GPT(tiny_run(**MODERN).model)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    set_learning_rates(optimizer, cfg, step=50)  # the schedule sets Muon's momentum with its rate
    assert optimizer.optimizers[0].param_groups[0]["momentum"] == pytest.approx(0.91)


def test_cosine_schedule_warms_up_peaks_and_decays_to_the_floor():
    cfg = TrainConfig(max_iters=1000, warmup_iters=100, learning_rate=1e-3, min_lr=1e-4)
    assert learning_rate_at(cfg, 0) == pytest.approx(1e-5)  # 1/100 of the peak
    assert learning_rate_at(cfg, 49) == pytest.approx(5e-4)
    assert learning_rate_at(cfg, 99) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert learning_rate_at(cfg, 100) == pytest.approx(1e-3)  # cosine starts at the peak
    assert learning_rate_at(cfg, 550) == pytest.approx(5.5e-4)  # half-way: mean of peak and floor
    assert learning_rate_at(cfg, 1000) == pytest.approx(1e-4)
    assert learning_rate_at(cfg, 5000) == pytest.approx(1e-4)  # stays at the floor
    rates = [learning_rate_at(cfg, s) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_muon_run_resumes_bit_for_bit_from_its_checkpoint(tmp_path):
    data = write_data(tmp_path / "data")
    run = tiny_run(max_iters=20, **MODERN)
    reference = tmp_path / "reference"
    train(run, data, reference)
    state, trainer_state = load_checkpoint(step_checkpoints(reference)[0])  # weights_only=True inside
    muon_state = trainer_state["optimizer"]["optimizers"][0]["state"]
    assert state["step"] == 10 and all("momentum_buffer" in s for s in muon_state.values())

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000020")
    train(run, data, resumed, start=RunStart.resume(resumed))
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_modern_presets_train_with_muon_at_their_twins_tokens_per_update():
    for seed, modern in (("tiny", "tiny-modern"), ("smallgpt-10m", "smallgpt-10m-modern")):
        a, b = resolve_config(seed), resolve_config(modern)
        assert (a.train.optimizer, b.train.optimizer) == ("adamw", "muon")
        assert a.train.batch_size * a.model.block_size == b.train.batch_size * b.model.block_size
        assert a.train.max_iters == b.train.max_iters


def muon_steps(optimizer_class, steps=3, **settings) -> list[torch.Tensor]:
    """Four matrices (two square: one batch; wide; tall) after `steps` updates on fixed random gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((8, 8), (8, 24), (24, 8), (8, 8))
    ]
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **settings)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach() for p in params]


def test_our_muon_in_bf16_is_torch_muon_bit_for_bit():
    expected = muon_steps(torch.optim.Muon)
    got = muon_steps(Muon, ns_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_our_muon_in_fp32_matches_torch_muon_to_bf16_rounding_and_is_more_orthogonal():
    expected = muon_steps(torch.optim.Muon)
    got = muon_steps(Muon, ns_dtype=torch.float32)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # a step moves a weight by ~lr = 0.02
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(16, 48, generator=gen)
    coefficients = torch.optim.Muon([torch.nn.Parameter(matrix)]).defaults["ns_coefficients"]
    exact = orthogonalise(matrix[None].double(), coefficients, 5, 1e-7, torch.float64)
    errors = [(orthogonalise(matrix[None], coefficients, 5, 1e-7, d).double() - exact).abs().max() for d in
              (torch.float32, torch.bfloat16)]  # fmt: skip
    assert errors[0] < 1e-5 < 1e-3 < errors[1]


def test_muon_newton_schulz_runs_in_the_dtype_given():
    model = GPT(tiny_run(**MODERN).model)
    cfg = tiny_run(**MODERN).train
    muon, _ = make_optimizer(model, cfg, torch.device("cpu"), ns_dtype=torch.float32).optimizers
    assert isinstance(muon, Muon) and muon.ns_dtype == torch.float32
