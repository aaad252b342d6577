"""Typed configuration: the model's shape, named presets, and `key=value` overrides.

A config is a frozen dataclass so it can be saved next to the weights, compared when a checkpoint is
loaded, and printed. Presets are plain instances; overrides go through `with_overrides`, which converts
command-line strings. Every config checks its own fields' types and values when it is created (from
a preset, a TOML file, a checkpoint's metadata or the command line alike), so a typo or a crafted
file fails in one line instead of deep inside PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from smallgpt.architectures import ARCHITECTURES, Architecture
from smallgpt.errors import SmallGPTError

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
MAX_LAYERS, MAX_WIDTH, MAX_ROWS = 4096, 2**20, 2**31  # sizes refused as absurd (see __post_init__)
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: what numpy, torch and JSON all accept


def check_seed(name: str, seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise SmallGPTError(f"{name} must be in [0, 2**63), not {seed}")


def check_field_types(config: Any) -> None:
    """Refuse a dataclass field whose value is not of its declared type, whatever its source.

    bool is not accepted for int (True is an int to Python, never a layer count to a user); an int
    is accepted for a float field and stored as one; floats must be finite.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in allowed:
            continue
        target = next(t for t in allowed if t is not type(None))
        if target is float and type(value) is int:
            value = float(value)
            object.__setattr__(config, field.name, value)  # frozen: this is construction
        if type(value) is not target:
            raise SmallGPTError(
                f"bad value for {field.name}: {value!r} is {type(value).__name__}, not {target.__name__}"
            )
        if target is float and not math.isfinite(value):
            raise SmallGPTError(f"bad value for {field.name}: {value} is not a finite number")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder. Field names follow GPT-2 so the mapping stays obvious.

    `arch` names a row of `smallgpt.architectures.ARCHITECTURES`, the layout of the blocks: "gpt2", the
    seed's, or "qwen3" (RoPE, RMSNorm, QK-norm, SwiGLU, untied head), transformers' `Qwen3ForCausalLM`.
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 256  # context length: the most tokens the model attends over
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    # Round the embedding/head rows up to a multiple of this for faster matmuls. The extra rows are
    # never a valid token: the model slices them off its logits, so results do not change. 1 = off.
    vocab_multiple: int = 64
    arch: str = "gpt2"

    def __post_init__(self) -> None:
        check_field_types(self)
        checks = [
            (self.vocab_size >= 1, "vocab_size must be at least 1"),
            (self.block_size >= 1, "block_size must be at least 1"),
            (self.n_layer >= 1, "n_layer must be at least 1"),
            (self.n_head >= 1, "n_head must be at least 1"),
            (self.n_embd >= 1, "n_embd must be at least 1"),
            (self.vocab_multiple >= 1, "vocab_multiple must be at least 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            # Far beyond any real model, and what keeps every tensor size within int64 and every
            # model buildable (on the meta device, for counting) in reasonable time.
            (self.n_layer <= MAX_LAYERS, f"n_layer must be at most {MAX_LAYERS:,}"),
            (self.n_embd <= MAX_WIDTH, f"n_embd must be at most {MAX_WIDTH:,}"),
            (max(self.vocab_size, self.block_size, self.vocab_multiple) <= MAX_ROWS,
             f"vocab_size, block_size and vocab_multiple must be at most {MAX_ROWS:,}"),
            (self.arch in ARCHITECTURES, f"arch must be one of {', '.join(ARCHITECTURES)}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise SmallGPTError(f"bad model config: {message}")
        if self.n_embd % self.n_head:
            raise SmallGPTError(
                f"bad model config: n_head={self.n_head} does not divide n_embd={self.n_embd}"
            )

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def architecture(self) -> Architecture:
        """The features of `arch` (positions, norms, MLP, head...), which the model is built from."""
        return ARCHITECTURES[self.arch]

    @property
    def ffn_hidden(self) -> int:
        """The MLP's hidden width for this model width (see `Architecture.mlp_width`)."""
        return self.architecture.mlp_width(self.n_embd)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        if not isinstance(values, dict):
            raise SmallGPTError(f"a model config must be a table of fields, not {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SmallGPTError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # Small enough to train visibly in minutes on a 2-core CPU; used by the quick start and tests.
    "tiny": ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    # The seed: ~10.7M non-embedding parameters.
    "smallgpt-10m": ModelConfig(),
    # The upper end of the seed's 10M-26M range.
    "smallgpt-26m": ModelConfig(n_layer=8, n_head=8, n_embd=512),
    # The modern recipe's shapes (Qwen3 layout): tiny's and the seed's layers, width and context.
    "tiny-modern": ModelConfig(
        block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False, arch="qwen3"
    ),
    "smallgpt-10m-modern": ModelConfig(dropout=0.0, bias=False, arch="qwen3"),
    # OpenAI's GPT-2 small, for importing its weights.
    "gpt2-124m": ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0),
}

# What `smallgpt train` trains and `smallgpt model` shows with no --preset: the modern recipe, which
# reaches a far lower loss than `tiny` in the same minutes on a CPU (benchmarks/RESULTS.md).
DEFAULT_PRESET = "tiny-modern"


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise SmallGPTError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Turn ['n_layer=8', 'dropout=0'] into {'n_layer': '8', 'dropout': '0'}."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SmallGPTError(f"bad override {pair!r}: expected key=value")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


Config = TypeVar("Config")


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of a dataclass config with fields replaced; string values are converted to the field type."""
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise SmallGPTError(f"unknown config field {key!r}; known fields: {', '.join(fields)}")
        changes[key] = _convert(key, value, hints[key])
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def _convert(key: str, value: Any, hint: Any) -> Any:
    """A command-line string as the field's type; other values are checked by the config itself."""
    if not isinstance(value, str):
        return value
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in allowed and value.lower() in ("none", "null", ""):
        return None
    target = next(t for t in allowed if t is not type(None))
    if target is bool:
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SmallGPTError(f"bad value for {key}: {value!r} is not a boolean")
    try:
        return target(value)
    except (TypeError, ValueError):
        raise SmallGPTError(
            f"bad value for {key}: {value!r} is not {getattr(target, '__name__', target)}"
        ) from None
