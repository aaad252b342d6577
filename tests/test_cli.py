"""The `smallgpt` command as users run it: a real subprocess, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest


def smallgpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smallgpt", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_subcommands():
    result = smallgpt("--help")
    assert result.returncode == 0
    for command in ("tokenize", "model"):
        assert command in result.stdout


def test_version():
    from smallgpt import __version__

    result = smallgpt("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_tokenize_prints_ids_pieces_and_count():
    result = smallgpt("tokenize", "The future of artificial intelligence is")
    assert result.returncode == 0
    assert "[464, 2003, 286, 11666, 4430, 318]" in result.stdout
    assert "6 tokens" in result.stdout
    data = json.loads(smallgpt("tokenize", "unbelievable", "--json").stdout)
    assert data["count"] == len(data["ids"]) > 1 and "".join(data["pieces"]) == "unbelievable"


def test_model_reports_seed_parameter_count():
    data = json.loads(smallgpt("model", "--preset", "smallgpt-10m", "--json").stdout)
    assert round(data["non_embedding_parameters"] / 1e6, 1) == 10.7
    assert data["config"]["n_layer"] == 6 and data["config"]["n_embd"] == 384


@pytest.mark.parametrize(
    "args, message",
    [
        (["model", "--preset", "huge"], "unknown preset 'huge'"),
        (["model", "n_layer=-2"], "n_layer must be at least 1"),
        (["model", "n_head=5"], "does not divide"),
    ],
)
def test_bad_input_gives_one_line_error(args, message):
    result = smallgpt(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
