"""Training: the loop learns, the recipe is the seed's, resume is exact, failures stop cleanly."""

import math
import shutil
import signal

import numpy as np
import pytest
import torch
from rich.console import Console
from training_helpers import (
    MODERN_SETTINGS,
    cli_args,
    final_weights,
    metrics,
    smallgpt,
    start_smallgpt,
    tiny_run,
    wait_for_step,
    write_data,
)

from smallgpt.distributed import Runtime
from smallgpt.errors import SmallGPTError
from smallgpt.loader import SAMPLERS, DeviceBatches, RandomBatches
from smallgpt.model import GPT
from smallgpt.optim import make_optimizer
from smallgpt.recipe import TrainConfig, resolve_config
from smallgpt.runs import split_cli_args
from smallgpt.train import Trainer, train


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data")


def test_tiny_run_learns_and_writes_a_complete_run_dir(data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_run(max_iters=40), data, out)
    train_losses = [r["loss"] for r in metrics(out, "train")]
    evals = [r["val_loss"] for r in metrics(out, "eval")]
    assert train_losses[0] > math.log(97) - 0.3  # starts near a uniform guess
    assert evals[-1] < evals[0] - 1.0 and result.final_val_loss < 2.5  # learned most of the pattern
    assert result.step == 40 and not result.interrupted
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == [
        "step-0000020",
        "step-0000030",
        "step-0000040",
    ]  # fmt: skip  (keep_last = 3)
    assert (out / "best" / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = metrics(out, "final")[0]
    assert final["val_loss"] == pytest.approx(result.final_val_loss)
    assert final["val_perplexity"] == pytest.approx(math.exp(result.final_val_loss))


def test_seed_recipe_is_the_default():
    run = resolve_config(preset="smallgpt-10m")
    cfg = run.train
    assert (cfg.max_iters, cfg.batch_size // cfg.micro_batch_size, cfg.micro_batch_size) == (5000, 4, 8)
    assert run.model.block_size * cfg.batch_size == 8192  # tokens per update
    assert (cfg.learning_rate, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip) == (
        3e-4, 0.1, 0.9, 0.95, 1.0,
    )  # fmt: skip
    assert run.model.dropout == 0.1
    assert cfg == TrainConfig()


def test_weight_decay_applies_to_matrices_only():
    model = GPT(tiny_run().model)
    decayed, plain = make_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in decayed["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2
    }
    assert all(names[id(p)].endswith(("bias", "weight")) and p.dim() == 1 for p in plain["params"])
    assert "transformer.ln_f.weight" in {names[id(p)] for p in plain["params"]}


class FixedBatches:
    """Hands out given batches in order instead of sampling (to feed two trainers the same data)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


# Muon orthogonalises each update: directions the gradient barely has are scaled up to full size, and
# with them the rounding noise of a different summation order. Its weights agree to 2e-4 after 3
# updates (5% of one update's RMS, 0.2 x muon_lr = 0.004), AdamW's to 1e-5.
@pytest.mark.parametrize("recipe, atol", [({}, 1e-5), (MODERN_SETTINGS, 2e-4)], ids=["seed", "modern"])
def test_gradient_accumulation_equals_one_large_batch(data, tmp_path, recipe, atol):
    runtime = Runtime(0, 0, 1, torch.device("cpu"))
    big = RandomBatches(np.arange(5000, dtype=np.uint16) % 97, 16, 8, seed=3)
    batches = [big.next_batch() for _ in range(3)]
    results = []
    for micro in (8, 2):  # one batch of 8 vs 4 accumulated micro-batches of 2
        run = tiny_run(batch_size=8, micro_batch_size=micro, grad_clip=0.5, **recipe)
        trainer = Trainer(run, data, tmp_path / f"run-{micro}", runtime, Console(quiet=True))
        slices = [(x[i : i + micro], y[i : i + micro]) for x, y in batches for i in range(0, 8, micro)]
        trainer.batches = FixedBatches(slices)
        losses = [trainer.update().item() for _ in range(3)]
        results.append((losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (losses_big, weights_big), (losses_acc, weights_acc) = results
    assert losses_big == pytest.approx(losses_acc, abs=1e-5)
    for name, tensor in weights_big.items():
        torch.testing.assert_close(weights_acc[name], tensor, atol=atol, rtol=1e-5)


def test_the_sampling_knob_picks_how_training_windows_are_drawn(data, tmp_path):
    runtime, quiet = Runtime(0, 0, 1, torch.device("cpu")), Console(quiet=True)
    for sampling, kind in SAMPLERS.items():  # each kind's windows: tests/test_loader.py
        trainer = Trainer(tiny_run(sampling=sampling), data, tmp_path / sampling, runtime, quiet)
        assert type(trainer.batches.sampler) is kind
    assert resolve_config("tiny-modern").train.sampling == "epochs"  # issue 22's third pass
    assert resolve_config("tiny").train.sampling == "random"


def test_sigkill_and_resume_gives_bit_identical_weights(data, tmp_path):
    settings = dict(max_iters=50, dropout=0.1)  # dropout: the RNG must resume exactly too
    reference = tmp_path / "reference"
    train(tiny_run(**settings), data, reference)

    killed = tmp_path / "killed"
    process = start_smallgpt("train", "--data", str(data), "--out", str(killed), *cli_args(**settings))
    wait_for_step(killed, 23, process)  # between the checkpoints at 20 and 30
    process.kill()
    process.wait()
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*"))[-1] < "step-0000050"
    resumed = smallgpt("train", "--resume", str(killed), "--data", str(data))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    expected, got = final_weights(reference), final_weights(killed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # The metrics of the redone steps replace the killed run's, so the log reads as one run.
    assert [r["step"] for r in metrics(killed, "train")] == list(range(1, 51))
    assert metrics(killed, "final") == metrics(reference, "final")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    process = start_smallgpt("train", "--data", str(data), "--out", str(out), *cli_args(max_iters=200))
    wait_for_step(out, 12, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped at step" in stdout
    stopped_at = int(stdout.split("stopped at step ")[1].split(";")[0])
    assert 12 <= stopped_at < 200 and (out / "checkpoints" / f"step-{stopped_at:07d}").is_dir()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real_forward, calls = GPT.forward, []

    def forward_that_diverges(self, idx, targets=None):
        calls.extend([1] if self.training else [])  # 2 training micro-batches per update
        loss = real_forward(self, idx, targets)
        return loss * float("nan") if len(calls) > 2 * 14 else loss  # from update 15 on

    monkeypatch.setattr(GPT, "forward", forward_that_diverges)
    out = tmp_path / "run"
    with pytest.raises(SmallGPTError, match=r"training loss became nan at step 15.*step-0000010"):
        train(tiny_run(max_iters=30), data, out)
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000010"]


def test_run_dir_problems_fail_before_training(data, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SmallGPTError, match="cannot create run directory .*: Not a directory"):
        train(tiny_run(), data, blocker / "run")

    train(tiny_run(max_iters=10), data, tmp_path / "done")
    with pytest.raises(SmallGPTError, match="already holds a run: continue it with --resume"):
        train(tiny_run(), data, tmp_path / "done")

    nearly_full = shutil._ntuple_diskusage(total=10**9, used=10**9 - 1000, free=1000)
    monkeypatch.setattr("smallgpt.checkpoint.shutil.disk_usage", lambda path: nearly_full)
    with pytest.raises(SmallGPTError, match="not enough disk space"):
        train(tiny_run(), data, tmp_path / "full")
    assert not (tmp_path / "full" / "checkpoints").exists()


def test_bad_configs_are_refused_in_one_line(data, tmp_path):
    with pytest.raises(SmallGPTError, match="unknown config field 'learnin_rate'"):
        tiny_run(learnin_rate=1)
    with pytest.raises(SmallGPTError, match="multiple of micro_batch_size"):
        tiny_run(batch_size=6, micro_batch_size=4)
    with pytest.raises(SmallGPTError, match="min_lr"):
        tiny_run(min_lr=1.0)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("max_iters = = 3")
    result = smallgpt("train", "--config", str(bad_toml), "--data", str(data), "--out", str(tmp_path / "r"))
    assert result.returncode == 1 and result.stderr.startswith("error: cannot read config file")
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_file_and_overrides_take_precedence_in_order(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "smallgpt-10m"\nmax_iters = 7\n[model]\nn_layer = 2\n[train]\nseed = 5\n')
    run = resolve_config(None, config, {"seed": "9"})
    assert (run.preset, run.model.n_layer, run.model.n_embd) == ("smallgpt-10m", 2, 384)
    assert (run.train.max_iters, run.train.seed) == (7, 9)
    positional, overrides = split_cli_args(["RUN", "--max-iters", "3", "--seed=4", "dropout=0"])
    assert positional == ["RUN"] and overrides == {"max_iters": "3", "seed": "4", "dropout": "0"}


def test_device_batches_resume_where_they_left_off():
    tokens = np.arange(1000, dtype=np.uint16)
    first = DeviceBatches(RandomBatches(tokens, 8, 2, seed=1), torch.device("cpu"))
    drawn = [first.next() for _ in range(3)]
    second = DeviceBatches(RandomBatches(tokens, 8, 2, seed=1), torch.device("cpu"))
    second.load_state_dict(first.state_dict())  # the batch drawn ahead is not counted as used
    assert torch.equal(second.next()[0], first.next()[0])
    assert not any(torch.equal(x, second.next()[0]) for x, _ in drawn)
