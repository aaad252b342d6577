"""What a training run is: the training recipe (`TrainConfig`), presets, config files and overrides.

A run is fully described by a `RunConfig`: the model's shape (`smallgpt.config.ModelConfig`) and the
recipe below, whose defaults are the seed's (smallgpt-10m: 5000 updates of 8,192 tokens, AdamW 3e-4,
cosine decay); the `-modern` presets train with Muon and a warm-up/constant/decay schedule instead.
Precedence, lowest first: preset -> TOML file -> `key=value` overrides. Every checkpoint
stores its RunConfig, so `--resume` and `smallgpt eval` need nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smallgpt.config import (
    DEFAULT_PRESET,
    ModelConfig,
    check_field_types,
    check_seed,
    get_preset,
    with_overrides,
)
from smallgpt.distributed import DTYPES
from smallgpt.errors import SmallGPTError
from smallgpt.loader import SAMPLERS
from smallgpt.optim import OPTIMIZERS, SCHEDULES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. The defaults are the seed's recipe (`--preset smallgpt-10m`)."""

    max_iters: int = 5000  # optimizer updates
    batch_size: int = 32  # sequences per update, all processes together (x 256 tokens = 8,192)
    micro_batch_size: int = 8  # sequences per forward/backward; the rest of the update is accumulated
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest
    learning_rate: float = 3e-4  # AdamW's peak, reached at the end of warm-up
    muon_lr: float = 0.02  # Muon's peak (optimizer=muon only)
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update (fewer: cheaper, less orthogonal)
    # The token embedding's AdamW peak (muon only; a head tied to it shares it); None = learning_rate
    embedding_lr: float | None = None
    head_lr: float | None = None  # an untied head's AdamW peak (muon only); None = learning_rate
    embedding_beta2: float | None = None  # the embedding's AdamW beta2 (muon only); None = beta2
    # Muon's momentum: start -> peak over the warm-up updates, then (wsd) -> end over the decay
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.95
    muon_momentum_end: float = 0.95
    muon_momentum_warmup: int = 0
    min_lr: float = 3e-5  # the floor the schedule decays to (AdamW's; Muon's is in proportion)
    schedule: str = "cosine"  # cosine: warm-up, cosine decay; wsd: warm-up, constant, linear decay
    decay_fraction: float = 0.5  # wsd: the share of the updates spent decaying
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # updates until the floor is reached; 0 = max_iters
    weight_decay: float = 0.1  # on matrices (dim >= 2) only, never biases or norms; Muon's too
    beta1: float = 0.9
    beta2: float = 0.95
    # AdamW's epsilon: steps shrink for gradients not far above it (the head's rows of rare tokens)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # largest global gradient norm; 0 = no clipping
    eval_interval: int = 250  # updates between validation estimates and checkpoints
    eval_iters: int = 20  # batches per validation estimate
    log_interval: int = 10  # updates between progress/metrics records (the only device syncs)
    keep_last: int = 3  # step checkpoints kept besides best/
    seed: int = 1337
    # Training windows: random (each drawn anywhere, independently) or epochs (every non-overlapping
    # window once per epoch, shuffled: smallgpt.loader.EpochBatches)
    sampling: str = "random"
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps
    # auto: bf16, or fp16 + gradient scaling, on CUDA; on a CPU bf16 where it measures faster
    # (smallgpt.precision), else fp32; fp32 on MPS. Or a name: float32, bfloat16, float16.
    dtype: str = "auto"
    compile: bool | None = None  # torch.compile the model; None = on CUDA only (CPU: slow to start)
    fused_loss: bool = True  # chunked linear + cross-entropy (smallgpt.loss) instead of full logits
    sample_tokens: int = 200  # tokens of generated text printed at the end; 0 = none
    # Tokens the final validation pass scores (from the start of the split); None = all, 0 = skip it.
    final_eval_tokens: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        check_seed("seed", self.seed)
        checks = [
            (self.max_iters >= 1, "max_iters must be at least 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be at least 1"),
            (self.batch_size >= 1 and self.batch_size % max(self.micro_batch_size, 1) == 0,
             f"batch_size {self.batch_size} must be a positive multiple of micro_batch_size "
             f"{self.micro_batch_size}"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be > 0"),
            (self.muon_lr > 0 and math.isfinite(self.muon_lr), "muon_lr must be > 0"),
            (1 <= self.muon_ns_steps <= 20, "muon_ns_steps must be in [1, 20]"),
            (self.embedding_lr is None or self.embedding_lr > 0, "embedding_lr must be > 0 (or none)"),
            (self.head_lr is None or self.head_lr > 0, "head_lr must be > 0 (or none)"),
            (self.embedding_beta2 is None or 0 <= self.embedding_beta2 < 1,
             "embedding_beta2 must be in [0, 1) (or none)"),
            (all(0 <= m < 1 for m in (self.muon_momentum, self.muon_momentum_start, self.muon_momentum_end)),
             "muon_momentum, muon_momentum_start and muon_momentum_end must be in [0, 1)"),
            (self.muon_momentum_warmup >= 0, "muon_momentum_warmup must be >= 0"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.sampling in SAMPLERS, f"sampling must be one of {', '.join(SAMPLERS)}"),
            (0 < self.decay_fraction <= 1, "decay_fraction must be in (0, 1]"),
            (0 <= self.min_lr <= self.learning_rate, "min_lr must be in [0, learning_rate]"),
            (self.warmup_iters >= 0 and self.lr_decay_iters >= 0, "warmup/decay iters must be >= 0"),
            (self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (0 < self.adam_eps < 1, "adam_eps must be in (0, 1)"),
            (min(self.eval_interval, self.eval_iters, self.log_interval, self.keep_last) >= 1,
             "eval_interval, eval_iters, log_interval and keep_last must be at least 1"),
            (self.dtype in ("auto", *DTYPES), f"dtype must be auto or one of {', '.join(DTYPES)}"),
            (self.sample_tokens >= 0, "sample_tokens must be >= 0"),
            (self.final_eval_tokens is None or self.final_eval_tokens >= 0,
             "final_eval_tokens must be >= 0 (0 = skip the final pass) or none (the whole split)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise SmallGPTError(f"bad training config: {message}")


# Presets that have their own recipe; every other model preset trains with the seed's defaults.
TRAIN_PRESETS = {
    # ~3 minutes on a 2-core CPU: loss from 10.8 to ~6, text with English words and punctuation.
    "tiny": TrainConfig(
        max_iters=200, batch_size=8, micro_batch_size=8, learning_rate=3e-3, min_lr=3e-4,
        warmup_iters=10, eval_interval=50, eval_iters=4, log_interval=10,
    ),
}  # fmt: skip
# The modern recipe (Muon + AdamW, warm-up/constant/linear decay to zero over the last half); rates
# from the sweeps in benchmarks/RESULTS.md. Same tokens per update and the same evaluation cadence as
# their seed twins. nanochat's schedules (`head_lr`, `embedding_beta2`, Muon's momentum schedule, a 5%
# floor) are knobs, not defaults: they helped at 0.2M tokens and lost at 0.6M (RESULTS, "Recipe,
# issue 22"). Issue 22's third pass ("Recipe, issue 22 (third pass)") added AdamW with a short memory
# of the gradient and a long one of its square (beta1 0.6, beta2 0.99: the embedding, the head and the
# norm gains), an epsilon of 1e-5 that damps the tiny gradients of rarely seen tokens' rows, Muon's
# momentum 0.9, and training windows that visit the corpus evenly (`sampling=epochs`): 0.13 nats at
# tiny-modern's 0.2M tokens, 0.18 at 0.6M, 0.31 at 2M, and 0.14 at the seed's shape (a short run on
# mixcorpus, "Issue 22 point 3").
MODERN = dict(
    optimizer="muon",
    schedule="wsd",
    muon_lr=0.04,
    learning_rate=0.012,
    embedding_lr=0.4,  # rows of the embedding see few updates each: they want a far larger step
    min_lr=0.0,
    beta1=0.6,
    beta2=0.99,
    adam_eps=1e-5,
    muon_momentum=0.9,
    muon_momentum_start=0.9,
    muon_momentum_end=0.9,
    sampling="epochs",
    weight_decay=0.0,
    grad_clip=0.0,
)
# tiny-modern's rates, from issue 22's sweep at its shape (RESULTS, "Recipe, issue 22: the rates"): a
# quarter of the Muon step (an update RMS of 0.002, about nanochat's) and twice AdamW's rate for the
# head and the norm gains were 0.18 nats better at 0.2M tokens and 0.14 at 0.6M. The seed shape's
# rates were not swept again.
TINY_MODERN_RATES = dict(muon_lr=0.01, learning_rate=0.024)
TRAIN_PRESETS["tiny-modern"] = dataclasses.replace(TRAIN_PRESETS["tiny"], **{**MODERN, **TINY_MODERN_RATES})
TRAIN_PRESETS["smallgpt-10m-modern"] = TrainConfig(**MODERN)


@dataclass(frozen=True)
class RunConfig:
    """A run's full description: the model's shape and the training recipe (saved in every checkpoint)."""

    model: ModelConfig
    train: TrainConfig
    preset: str = "custom"  # the preset it started from; names the default run directory

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        if not isinstance(values.get("train"), dict) or not isinstance(values.get("preset", ""), str):
            raise SmallGPTError("a saved run config needs a [train] table and a preset name")
        model, train = (
            ModelConfig.from_dict(values.get("model")),
            with_overrides(TrainConfig(), values["train"]),
        )
        return cls(model, train, values.get("preset", "custom"))


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    base: RunConfig | None = None,
    model: ModelConfig | None = None,
) -> RunConfig:
    """Preset (default `DEFAULT_PRESET`) or `base`, then the TOML file's values, then the overrides.

    Keys go to the model or the training config by name (the two share none). A TOML file may hold
    `preset = "..."` and the keys at top level or under `[model]` / `[train]` tables. `model` replaces
    the preset's model shape: fine-tuning keeps the checkpoint's shape (and by default the seed's recipe).
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(Path(config_file).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SmallGPTError(f"cannot read config file {config_file}: {exc}") from None
        file_preset = values.pop("preset", None)
        if file_preset is not None and not isinstance(file_preset, str):
            raise SmallGPTError(f"{config_file}: preset must be a name in quotes, not {file_preset!r}")
        preset = preset or file_preset
        for table in ("model", "train"):
            section = values.pop(table, {})
            if not isinstance(section, dict):
                raise SmallGPTError(f"{config_file}: {table} must be a [{table}] table, not {section!r}")
            values.update(section)
    values.update(overrides or {})
    if base is None:
        name = preset or ("finetune" if model is not None else DEFAULT_PRESET)
        base = RunConfig(model or get_preset(name), TRAIN_PRESETS.get(name, TrainConfig()), name)
    elif preset is not None:
        raise SmallGPTError("a resumed run keeps its preset: drop --preset")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_values = {k: v for k, v in values.items() if k in model_fields}
    train_values = {k: v for k, v in values.items() if k not in model_fields}
    return RunConfig(
        with_overrides(base.model, model_values), with_overrides(base.train, train_values), base.preset
    )


def config_file_keys(config_file: str | Path | None) -> set[str]:
    """The settings a TOML config file sets, at top level or in its [model] / [train] tables."""
    if config_file is None:
        return set()
    values = tomllib.loads(Path(config_file).read_text())  # resolve_config has refused a bad file
    tables = [v for k, v in values.items() if k in ("model", "train") and isinstance(v, dict)]
    return set(values).union(*tables)


def require_same_shape(saved: ModelConfig, wanted: ModelConfig, where: Path) -> None:
    """Refuse weights of another architecture; dropout alone may differ (it has no weights)."""
    if dataclasses.replace(saved, dropout=wanted.dropout) != wanted:
        diffs = [
            f"{f.name}={getattr(saved, f.name)} (not {getattr(wanted, f.name)})"
            for f in dataclasses.fields(saved)
            if f.name != "dropout" and getattr(saved, f.name) != getattr(wanted, f.name)
        ]
        raise SmallGPTError(f"checkpoint {where} has an incompatible model config: {', '.join(diffs)}")
