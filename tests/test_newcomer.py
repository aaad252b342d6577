"""The paths a newcomer walks first: one default dataset, small corpora, the final pass, the CLI's seams.

Commands run in-process (conftest's `cli` fixture calls `smallgpt.cli.main`, what the `smallgpt`
script calls), so each check sees the exit status and the exact lines a user sees.
"""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_data
from rich.console import Console
from rich.progress import Progress
from training_helpers import cli_args, metrics, tiny_run

from smallgpt.checkpoint import save_weights
from smallgpt.distributed import Runtime
from smallgpt.evaluate import full_pass_loss
from smallgpt.model import GPT
from smallgpt.monitor import PassProgress
from smallgpt.prepare import CARVED_VAL_FRACTION, prepare_corpus
from smallgpt.recipe import DEFAULT_PRESET, TRAIN_PRESETS, resolve_config
from smallgpt.tokenizer import EOT_ID, get_tokenizer
from smallgpt.train import train

CPU = Runtime(0, 0, 1, torch.device("cpu"))


def words(*args) -> list[str]:
    """Command-line words from paths and strings."""
    return [str(arg) for arg in args]


def one_line_error(result: tuple[int, str, str]) -> str:
    status, _, err = result
    assert status == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    return " ".join(err.split())  # rich wraps nothing on stderr, but be safe about spacing


# --- §1 the final validation pass: capped, skippable, with progress -------------------------------


def test_final_pass_cap_scores_the_first_blocks_exactly(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_run().model).eval()
    tokens = (np.arange(1_000) % 97).astype(np.uint16)
    block = model.config.block_size
    seen = []
    capped = full_pass_loss(
        model, tokens, 4, CPU, torch.float32, max_tokens=100, progress=lambda *a: seen.append(a)
    )
    blocks = 100 // block  # whole blocks within the first 100 tokens
    x = torch.from_numpy(tokens[: blocks * block].astype(np.int64)).view(blocks, block)
    y = torch.from_numpy(tokens[1 : blocks * block + 1].astype(np.int64)).view(blocks, block)
    with torch.no_grad():
        reference = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert capped == pytest.approx(reference, rel=1e-5)
    assert seen[-1] == (blocks * block, blocks * block) and len(seen) == math.ceil(blocks / 4)


def test_a_pass_shows_periodic_lines_when_output_is_not_a_terminal():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, width=200)
    with Progress(console=console) as bar:
        progress = PassProgress(bar, "final validation pass", every=0.0)
        for done in (100, 200, 300):
            progress(done, 300)
    lines = [line for line in stream.getvalue().splitlines() if line.endswith(" tokens")]
    assert lines == ["final validation pass: 100 / 300 tokens", "final validation pass: 200 / 300 tokens"]


def test_final_eval_tokens_zero_skips_the_pass(tmp_path):
    data = write_data(tmp_path / "data")
    skipped = train(tiny_run(max_iters=2, eval_interval=2, final_eval_tokens=0), data, tmp_path / "skip")
    assert skipped.final_val_loss is None and not metrics(tmp_path / "skip", "final")
    assert metrics(tmp_path / "skip", "eval")  # the run itself went as usual


# --- §2 one default dataset -------------------------------------------------------------------


def test_prepare_default_without_out_shows_where_the_default_dataset_lives(tmp_path, monkeypatch, cli):
    from smallgpt import prepare

    (tmp_path / "a.txt").write_text("A stand-in for the bundled corpus. " * 40)
    where = tmp_path / "cache" / "data" / "default"
    prepare_corpus(str(tmp_path / "a.txt"), where, show_progress=False)
    monkeypatch.setattr(prepare, "default_data_dir", lambda force=False: where)
    status, out, _ = cli(*words("prepare", "default"))
    flat = " ".join(out.split())
    assert status == 0 and f"the bundled corpus is prepared in {where}: --data default names it" in flat
    assert "Dataset statistics" in flat and prepare.data_dir_for("default") == where
    refused = cli(*words("prepare", "default", "--val-fraction", "0.2"))
    assert "--out DIR is needed" in one_line_error(refused)


# --- §3 small corpora ---------------------------------------------------------------------------


def test_few_documents_get_validation_carved_from_the_stream(tmp_path, cli):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):  # at 0.5% per document, most seeds leave validation empty
        (texts / f"{i:02d}.txt").write_text(f"Note {i}: the quick brown fox jumps over the lazy dog.\n")
    status, out, _ = cli(*words("prepare", texts, "--out", tmp_path / "data", "--quiet"))
    assert status == 0 and "too few to split by document" in " ".join(out.split())
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    total = meta["total"]["tokens"]
    carved = meta["val_carved_tokens"]
    assert carved == math.ceil(total * CARVED_VAL_FRACTION) == meta["splits"]["val"]["tokens"]
    encoding = get_tokenizer()
    stream = [
        t
        for i in range(40)
        for t in encoding.encode_ordinary((texts / f"{i:02d}.txt").read_text()) + [EOT_ID]
    ]
    train_bin = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    val_bin = np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16)
    assert np.array_equal(np.concatenate([train_bin, val_bin]), stream) and len(stream) == total


def test_a_ten_token_corpus_names_the_smallest_trainable_context(tmp_path, cli):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("One document.\n")
    (texts / "b.txt").write_text("Another one.\n")
    assert prepare_corpus(str(texts), tmp_path / "data", show_progress=False)["total"]["tokens"] == 10
    args = ["train", "--data", tmp_path / "data", "--out", tmp_path / "run"]
    error = one_line_error(cli(*words(*args)))
    assert "8 training tokens, fewer than one training window" in error and "block_size=7 or less" in error
    fits = cli_args(vocab_size=50257, block_size=7, max_iters=2, eval_interval=1, final_eval_tokens=None)
    status, out, err = cli(*words(*args, *fits))
    assert status == 0, err
    assert "full validation pass" in out  # the 2 carved tokens are scored as one shorter block


def test_val_fraction_zero_data_is_refused_with_the_way_out(tmp_path, cli):
    (tmp_path / "a.txt").write_text("Some text of mine. " * 50)
    prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "data", val_fraction=0, show_progress=False)
    error = one_line_error(cli(*words("train", "--data", tmp_path / "data")))
    assert "no validation split (prepared with --val-fraction 0)" in error


# --- §5 CLI seams -----------------------------------------------------------------------------


def test_model_shows_trains_default_preset_and_its_recipe(cli):
    status, out, _ = cli(*words("model", "--json"))
    summary = json.loads(out)
    assert status == 0 and summary["preset"] == DEFAULT_PRESET == resolve_config().preset
    assert summary["train"] == json.loads(json.dumps(vars(TRAIN_PRESETS[DEFAULT_PRESET])))
    status, out, _ = cli(*words("model", "--preset", "tiny"))
    flat = " ".join(out.split())
    assert status == 0 and "training recipe (smallgpt train --preset tiny):" in flat
    assert "warmup_iters=10" in flat and "min_lr=0.0003" in flat and "eval_interval=50" in flat


def test_model_takes_key_value_like_train(cli):
    as_option = json.loads(cli(*words("model", "--n_layer", "2", "--json"))[1])
    as_pair = json.loads(cli(*words("model", "n_layer=2", "--json"))[1])
    assert as_option["config"]["n_layer"] == as_pair["config"]["n_layer"] == 2
    assert as_option["parameters"] == as_pair["parameters"]


def test_an_unquoted_glob_gets_a_hint_to_quote_it(tmp_path, cli):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("text")
    expanded = [tmp_path / "a.txt", tmp_path / "b.txt"]  # what the shell makes of my-texts/*.txt
    error = one_line_error(cli(*words("prepare", *expanded, "--out", tmp_path / "o")))
    assert "a glob is expanded by the shell unless quoted" in error
    error = one_line_error(cli(*words("train", *expanded)))
    assert "an unquoted glob? quote it" in error


def test_data_given_a_file_says_so(tmp_path, cli):
    data = write_data(tmp_path / "data")
    error = one_line_error(cli(*words("train", "--data", data / "train.bin")))
    assert f"--data {data / 'train.bin'} is a file" in error and f"--data {data}" in error
    error = one_line_error(cli(*words("eval", "x", "--data", data / "val.bin")))
    assert "give its directory" in error
    error = one_line_error(cli(*words("plot", data / "train.bin")))
    assert "is a file; give the run directory" in error


def test_import_of_a_smallgpt_checkpoint_says_use_it_directly(tmp_path, cli):
    save_weights(GPT(tiny_run().model), tmp_path / "model.safetensors")
    error = one_line_error(cli(*words("import", tmp_path, "--out", tmp_path / "out")))
    assert "is already a SmallGPT checkpoint; use it directly" in error


def test_resume_takes_the_run_dir_and_refuses_a_different_out(tmp_path, cli):
    status, out, _ = cli(*words("train", "--help"))
    assert "--resume RUN_DIR" in " ".join(out.split("Options")[0].split())  # in the usage line
    run = tmp_path / "run"
    error = one_line_error(cli(*words("train", "--resume", run, "--out", tmp_path / "x")))
    assert "continues that run in place: drop --out" in error
    error = one_line_error(cli(*words("train", "--resume", run, "--out", run)))
    assert "nothing to resume in" in error  # the same dir twice is fine: it got as far as the run


def test_warmup_longer_than_the_run_is_warned_about(tmp_path, cli):
    data = write_data(tmp_path / "data")
    args = cli_args(max_iters=3, warmup_iters=5, eval_interval=3)
    status, out, err = cli(*words("train", "--data", data, "--out", tmp_path / "r", *args))
    assert status == 0, err
    assert "warning: warmup_iters=5 > max_iters=3" in " ".join(out.split())
