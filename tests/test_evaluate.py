"""Evaluation against a hand-written reference (logits + F.cross_entropy), and its determinism. (`eval` of
every architecture on a prepared split and on raw text, and `plot`: test_architectures.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_helpers import write_data

from smallgpt.checkpoint import save_weights
from smallgpt.config import ModelConfig
from smallgpt.distributed import Runtime
from smallgpt.evaluate import estimate_loss, evaluate_checkpoint
from smallgpt.loader import load_split
from smallgpt.model import GPT

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
    first = evaluate_checkpoint(tmp_path / "m.safetensors", data, batch_size=7)
    second = evaluate_checkpoint(tmp_path / "m.safetensors", data, batch_size=7)
    assert first == second  # deterministic: bit-identical numbers
    assert first["tokens"] == 3000 // 16 * 16
    assert first["loss"] == pytest.approx(
        reference_loss(model, np.asarray(load_split(data, "val"))), abs=1e-5
    )
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))


def test_validation_estimate_uses_the_same_batches_every_time(tmp_path):
    data = write_data(tmp_path / "data")
    model = saved_model(tmp_path / "m.safetensors", vocab_size=128, block_size=16)
    val = load_split(data, "val")
    losses = [estimate_loss(model, val, 4, 3, 1337, CPU, torch.float32) for _ in range(2)]
    assert losses[0] == losses[1]
    assert losses[0] != estimate_loss(model, val, 4, 3, 7, CPU, torch.float32)  # another seed, other windows
