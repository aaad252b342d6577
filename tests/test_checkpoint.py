"""Training checkpoints: complete round trips, and damaged or incompatible ones refused in one line."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from training_helpers import metrics, smallgpt, tiny_run, write_data

from smallgpt import checkpoint
from smallgpt import train as training
from smallgpt.checkpoint import (
    TRAINER_NAME,
    RunStart,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    step_checkpoints,
)
from smallgpt.config import ModelConfig
from smallgpt.errors import SmallGPTError
from smallgpt.files import atomic_write_dir, remove_temporaries
from smallgpt.optim import learning_rate_at
from smallgpt.runs import train_command
from smallgpt.train import train


class NotATensor:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 10-update run with checkpoints at steps 5 and 10 (and best/), shared by the tests below."""
    root = tmp_path_factory.mktemp("finished")
    data = write_data(root / "data")
    train(tiny_run(max_iters=10, eval_interval=5), data, root / "run")
    return data, root / "run"


def copy_run(finished_run, tmp_path):
    data, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return data, tmp_path / "run"


def test_checkpoint_holds_everything_to_continue(finished_run):
    _, run = finished_run
    state, trainer_state = load_checkpoint(step_checkpoints(run)[-1])
    assert state["step"] == 10 and state["tokens"] == 10 * 4 * 16
    assert state["sampler"]["calls"] == 20  # 10 updates x 2 micro-batches, none drawn ahead
    assert state["config"]["model"]["n_layer"] == 1 and state["config"]["train"]["max_iters"] == 10
    moments = trainer_state["optimizer"]["state"]
    assert len(moments) == sum(1 for _ in load_model(run).parameters())
    assert all(m["exp_avg"].abs().sum() > 0 for m in moments.values())
    model = load_model(run)  # a run dir means its best weights
    assert model.config.n_embd == 32 and not model.training


def test_prune_keeps_the_newest_and_clears_temporaries(finished_run, tmp_path):
    _, run = copy_run(finished_run, tmp_path)
    (run / "checkpoints" / ".step-0000015.tmp-abc").mkdir()  # left by a killed writer
    prune_checkpoints(run, keep=1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000010"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate_weights", "not a readable safetensors file"),
        ("truncate_trainer", "damaged or truncated"),
        ("remove_state", "incomplete: no state.json"),
        ("foreign_pickle", "damaged or truncated"),
        ("step_not_a_number", "is damaged: its state.json or trainer.pt is malformed"),
        ("state_not_an_object", "is damaged: its state.json or trainer.pt is malformed"),
        ("negative_sampler_count", "is damaged: its state.json or trainer.pt is malformed"),
        ("foreign_optimizer", "has a damaged optimizer state"),
    ],
)
def test_damaged_checkpoint_is_refused_on_resume(finished_run, tmp_path, damage, message):
    data, run = copy_run(finished_run, tmp_path)
    newest = step_checkpoints(run)[-1]
    if damage == "truncate_weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "truncate_trainer":
        trainer = newest / TRAINER_NAME
        trainer.write_bytes(trainer.read_bytes()[:100])
    elif damage == "remove_state":
        (newest / "state.json").unlink()
    elif damage in ("step_not_a_number", "state_not_an_object", "negative_sampler_count"):
        state = json.loads((newest / "state.json").read_text())
        state["step"] = "10" if damage == "step_not_a_number" else state["step"]
        state["sampler"]["calls"] = -1 if damage == "negative_sampler_count" else state["sampler"]["calls"]
        (newest / "state.json").write_text(json.dumps([state] if damage == "state_not_an_object" else state))
    elif damage == "foreign_optimizer":
        torch.save(
            {"optimizer": {"state": {}, "param_groups": [{"params": [0]}]}, "scaler": {}},
            newest / TRAINER_NAME,
        )
    else:  # an object weights_only loading must not unpickle
        torch.save({"optimizer": NotATensor()}, newest / TRAINER_NAME)
    with pytest.raises(SmallGPTError, match=message):
        train(tiny_run(max_iters=20, eval_interval=5), data, run, start=RunStart.resume(run))


def test_cli_refuses_a_truncated_checkpoint_in_one_line(finished_run, tmp_path):
    data, run = copy_run(finished_run, tmp_path)
    weights = step_checkpoints(run)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = smallgpt("train", "--resume", str(run), "--data", str(data))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_incompatible_configs_are_refused(finished_run, tmp_path):
    data, run = copy_run(finished_run, tmp_path)
    result = smallgpt("train", "--resume", str(run), "--data", str(data), "n_layer=2")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: checkpoint {step_checkpoints(run)[-1]} has an incompatible model config: n_layer=1 (not 2)"
    )
    with pytest.raises(SmallGPTError, match=r"incompatible model config: n_embd=32 \(not 64\)"):
        train(tiny_run(n_embd=64), data, tmp_path / "finetune", start=RunStart.init_from(run))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(SmallGPTError, match="not a SmallGPT checkpoint"):
        train(tiny_run(), data, tmp_path / "finetune2", start=RunStart.init_from(foreign))


def test_init_from_starts_from_the_checkpoint_weights(finished_run, tmp_path):
    data, run = finished_run
    settings = tiny_run(max_iters=1, learning_rate=1e-9, min_lr=0, dropout=0.1)
    result = train(settings, data, tmp_path / "ft", start=RunStart.init_from(run))
    start, tuned = load_model(run), load_model(tmp_path / "ft" / "checkpoints" / "step-0000001")
    assert result.step == 1 and tuned.config.dropout == 0.1  # dropout may change: it has no weights
    for (name, a), (_, b) in zip(start.named_parameters(), tuned.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_a_crafted_file_cannot_demand_a_huge_model(tmp_path, monkeypatch):
    """16 bytes of weights whose metadata claims a 1e16-parameter model: refused before building."""
    claim = {**ModelConfig().to_dict(), "n_layer": 1000, "n_embd": 100_000, "n_head": 1}
    crafted = tmp_path / "crafted.safetensors"
    save_file(
        {"transformer.wte.weight": torch.zeros(2, 2)},
        str(crafted),
        {checkpoint.CONFIG_KEY: json.dumps(claim)},
    )

    def build(config):
        raise AssertionError("the model was built")

    monkeypatch.setattr(checkpoint, "GPT", build)
    with pytest.raises(
        SmallGPTError, match=r"needs at least 10,005,030,400,000 parameters, the file holds 4"
    ):
        load_model(crafted)
    # Metadata of the wrong types is refused by the config itself, still before any building.
    for bad in ({**claim, "n_layer": "1000"}, [1, 2], {**claim, "dropout": float("nan")}):
        save_file({"w": torch.zeros(1)}, str(crafted), {checkpoint.CONFIG_KEY: json.dumps(bad)})
        with pytest.raises(SmallGPTError, match="n_layer: '1000' is str|not a JSON object|dropout"):
            load_model(crafted)


def test_a_file_big_enough_but_of_other_shapes_is_refused_in_one_line(finished_run, tmp_path):
    _, run = finished_run
    weights = load_model(run).state_dict()
    weights["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(1, 1)
    del weights["lm_head.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file(weights, str(bad), {checkpoint.CONFIG_KEY: json.dumps(load_model(run).config.to_dict())})
    with pytest.raises(
        SmallGPTError, match="do not match their config: size mismatch for transformer.h.0.mlp"
    ):
        load_model(bad)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files via /proc")
def test_files_and_directories_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    final = tmp_path / "step-0000001"

    def fsync(fd):
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_dir(final, lambda tmp: [(tmp / n).write_text(n) for n in ("a", "b")])
    before_rename = [name for name, renamed in synced if not renamed]
    assert {"a", "b"} <= set(before_rename) and any(n.startswith(".step-0000001.tmp-") for n in before_rename)
    assert (tmp_path.name, True) in synced  # the parent's new entry, after the rename
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"]


def test_leftovers_of_a_killed_writer_are_cleared_or_restored(tmp_path):
    (tmp_path / ".best.old-41").mkdir()  # killed between moving best/ aside and renaming the new one
    (tmp_path / ".best.old-41" / "model.safetensors").write_text("the old best")
    (tmp_path / ".best.tmp-abc").mkdir()  # the new one, maybe incomplete
    (tmp_path / "step").mkdir()
    (tmp_path / ".step.old-7").mkdir()  # killed after the new one was in place
    (tmp_path / ".config.tmp-9.json").write_text("{")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "the old best"


def best_loss(run):
    return json.loads((run / "best" / "state.json").read_text())["val_loss"]


def test_a_kill_between_best_and_checkpoint_never_leaves_a_false_best(tmp_path, monkeypatch):
    """best/ is written before the checkpoint that counts it; die in between, resume, and best/
    still holds the lowest validation loss the run has seen, and the checkpoints agree."""
    data = write_data(tmp_path / "data")
    run = tmp_path / "run"
    real_save = training.save_checkpoint

    def save_then_die(directory, *args):
        if directory.name == "step-0000010":
            raise KeyboardInterrupt  # as a kill would, right after best/ was replaced
        real_save(directory, *args)

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(max_iters=20, eval_interval=5), data, run)
    newest = load_checkpoint(step_checkpoints(run)[-1])[0]
    assert newest["step"] == 5 and json.loads((run / "best" / "state.json").read_text())["step"] == 10
    assert best_loss(run) <= newest["best_val_loss"]  # best/ is ahead, never behind
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    train(tiny_run(max_iters=20, eval_interval=5), data, run, start=RunStart.resume(run))
    evals = [r["val_loss"] for r in metrics(run, "eval") if not r.get("final")]
    final_state = load_checkpoint(step_checkpoints(run)[-1])[0]
    assert best_loss(run) == min(evals) == final_state["best_val_loss"]


def test_resume_trains_on_the_runs_own_data_and_refuses_other_data(finished_run, tmp_path):
    data, run = copy_run(finished_run, tmp_path)
    recorded = load_checkpoint(step_checkpoints(run)[-1])[0]["data"]
    assert recorded == {
        "path": str(data.resolve()),
        "tokenizer_hash": None,
        "tokens": {"train": 20_000, "val": 2_000},
    }
    other = write_data(tmp_path / "other", train_tokens=30_000)
    with pytest.raises(SmallGPTError, match="trained on .*, not on .*other.*--allow-different-data"):
        train_command(["max_iters=11"], out=str(run), resume=True, data=str(other))
    moved = shutil.copytree(data, tmp_path / "moved")  # the same data elsewhere is the same data
    assert train_command(["max_iters=11"], out=str(run), resume=True, data=str(moved)).step == 11
    assert train_command(["max_iters=12"], out=str(run), resume=True).step == 12  # no --data: its own
    result = train_command(
        ["max_iters=13"], out=str(run), resume=True, data=str(other), allow_different_data=True
    )
    assert result.step == 13
    newest = step_checkpoints(run)[-1]
    state = json.loads((newest / "state.json").read_text())
    del state["data"]  # a run from before data was recorded
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.raises(SmallGPTError, match="does not record its training data .*: give --data"):
        train_command(["max_iters=14"], out=str(run), resume=True)


def test_resume_reads_the_checkpoint_once(finished_run, tmp_path, monkeypatch):
    """runs.py decides the start and the Trainer applies it: trainer.pt is loaded one time, not twice."""
    data, run = copy_run(finished_run, tmp_path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kw: loads.append(args[0]) or real_load(*args, **kw))
    assert train_command(["max_iters=11"], out=str(run), resume=True).step == 11
    assert loads == [step_checkpoints(run)[-2] / TRAINER_NAME]


def test_a_longer_max_iters_on_resume_keeps_the_schedule(finished_run, tmp_path):
    """The run decayed to min_lr over its 10 updates; 5 more run at min_lr, with no jump back up."""
    data, run = copy_run(finished_run, tmp_path)
    train_command(["max_iters=15"], out=str(run), resume=True)
    config = load_checkpoint(step_checkpoints(run)[-1])[0]["config"]["train"]
    assert (config["max_iters"], config["lr_decay_iters"]) == (15, 10)
    lrs = {r["step"]: r["lr"] for r in metrics(run, "train")}
    assert [lrs[step] for step in range(11, 16)] == [tiny_run().train.min_lr] * 5
    # What the same steps would have had with the cosine re-stretched over 15: well above the floor.
    stretched = tiny_run(max_iters=15).train
    assert learning_rate_at(stretched, 10) > 2 * stretched.min_lr
    # Explicitly re-planning the decay is allowed; going below the step reached is not.
    train_command(["max_iters=20", "lr_decay_iters=20"], out=str(run), resume=True)
    assert load_checkpoint(step_checkpoints(run)[-1])[0]["config"]["train"]["lr_decay_iters"] == 20
    with pytest.raises(SmallGPTError, match=r"max_iters=5 is below the step the run has reached \(20\)"):
        train_command(["max_iters=5"], out=str(run), resume=True)
    assert math.isfinite(best_loss(run))
