"""Saving and loading model weights safely: safetensors, atomic writes, config stored alongside.

A weights file is self-describing: the model config travels in the safetensors metadata, so
`load_model("model.safetensors")` needs nothing else. Nothing here unpickles arbitrary objects.

Run directory layout (written by `smallgpt train`):
    RUN_DIR/config.json                                    the run's full config (model + training)
    RUN_DIR/checkpoints/step-0001000/model.safetensors     weights after 1000 updates
                                    /trainer.pt            AdamW moments, gradient-scaler state (tensors)
                                    /state.json            step, data-sampler position, best val loss, config
    RUN_DIR/best/model.safetensors, best/state.json        the weights with the lowest validation loss
Each checkpoint directory is written whole under a temporary name, flushed to disk and renamed into
place (`smallgpt.files`), so a run killed at any instant, or a power loss, leaves every previous
checkpoint intact. A weights file too small for the config it claims is refused before the model is
built, so a crafted file cannot demand a huge allocation. `trainer.pt` holds only tensors and
plain containers and is read with `torch.load(weights_only=True)`, which refuses anything else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from smallgpt.config import ModelConfig
from smallgpt.errors import SmallGPTError, first_line, os_reason
from smallgpt.files import atomic_write_dir, make_dir, remove_temporaries
from smallgpt.model import GPT

WEIGHTS_NAME = "model.safetensors"
TRAINER_NAME = "trainer.pt"
STATE_NAME = "state.json"
CONFIG_KEY = "smallgpt_model_config"


def save_weights(model: GPT, path: Path) -> None:
    """Write the model's weights and config to one safetensors file (a tied head stored once)."""
    state = {k: v.detach().contiguous() for k, v in _stored(model.state_dict(), model.config).items()}
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict())}
    save_file(state, str(path), metadata=metadata)


def _stored(state: dict, config: ModelConfig) -> dict:
    """The entries of a state dict that a weights file holds: a tied head is the embedding."""
    tied = config.architecture.tied_head
    return {name: value for name, value in state.items() if not (tied and name == "lm_head.weight")}


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


def is_smallgpt_checkpoint(path: str | Path) -> bool:
    """Whether `path` (a weights file, a checkpoint or a run dir) holds SmallGPT weights."""
    try:
        read_model_config(resolve_weights(path))
    except SmallGPTError:
        return False
    return True


def read_model_config(weights: Path) -> ModelConfig:
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise SmallGPTError(f"{weights} is not a readable safetensors file ({exc})") from None
    if CONFIG_KEY not in metadata:
        raise SmallGPTError(f"{weights} has no SmallGPT model config (not a SmallGPT checkpoint)")
    try:
        values = json.loads(metadata[CONFIG_KEY])
    except ValueError:
        raise SmallGPTError(f"{weights} has a damaged model config (not JSON)") from None
    if not isinstance(values, dict):
        raise SmallGPTError(f"{weights} has a damaged model config (not a JSON object)")
    return ModelConfig.from_dict(values)


def least_parameters(config: ModelConfig) -> int:
    """A lower bound on the parameters `config` implies, computed without building anything: the
    (padded) embedding, and at least one n_embd x n_embd matrix per layer (GPT-2's layer has 12)."""
    return config.padded_vocab_size * config.n_embd + config.n_layer * config.n_embd**2


def check_weights_fit(weights: Path, config: ModelConfig) -> None:
    """Refuse, before building the model, a file too small for its config (read from its header).

    A crafted file of a few bytes could otherwise claim a config that makes us allocate terabytes:
    the model built from a file that passes is at most ~13x the file's own size. Exact names and
    shapes are then checked by `load_state_dict`.
    """
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise SmallGPTError(f"{weights} is not a readable safetensors file ({exc})") from None
    if stored < least_parameters(config):
        raise SmallGPTError(
            f"weights in {weights} do not match their config: it needs at least "
            f"{least_parameters(config):,} parameters, the file holds {stored:,}"
        )


def load_state(model: GPT, weights: Path) -> None:
    """Copy a checked weights file into `model`; names and shapes must match exactly."""
    try:
        model.load_state_dict(read_weights(weights, next(model.parameters()).device))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()  # the first line only says "Error(s) in..."
        raise SmallGPTError(f"weights in {weights} do not match their config: {detail}") from None


def read_weights(weights: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A weights file's tensors; a head stored only as the embedding (tied, GPT-2) is tied again."""
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise SmallGPTError(f"cannot read weights from {weights} ({exc})") from None
    if "transformer.wte.weight" in state and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def load_weights_into(model: GPT, weights: Path) -> None:
    """Copy a weights file into `model`, refusing one whose tensors do not fit it."""
    check_weights_fit(weights, model.config)
    load_state(model, weights)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Build a GPT from a checkpoint (see `resolve_weights`) with its saved config, in eval mode."""
    weights = resolve_weights(path)
    config = read_model_config(weights)
    check_weights_fit(weights, config)  # before building: a tiny file cannot demand a huge model
    model = GPT(config).to(device)
    load_state(model, weights)
    return model.eval()


# --- training checkpoints: weights + everything needed to continue exactly ---


def check_run_dir(out_dir: Path, checkpoint_bytes: int) -> None:
    """Fail before training, not at the first checkpoint: the directory must be writable and roomy."""
    make_dir(out_dir, "run directory")
    try:
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise SmallGPTError(f"cannot write to run directory {out_dir}: {os_reason(exc)}") from None
    free = shutil.disk_usage(out_dir).free
    if free < 2 * checkpoint_bytes:  # a new checkpoint is written whole before an old one goes
        raise SmallGPTError(
            f"not enough disk space in {out_dir}: {free / 1e6:,.0f} MB free, checkpoints need "
            f"{2 * checkpoint_bytes / 1e6:,.0f} MB"
        )


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has in all (RAM for the CPU), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_memory(config: ModelConfig, micro_batch_size: int, device: torch.device) -> None:
    """Fail in one line, before allocating, when training `config` cannot possibly fit the device.

    A lower bound only: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter), and
    the residual stream each layer keeps for backward (4 bytes per value).
    """
    total = device_memory(device)
    parameters = least_parameters(config)
    activations = micro_batch_size * config.block_size * config.n_embd * config.n_layer
    needed = 16 * parameters + 4 * activations
    if total is not None and needed > total:
        raise SmallGPTError(
            f"training this model needs at least {needed / 2**30:,.1f} GiB (over {parameters:,} parameters "
            f"x 16 bytes for weights, gradients and AdamW moments, plus activations), but {device} has "
            f"{total / 2**30:,.1f} GiB: choose a smaller model or micro_batch_size"
        )


def save_checkpoint(directory: Path, model: GPT, trainer_state: dict, state: dict) -> None:
    """Atomically write weights, `trainer_state` (tensors: optimizer, scaler) and `state` (JSON)."""

    def write(tmp: Path) -> None:
        save_weights(model, tmp / WEIGHTS_NAME)
        with open(tmp / TRAINER_NAME, "wb") as file:  # a Python file: a full disk surfaces as its OSError
            torch.save(trainer_state, file)
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
        reason = first_line(exc)[:200]
        raise SmallGPTError(f"checkpoint {directory} is damaged or truncated ({reason})") from None
    read_model_config(directory / WEIGHTS_NAME)  # refuses a truncated or foreign weights file early
    if not _well_formed(state) or not isinstance(trainer_state, dict):
        raise SmallGPTError(
            f"checkpoint {directory} is damaged: its state.json or {TRAINER_NAME} is malformed"
        )
    return state, trainer_state


def _well_formed(state) -> bool:
    """state.json holds a step, a config, and the sampler's position, each of the right type."""
    counters = ("seed", "calls", "world_size")
    return (
        isinstance(state, dict)
        and type(state.get("step")) is int
        and state["step"] >= 0
        and isinstance(state.get("config"), dict)
        and isinstance(state.get("sampler"), dict)
        and all(type(state["sampler"].get(key)) is int and state["sampler"][key] >= 0 for key in counters)
        and state["sampler"]["world_size"] >= 1
        and (state.get("best_val_loss") is None or type(state["best_val_loss"]) in (int, float))
    )


def saved_best_loss(run_dir: Path) -> float:
    """The validation loss of the weights in `run_dir/best/` (infinity when there are none)."""
    try:
        loss = json.loads((run_dir / "best" / STATE_NAME).read_text())["val_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf
    return loss if type(loss) is float else math.inf


@dataclass(frozen=True)
class RunStart:
    """Where a run's weights and counters come from: nothing (a new run), the newest step checkpoint
    of its run dir (`--resume`, read once here), or a weights file (`--init-from`).

    `smallgpt.runs` decides which from the command line; `Trainer` applies it.
    """

    checkpoint: Path | None = None  # --resume: the step checkpoint continued...
    state: dict | None = None  # ...its state.json (step, config, sampler, data, best loss)...
    trainer_state: dict | None = None  # ...and its trainer.pt (optimizer, gradient scaler)
    weights: Path | None = None  # --init-from: the weights file the new run starts from

    @classmethod
    def resume(cls, run_dir: str | Path) -> RunStart:
        checkpoints = step_checkpoints(Path(run_dir))
        if not checkpoints:
            raise SmallGPTError(f"nothing to resume in {run_dir}: it has no checkpoints")
        state, trainer_state = load_checkpoint(checkpoints[-1])
        return cls(checkpoints[-1], state, trainer_state)

    @classmethod
    def init_from(cls, source: str | Path) -> RunStart:
        return cls(weights=resolve_weights(source))

    @property
    def resumes(self) -> bool:
        return self.checkpoint is not None


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's step checkpoints, oldest first (hidden half-written temporaries are not listed)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())


def prune_checkpoints(run_dir: Path, keep: int) -> bool:
    """Delete all but the newest `keep` step checkpoints, and temporaries left by a killed run;
    says whether there was a checkpoint to delete."""
    pruned = step_checkpoints(run_dir)[:-keep]
    for old in pruned:
        shutil.rmtree(old, ignore_errors=True)
    remove_temporaries(run_dir / "checkpoints")
    return bool(pruned)
