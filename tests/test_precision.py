"""The precision and compile paths, run on the CPU: fp16 autocast with gradient scaling and torch.compile,
each through the real training step against the fp32 eager one (bf16 autocast: in test_architectures, for
every architecture); and how `dtype=auto` chooses on a CPU (measured, cached, re-measured when the cache is
damaged or stale)."""

import functools
import json
import os

import numpy as np
import pytest
import torch
from rich.console import Console
from training_helpers import MODERN_SETTINGS, tiny_run, write_data

from smallgpt import precision
from smallgpt.checkpoint import RunStart
from smallgpt.config import PRESETS
from smallgpt.distributed import Runtime
from smallgpt.errors import SmallGPTError
from smallgpt.loader import RandomBatches
from smallgpt.loss import linear_cross_entropy
from smallgpt.train import Trainer, train

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
    assert trainer.dtype == torch.float16  # as named, whatever `auto` would measure
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
    fused = torch.compile(functools.partial(linear_cross_entropy, columns=16), backend=backend)
    fused(hidden, weight, targets, 100).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t())[:, :100]
    torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1).backward()
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("recipe", [{}, MODERN_SETTINGS], ids=["adamw", "muon"])
def test_bf16_steps_track_fp32_steps_in_both_recipes(tmp_path, recipe):
    """What `auto` picks on a CPU with fast bf16: the same updates as fp32, to bf16's rounding."""
    fp32_losses, fp32_weights, _ = train_updates(tmp_path, dtype="float32", **recipe)
    losses, weights, _ = train_updates(tmp_path, dtype="bfloat16", **recipe)
    assert losses == pytest.approx(fp32_losses, rel=2e-3)
    for name, tensor in fp32_weights.items():
        assert (weights[name] - tensor).abs().mean() < 5e-3, name


# --- dtype=auto on a CPU: the measured choice and its cache ---

TINY = PRESETS["tiny-modern"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory, and a CPU whose matmul timings the test sets (`cache.times`)."""
    monkeypatch.setenv("SMALLGPT_CACHE", str(tmp_path / "cache"))
    state = {"times": (1.0, 1.0), "attention": None, "calls": 0}

    def fake_timings(probe_lists):  # matmuls, Newton-Schulz's matmuls, attention
        state["calls"] += 1
        fp32, bf16 = state["times"]
        attention_fp32, attention_bf16 = state["attention"] or state["times"]
        return {torch.float32: [fp32, fp32, attention_fp32], torch.bfloat16: [bf16, bf16, attention_bf16]}

    monkeypatch.setattr(precision, "seconds_per_probe", fake_timings)
    state["file"] = tmp_path / "cache" / precision.CACHE_NAME
    return state


@pytest.mark.parametrize("fp32_seconds, bf16_seconds, expected, newton_schulz", [
    (3.0, 1.0, torch.bfloat16, torch.bfloat16),  # AMX / AVX-512 BF16: bf16 3x faster
    # bf16 faster, but not by BF16_MARGIN: autocast's casts would eat it; Newton-Schulz keeps torch's bf16
    (1.0, 0.9, torch.float32, torch.bfloat16),
    (1.0, 4.0, torch.float32, torch.float32),  # bf16 emulated: everything in fp32
])  # fmt: skip
def test_auto_on_a_cpu_trains_in_bf16_only_where_it_measures_faster(
    cache, fp32_seconds, bf16_seconds, expected, newton_schulz
):
    cache["times"] = (fp32_seconds, bf16_seconds)
    decision = precision.resolve_precision("auto", torch.device("cpu"), TINY, 1024)
    assert decision.dtype == expected and decision.ns_dtype == newton_schulz and not decision.cached
    assert decision.describe().startswith(f"{precision.name(expected)} (auto: bf16 matmuls ")


@pytest.mark.parametrize(
    "attention_seconds, attention_dtype", [((1.0, 3.0), torch.float32), ((1.0, 0.5), None)]
)
def test_attention_trains_in_fp32_where_its_bf16_backward_measures_slower(
    cache, attention_seconds, attention_dtype
):
    cache["times"], cache["attention"] = (3.0, 1.0), attention_seconds
    decision = precision.resolve_precision("auto", torch.device("cpu"), TINY, 1024)
    assert decision.dtype == torch.bfloat16 and decision.attention_dtype == attention_dtype
    assert ("attention in float32" in decision.describe()) == (attention_dtype is not None)
    assert precision.cpu_decision(TINY, 1024).attention_dtype == attention_dtype  # and from the cache


def test_the_probes_time_real_work_in_both_dtypes():
    times = precision.seconds_per_probe(precision.probes(PRESETS["tiny"], 256))
    assert all(len(times[d]) == 3 and all(t > 0 for t in times[d]) for d in (torch.float32, torch.bfloat16))


@pytest.mark.parametrize("named", ["float32", "bfloat16"])
def test_a_named_dtype_is_used_as_named_without_measuring(cache, named):
    decision = precision.resolve_precision(named, torch.device("cpu"), TINY, 1024)
    assert decision.dtype == getattr(torch, named) and cache["calls"] == 0
    assert decision.describe() == named


def test_an_unknown_dtype_is_refused_in_one_line(cache):
    with pytest.raises(SmallGPTError, match="unknown dtype 'fp8': use auto or one of float32"):
        precision.resolve_precision("fp8", torch.device("cpu"), TINY, 1024)


def test_the_decision_is_measured_once_then_read_from_the_cache(cache):
    cache["times"] = (3.0, 1.0)
    first = precision.cpu_decision(TINY, 1024)
    second = precision.cpu_decision(TINY, 1024)
    assert cache["calls"] == 1 and second.cached and second.dtype == first.dtype == torch.bfloat16
    assert "cached" in second.describe()
    precision.cpu_decision(TINY, 2048)  # other shapes: another measurement, kept beside the first
    assert cache["calls"] == 2 and len(json.loads(cache["file"].read_text())["entries"]) == 2


@pytest.mark.parametrize("damage", [
    "{not json",  # a half-written or corrupt file
    json.dumps({"version": 0, "entries": {}}),  # another version's layout
    json.dumps(["a", "list"]),
    "KEY",  # this machine's key, with values that are not a decision
])  # fmt: skip
def test_a_corrupt_or_foreign_cache_is_measured_again_and_rewritten(cache, damage):
    cache["times"] = (3.0, 1.0)
    key = precision.machine_key(TINY, 1024)
    cache["file"].parent.mkdir(parents=True)
    bad_entry = {"version": precision.CACHE_VERSION, "entries": {key: {"dtype": "int8", "speedup": "x"}}}
    cache["file"].write_text(json.dumps(bad_entry) if damage == "KEY" else damage)
    decision = precision.cpu_decision(TINY, 1024)
    assert decision.dtype == torch.bfloat16 and not decision.cached and cache["calls"] == 1
    assert precision.cpu_decision(TINY, 1024).cached  # the rewritten file reads back


def test_a_stale_cache_from_another_torch_is_measured_again(cache, monkeypatch):
    cache["times"] = (3.0, 1.0)
    precision.cpu_decision(TINY, 1024)
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # an upgrade: the old verdict may not hold
    cache["times"] = (1.0, 4.0)
    assert precision.cpu_decision(TINY, 1024).dtype == torch.float32 and cache["calls"] == 2


def test_a_capped_instruction_set_is_measured_again(cache, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cache["times"] = (3.0, 1.0)
    assert precision.cpu_decision(TINY, 1024).dtype == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # oneDNN without its bf16 kernels
    cache["times"] = (1.0, 4.0)
    assert precision.cpu_decision(TINY, 1024).dtype == torch.float32 and cache["calls"] == 2


def test_a_cache_that_cannot_be_written_costs_a_measurement_not_the_run(cache, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SMALLGPT_CACHE", str(tmp_path / "file"))  # a file where the directory should be
    assert precision.cpu_decision(TINY, 1024).dtype == torch.float32


def test_the_run_header_names_the_measured_choice(cache, tmp_path):
    cache["times"] = (3.0, 1.0)
    console = Console(record=True, width=200)
    run = tiny_run(max_iters=2, eval_interval=2, final_eval_tokens=64, dtype="auto")
    train(run, write_data(tmp_path / "data"), tmp_path / "run", console=console)
    text = console.export_text()
    assert (
        "device: cpu, bfloat16 (auto: bf16 matmuls 3.0x fp32 on this CPU, Newton-Schulz in bfloat16;" in text
    )
    assert "final validation pass in bfloat16" in text


@pytest.mark.parametrize("first, then", [("float32", "bfloat16"), ("float16", "float32")])
def test_resuming_in_another_precision_continues_and_says_so(tmp_path, first, then):
    """Master weights and optimizer state are fp32 in every precision, so a run can change; fp16's
    gradient scale is dropped (or started afresh) on the way."""
    data, out = write_data(tmp_path / "data"), tmp_path / "run"
    train(tiny_run(max_iters=4, eval_interval=2, final_eval_tokens=0, dtype=first), data, out)
    console = Console(record=True, width=200)
    run = tiny_run(max_iters=6, eval_interval=2, final_eval_tokens=0, dtype=then)
    result = train(run, data, out, start=RunStart.resume(out), console=console)
    assert result.step == 6 and not result.interrupted
    assert (
        f"precision: the checkpoint trained in {first}, this run continues in {then}" in console.export_text()
    )
