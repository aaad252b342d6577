"""Saving and loading model weights safely: safetensors, atomic writes, config stored alongside.

A weights file is self-describing: the model config travels in the safetensors metadata, so
`load_model("model.safetensors")` needs nothing else. Nothing here unpickles arbitrary objects.

Run directory layout (written by `smallgpt train`):
    RUN_DIR/config.json                                    the run's full config (model + training)
    RUN_DIR/checkpoints/step-0001000/model.safetensors     weights after 1000 updates
                                    /trainer.pt            AdamW moments, gradient-scaler state (tensors)
                                    /state.json            step, data-sampler position, best val loss, config
    RUN_DIR/best/model.safetensors, best/state.json        the weights with the lowest validation loss
Each checkpoint directory is written whole under a temporary name and renamed into place, so a run
killed at any instant leaves every previous checkpoint intact. `trainer.pt` holds only tensors and
plain containers and is read with `torch.load(weights_only=True)`, which refuses anything else.
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
TRAINER_NAME = "trainer.pt"
STATE_NAME = "state.json"
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


def read_weights(weights: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A weights file's tensors, with the head tied to the embedding as in `GPT`."""
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise SmallGPTError(f"cannot read weights from {weights} ({exc})") from None
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def load_weights_into(model: GPT, weights: Path) -> None:
    """Copy a weights file into `model`, refusing one whose tensors do not fit it."""
    state = read_weights(weights, next(model.parameters()).device)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise SmallGPTError(f"weights in {weights} do not match their config: {first}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Build a GPT from a checkpoint (see `resolve_weights`) with its saved config, in eval mode."""
    weights = resolve_weights(path)
    model = GPT(read_model_config(weights)).to(device)
    load_weights_into(model, weights)
    return model.eval()


# --- training checkpoints: weights + everything needed to continue exactly ---


def check_run_dir(out_dir: Path, checkpoint_bytes: int) -> None:
    """Fail before training, not at the first checkpoint: the directory must be writable and roomy."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise SmallGPTError(f"cannot write to run directory {out_dir}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(out_dir).free
    if free < 2 * checkpoint_bytes:  # a new checkpoint is written whole before an old one goes
        raise SmallGPTError(
            f"not enough disk space in {out_dir}: {free / 1e6:,.0f} MB free, checkpoints need "
            f"{2 * checkpoint_bytes / 1e6:,.0f} MB"
        )


def save_checkpoint(directory: Path, model: GPT, trainer_state: dict, state: dict) -> None:
    """Atomically write weights, `trainer_state` (tensors: optimizer, scaler) and `state` (JSON)."""

    def write(tmp: Path) -> None:
        save_weights(model, tmp / WEIGHTS_NAME)
        torch.save(trainer_state, tmp / TRAINER_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")

    atomic_write_dir(directory, write)


def load_checkpoint(directory: Path) -> tuple[dict, dict]:
    """(state, trainer_state) of a training checkpoint; one clear line if it is incomplete or damaged."""
    missing = [n for n in (WEIGHTS_NAME, TRAINER_NAME, STATE_NAME) if not (directory / n).is_file()]
    if missing:
        raise SmallGPTError(f"checkpoint {directory} is incomplete: no {', '.join(missing)}")
    try:
        state = json.loads((directory / STATE_NAME).read_text())
        trainer_state = torch.load(directory / TRAINER_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated JSON, truncated zip, or a pickle that is not plain tensors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmallGPTError(f"checkpoint {directory} is damaged or truncated ({reason[:200]})") from None
    read_model_config(directory / WEIGHTS_NAME)  # refuses a truncated or foreign weights file early
    return state, trainer_state


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's step checkpoints, oldest first (hidden half-written temporaries are not listed)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints, and temporaries left by a killed run."""
    for old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in (run_dir / "checkpoints").glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
