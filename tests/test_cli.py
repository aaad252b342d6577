"""The `smallgpt` command as users run it: help for every command, exit codes, and bad input of every
kind ending in one `error: ...` line (the `cli` fixture runs the command in-process, so an uncaught
exception fails the test with its traceback; a few cases also run in a real process)."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from training_helpers import cli_args

from smallgpt.checkpoint import save_weights
from smallgpt.config import ModelConfig
from smallgpt.model import GPT

# Every command, with options its help must list (each option's own help text is checked too).
COMMAND_OPTIONS = {
    "tokenize": ["--json"],
    "prepare": ["--out", "--val-fraction", "--seed", "--max-docs", "--force", "--quiet"],
    "model": ["--preset", "--json"],
    "train": ["--config", "--preset", "--data", "--out", "--resume", "--init-from", "--allow-different-data"],
    "eval": ["--data", "--split", "--batch-size", "--dtype", "--json"],
    "plot": [],
    "sample": ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--int8"],
    "serve": ["--host", "--port", "--device"],
    "export": ["--out", "--format", "--type", "--force"],
    "import": ["--out", "--force"],
}


def test_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in COMMAND_OPTIONS:
        assert f"  {command} " in out, command


@pytest.mark.parametrize("command", COMMAND_OPTIONS)
def test_each_command_help_lists_its_options(cli, command):
    import typer

    from smallgpt.cli import app

    code, out, _ = cli(command, "--help")
    assert code == 0 and f"smallgpt {command} " in out.splitlines()[0]
    group = typer.main.get_command(app)
    options = [p for p in group.commands[command].params if p.param_type_name == "option"]
    assert set(COMMAND_OPTIONS[command]) <= {name for p in options for name in p.opts}
    for option in options:
        assert option.opts[0] in out and option.help, option.opts  # listed, and explained


def test_version(cli):
    from smallgpt import __version__

    code, out, _ = cli("--version")
    assert code == 0 and __version__ in out


def test_tokenize_prints_ids_pieces_and_count(cli):
    code, out, _ = cli("tokenize", "The future of artificial intelligence is")
    assert code == 0
    assert "[464, 2003, 286, 11666, 4430, 318]" in out and "6 tokens" in out
    data = json.loads(cli("tokenize", "unbelievable", "--json")[1])
    assert data["count"] == len(data["ids"]) > 1 and "".join(data["pieces"]) == "unbelievable"


def test_model_reports_seed_parameter_count(cli):
    data = json.loads(cli("model", "--preset", "smallgpt-10m", "--json")[1])
    assert round(data["non_embedding_parameters"] / 1e6, 1) == 10.7
    assert data["config"]["n_layer"] == 6 and data["config"]["n_embd"] == 384


def test_model_counts_a_huge_model_without_allocating_it(cli):
    # ~1.2e13 parameters (48 TB in fp32): built on the meta device, so only shapes exist.
    L, C, T = 24, 200_000, 256
    code, out, _ = cli(
        "model", "--preset", "smallgpt-10m", f"n_embd={C}", "n_head=1", f"n_layer={L}", "--json"
    )
    assert code == 0
    padded_vocab = 50304
    # Per layer: qkv 3C^2+3C, attention out C^2+C, MLP 4C^2+4C and 4C^2+C, two LayerNorms 4C.
    assert json.loads(out)["parameters"] == padded_vocab * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def crafted_weights(path, config: dict, tensors=None):
    """A tiny safetensors file whose metadata claims `config`."""
    tensors = tensors or {"transformer.wte.weight": torch.zeros(2, 2)}
    save_file(tensors, str(path), metadata={"smallgpt_model_config": json.dumps(config)})
    return str(path)


@pytest.fixture
def bad_files(tmp_path, tiny_data):
    """One input of each damaged kind, in tmp_path."""
    rng = np.random.default_rng(0)
    (tmp_path / "random").mkdir()
    rng.integers(0, 256, 4000, dtype=np.uint8).tofile(tmp_path / "random" / "train.bin")
    rng.integers(0, 256, 4000, dtype=np.uint8).tofile(tmp_path / "random" / "val.bin")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\x01" * 4001)
    (tmp_path / "odd" / "val.bin").write_bytes(b"\x01" * 4000)
    (tmp_path / "a_file").write_text("in the way")
    huge = {**ModelConfig().to_dict(), "n_layer": 4096, "n_embd": 2**20, "n_head": 1}
    crafted_weights(tmp_path / "huge.safetensors", huge)
    crafted_weights(tmp_path / "wrong.safetensors", ModelConfig(n_layer=1).to_dict())
    crafted_weights(tmp_path / "typed.safetensors", {**ModelConfig().to_dict(), "n_layer": "2"})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "notjson.safetensors"), {"smallgpt_model_config": "{"})
    save_weights(GPT(ModelConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)), tmp_path / "gpt2.safetensors")
    return tmp_path


TRAIN = ["train", "--data", "{data}", "--out", "{tmp}/run", *cli_args(max_iters=1)]


@pytest.mark.parametrize(
    "args, message",
    [
        # seeds: any int a user can type is either used or refused
        ([*TRAIN, "seed=-1"], "seed must be in [0, 2**63), not -1"),
        ([*TRAIN, f"seed={2**64}"], "seed must be in [0, 2**63)"),
        (["prepare", "default", "--out", "{tmp}/d", "--seed", "-1"], "--seed must be in [0, 2**63)"),
        (["prepare", "default", "--out", "{tmp}/d", "--seed", str(2**70)], "--seed must be in"),
        # data the model cannot read: ids beyond its vocabulary, random bytes, odd lengths
        ([*TRAIN, "vocab_size=50"], "train.bin holds token id 96, but the model's vocabulary has only 50"),
        ([*TRAIN[:2], "{tmp}/random", *TRAIN[3:]], "holds token id"),
        (["train", "--data", "{tmp}/random", "--out", "{tmp}/r", "--preset", "tiny"], "holds token id"),
        ([*TRAIN[:2], "{tmp}/odd", *TRAIN[3:]], "odd number of bytes"),
        # sizes that cannot fit: refused before anything is allocated
        ([*TRAIN, "n_embd=200000", "n_head=1", "n_layer=999"], "training this model needs at least"),
        ([*TRAIN, "micro_batch_size=10000000000", "batch_size=10000000000"], "needs at least"),
        # outputs with a file in the way, or in a place nothing can be created
        (["prepare", "default", "--out", "{tmp}/a_file"], "is a file, not a directory"),
        (["prepare", "default", "--out", "/dev/null/x"], "cannot create --out directory /dev/null/x"),
        ([*TRAIN[:4], "{tmp}/a_file", *TRAIN[5:]], "run directory {tmp}/a_file is a file"),
        ([*TRAIN[:4], "/dev/null/x", *TRAIN[5:]], "cannot create run directory /dev/null/x"),
        (["export", "{tmp}/gpt2.safetensors", "--out", "/dev/null/x"], "cannot create --out directory"),
        (["import", "{tmp}", "--out", "{tmp}/a_file", "--force"], "is a file, not a directory"),
        # weights files whose metadata lies or is damaged: refused before building the model
        (["sample", "{tmp}/huge.safetensors"], "do not match their config: it needs at least 4,503,"),
        (["eval", "{tmp}/wrong.safetensors", "--data", "{data}"], "do not match their config: it needs"),
        (["sample", "{tmp}/typed.safetensors"], "bad value for n_layer: '2' is str, not int"),
        (["export", "{tmp}/notjson.safetensors", "--out", "{tmp}/hf"], "damaged model config (not JSON)"),
        # eval of data beyond the model's vocabulary, or of a file that is not there; plot of no run
        (["eval", "{tmp}/run", "--data", "{tmp}/random"], "holds token id"),
        (["eval", "{tmp}/gpt2.safetensors", "--data", "{tmp}/nope.txt"], "no such file or directory: "),
        (["plot", "{tmp}/random"], "no metrics.jsonl in {tmp}/random (is it a training run directory?)"),
    ],
)
def test_bad_input_gives_one_line_error(cli, bad_files, tiny_data, args, message):
    if args[:2] == ["eval", "{tmp}/run"]:  # needs a model: one update on the tiny data
        assert cli(*[a.format(data=tiny_data, tmp=bad_files) for a in TRAIN])[0] == 0
    code, _, err = cli(*[a.format(data=tiny_data, tmp=bad_files) for a in args])
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(tmp=bad_files) in err


@pytest.mark.parametrize(
    "toml, message",
    [
        ("n_layer = 2.5", "bad value for n_layer: 2.5 is float, not int"),
        ("keep_last = 1.5", "bad value for keep_last: 1.5 is float, not int"),
        ('n_layer = "two"', "bad value for n_layer: 'two' is not int"),
        ("n_layer = true", "bad value for n_layer: True is bool, not int"),
        ("[train]\nmax_iters = [1, 2]", "bad value for max_iters: [1, 2] is list, not int"),
        ("compile = 1", "bad value for compile: 1 is int, not bool"),
        ("device = 5", "bad value for device: 5 is int, not str"),
        ("learning_rate = nan", "learning_rate: nan is not a finite number"),
        ("seed = -3", "seed must be in [0, 2**63), not -3"),
        ("eval_interval = 1979-05-27", "eval_interval: datetime.date(1979, 5, 27) is date, not int"),
        ("preset = 3", "preset must be a name in quotes, not 3"),
        ("model = 3", "model must be a [model] table, not 3"),
        ("n_layer = ", "cannot read config file"),
    ],
)
def test_config_file_values_are_type_checked(cli, tmp_path, monkeypatch, tiny_data, toml, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(toml + "\n")
    code, _, err = cli("train", "--config", str(tmp_path / "c.toml"), "--data", str(tiny_data))
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_float_field_takes_an_int_from_a_config_file(tmp_path):
    from smallgpt.recipe import resolve_config

    (tmp_path / "c.toml").write_text("learning_rate = 1\ndropout = 0\n")
    run = resolve_config(config_file=tmp_path / "c.toml")
    assert type(run.train.learning_rate) is float and run.train.learning_rate == 1.0
    assert type(run.model.dropout) is float


def test_bad_input_in_a_real_process_has_no_traceback(smallgpt, tmp_path):
    result = smallgpt("prepare", "default", "--out", str(tmp_path), "--seed", "-1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --seed must be in [0, 2**63), not -1"


def test_a_full_disk_where_no_module_expects_a_write_is_still_one_line(cli, monkeypatch):
    """A write outside smallgpt's own outputs (a library's cache, say) that meets a full disk."""

    def full_cache(text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/home/me/.cache/x")

    monkeypatch.setattr("smallgpt.tokenizer.encode", full_cache)
    message = "error: cannot write /home/me/.cache/x: No space left on device\n"
    assert cli("tokenize", "hi") == (1, "", message)
    monkeypatch.setattr("smallgpt.tokenizer.encode", lambda text: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug still shows its traceback
        cli("tokenize", "hi")
