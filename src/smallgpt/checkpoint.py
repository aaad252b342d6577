"""Saving and loading model weights safely: safetensors, atomic writes, config stored alongside.

A weights file is self-describing: the model config travels in the safetensors metadata, so
`load_model("model.safetensors")` needs nothing else. Nothing here unpickles data.

Run directory layout (written by `smallgpt train`):
    RUN_DIR/checkpoints/step-0001000/model.safetensors   (+ training state, see smallgpt.train)
    RUN_DIR/best/model.safetensors                         lowest validation loss so far
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from smallgpt.config import ModelConfig
from smallgpt.errors import SmallGPTError
from smallgpt.model import GPT

WEIGHTS_NAME = "model.safetensors"
CONFIG_KEY = "smallgpt_model_config"


def atomic_write_dir(final: Path, write) -> None:
    """Call `write(tmp_dir)`, then move tmp_dir to `final` so readers never see a half-written dir."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_weights(model: GPT, path: Path) -> None:
    """Write the model's weights and config to one safetensors file (tied head stored once)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict())}
    save_file(state, str(path), metadata=metadata)


def resolve_weights(path: str | Path) -> Path:
    """Find the weights file a user means: a file, a checkpoint dir, or a run dir (best, else latest)."""
    path = Path(path)
    if not path.exists():
        raise SmallGPTError(f"checkpoint not found: {path}")
    if path.is_file():
        return path
    candidates = [path / WEIGHTS_NAME, path / "best" / WEIGHTS_NAME]
    steps = sorted((path / "checkpoints").glob(f"step-*/{WEIGHTS_NAME}"))
    candidates += steps[::-1]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SmallGPTError(f"no {WEIGHTS_NAME} in {path} (expected a run or checkpoint directory)")


def read_model_config(weights: Path) -> ModelConfig:
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise SmallGPTError(f"{weights} is not a readable safetensors file ({exc})") from None
    if CONFIG_KEY not in metadata:
        raise SmallGPTError(f"{weights} has no SmallGPT model config (not a SmallGPT checkpoint)")
    return ModelConfig.from_dict(json.loads(metadata[CONFIG_KEY]))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Build a GPT from a checkpoint (see `resolve_weights`) with its saved config, in eval mode."""
    weights = resolve_weights(path)
    config = read_model_config(weights)
    model = GPT(config)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise SmallGPTError(f"cannot read weights from {weights} ({exc})") from None
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise SmallGPTError(f"weights in {weights} do not match their config: {first}") from None
    return model.to(device).eval()
