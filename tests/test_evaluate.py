"""Evaluation against a hand-written reference (logits + F.cross_entropy), and its determinism. (`eval` of
every architecture on a prepared split and on raw text, and `plot`: test_architectures.)"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_helpers import smallgpt, write_data

from smallgpt.checkpoint import save_weights
from smallgpt.config import ModelConfig
from smallgpt.distributed import Runtime
from smallgpt.evaluate import estimate_loss, evaluate_checkpoint
from smallgpt.loader import load_split
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, get_tokenizer

CPU = Runtime(0, 0, 1, torch.device("cpu"))


def saved_model(path, **shape):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0, **shape}))
    save_weights(model, path)
    return model.eval()


def reference_loss(model: GPT, tokens: np.ndarray) -> float:
    """Mean cross-entropy over every non-overlapping block, from full logits: no shared code path."""
    T = model.config.block_size
    blocks = (len(tokens) - 1) // T
    x = torch.from_numpy(tokens[: blocks * T].astype(np.int64)).view(blocks, T)
    y = torch.from_numpy(tokens[1 : blocks * T + 1].astype(np.int64)).view(blocks, T)
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def test_eval_on_a_prepared_split_matches_the_reference_and_repeats_exactly(tmp_path):
    data = write_data(tmp_path / "data", val_tokens=3_001)
    model = saved_model(tmp_path / "m.safetensors", vocab_size=128, block_size=16)
    first = evaluate_checkpoint(tmp_path / "m.safetensors", data, batch_size=7, dtype="float32")
    second = evaluate_checkpoint(tmp_path / "m.safetensors", data, batch_size=7, dtype="float32")
    assert first == second  # deterministic: bit-identical numbers
    assert first["tokens"] == 3000 // 16 * 16
    assert first["loss"] == pytest.approx(
        reference_loss(model, np.asarray(load_split(data, "val"))), abs=1e-5
    )
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    assert first["dtype"] == "float32"


def test_eval_in_bf16_stays_within_its_rounding_of_the_reference(tmp_path):
    """What `auto` picks on a CPU that multiplies bf16 fast: the matmuls in bf16, the softmax in fp32."""
    data = write_data(tmp_path / "data", val_tokens=3_001)
    model = saved_model(tmp_path / "m.safetensors", vocab_size=128, block_size=16)
    result = evaluate_checkpoint(tmp_path / "m.safetensors", data, batch_size=7, dtype="bfloat16")
    reference = reference_loss(model, np.asarray(load_split(data, "val")))
    assert result["dtype"] == "bfloat16" and result["loss"] == pytest.approx(reference, abs=5e-3)


def test_eval_on_a_raw_jsonl_file_through_the_cli(tmp_path):
    documents = ["The quick brown fox jumps over the lazy dog. " * 5, "Call me Ishmael. " * 8, "  "]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    model = saved_model(tmp_path / "m.safetensors", block_size=32)
    encoding = get_tokenizer()  # the blank document is skipped, as `smallgpt prepare` skips it
    tokens = np.array([t for d in documents[:2] for t in encoding.encode_ordinary(d) + [EOT_ID]])
    args = ("eval", str(tmp_path / "m.safetensors"), "--data", str(corpus))
    result = smallgpt(*args, "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported["tokens"] == (len(tokens) - 1) // 32 * 32
    assert reported["loss"] == pytest.approx(reference_loss(model, tokens), abs=1e-5)

    shown = smallgpt(*args, "--dtype", "bfloat16")  # the text form names the precision it ran in
    assert shown.returncode == 0 and shown.stdout.strip().endswith("(bfloat16)"), shown.stderr
    unknown = smallgpt(*args, "--dtype", "fp8")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: unknown dtype 'fp8'")
    missing = smallgpt("eval", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "nope.txt"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_validation_estimate_uses_the_same_batches_every_time(tmp_path):
    data = write_data(tmp_path / "data")
    model = saved_model(tmp_path / "m.safetensors", vocab_size=128, block_size=16)
    val = load_split(data, "val")
    losses = [estimate_loss(model, val, 4, 3, 1337, CPU, torch.float32) for _ in range(2)]
    assert losses[0] == losses[1]
    assert losses[0] != estimate_loss(model, val, 4, 3, 7, CPU, torch.float32)  # another seed, other windows
