"""Training checkpoints: complete round trips, and damaged or incompatible ones refused in one line."""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from training_helpers import (
    single_thread,  # noqa: F401 (an autouse fixture)
    smallgpt,
    tiny_run,
    write_data,
)

from smallgpt.checkpoint import (
    TRAINER_NAME,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    step_checkpoints,
)
from smallgpt.errors import SmallGPTError
from smallgpt.train import train


class NotATensor:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 10-update run with checkpoints at steps 5 and 10 (and best/), shared by the tests below."""
    root = tmp_path_factory.mktemp("finished")
    data = write_data(root / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_run(max_iters=10, eval_interval=5), data, root / "run")
    torch.set_num_threads(threads)
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
    else:  # an object weights_only loading must not unpickle
        torch.save({"optimizer": NotATensor()}, newest / TRAINER_NAME)
    with pytest.raises(SmallGPTError, match=message):
        train(tiny_run(max_iters=20, eval_interval=5), data, run, resume=True)


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
        train(tiny_run(n_embd=64), data, tmp_path / "finetune", init_from=run)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(SmallGPTError, match="not a SmallGPT checkpoint"):
        train(tiny_run(), data, tmp_path / "finetune2", init_from=foreign)


def test_init_from_starts_from_the_checkpoint_weights(finished_run, tmp_path):
    data, run = finished_run
    settings = tiny_run(max_iters=1, learning_rate=1e-9, min_lr=0, dropout=0.1)
    result = train(settings, data, tmp_path / "ft", init_from=run)
    start, tuned = load_model(run), load_model(tmp_path / "ft" / "checkpoints" / "step-0000001")
    assert result.step == 1 and tuned.config.dropout == 0.1  # dropout may change: it has no weights
    for (name, a), (_, b) in zip(start.named_parameters(), tuned.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
