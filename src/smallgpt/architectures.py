"""What an architecture is: a row of features, and the table of the architectures SmallGPT builds.

`smallgpt.model` builds a decoder from these features, `smallgpt.kvcache` asks whether positions are
relative, quantization and interop read them too; nothing compares an architecture's name. A new
architecture is one row in `ARCHITECTURES` plus one interop mapping module (see `smallgpt.interop`).

                 gpt2 (2019, the seed's)               qwen3 (Qwen3ForCausalLM's, as imported)
  positions      learned embedding, added to input     rotary (RoPE): queries/keys rotated by position
  norm           LayerNorm                             RMSNorm, and per-head RMSNorm on q, k (QK-norm)
  attention      one fused q|k|v matrix                three matrices (Muon orthogonalises each map)
  MLP            4x, GELU                              SwiGLU (gate * up, SiLU), ~8/3x
  head           tied to the token embedding           its own matrix
  init           N(0, 0.02), residual outputs scaled   residual outputs and head start at zero

qwen3-embnorm, the modern recipe's, is qwen3 plus what nanochat and modded-nanogpt train with and a
Qwen3 file can still hold: each token's embedding row RMS-normalised (no gain) before block 0, and
their initialisation (`fan_in_init`). Export applies the norm to the table's rows once
(`GPT.standard_state_dict`), so the file is a plain Qwen3 that computes the same function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Architecture:
    """The features that set one decoder layout apart; the shape (layers, width...) is `ModelConfig`'s."""

    name: str
    positions: Literal["learned", "rotary"]  # a learned vector per position, or RoPE in attention
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps: float
    qk_norm: bool  # RMS-normalise each head's queries and keys before they meet
    fused_qkv: bool  # one (3C, C) matrix for queries, keys and values instead of three (C, C)
    mlp: Literal["gelu", "swiglu"]  # GELU (tanh approximation) or SiLU-gated SwiGLU
    mlp_ratio: float  # the MLP's hidden width per unit of model width...
    mlp_multiple: int  # ...rounded to a multiple of this (fast matmul shapes)
    tied_head: bool  # the head that scores tokens is the token embedding
    zero_init_outputs: bool  # residual-stream writers (and an untied head) start at zero
    hf_model_type: str  # the Hugging Face `model_type` it exports as (the interop mapping's key)
    gguf_arch: str  # llama.cpp's `general.architecture` name for it
    rope_theta: float = 10_000.0  # RoPE base (rotary only): the slowest pair turns once per ~2*pi*theta
    # RMS-normalise each token's embedding (no gain) before block 0: the table's scale stops
    # mattering, so it can take large AdamW steps. A function of the row alone: export folds it in.
    embedding_norm: bool = False
    # nanochat's initialisation: matrices that read the stream N(0, 1/fan-in), the (normalised)
    # embedding N(0, 0.8), an untied head N(0, 0.001), QK-norm gains 1.2 (sharper attention at start)
    fan_in_init: bool = False

    @property
    def relative_positions(self) -> bool:
        """Whether attention sees only distances between tokens, not where they sit in the window:
        then a full KV cache can drop its oldest entry and keep going (see `smallgpt.kvcache`)."""
        return self.positions == "rotary"

    def mlp_width(self, n_embd: int) -> int:
        """The MLP's hidden width: 4C for GELU; ~8C/3 for SwiGLU's three matrices (as many parameters
        as a 4x MLP), rounded to a multiple of 64 (1024 for C = 384)."""
        multiple = self.mlp_multiple
        return max(multiple, round(self.mlp_ratio * n_embd / multiple) * multiple)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="gpt2",
            positions="learned",
            norm="layernorm",
            norm_eps=1e-5,
            qk_norm=False,
            fused_qkv=True,
            mlp="gelu",
            mlp_ratio=4.0,
            mlp_multiple=1,
            tied_head=True,
            zero_init_outputs=False,
            hf_model_type="gpt2",
            gguf_arch="gpt2",
        ),
        Architecture(
            name="qwen3",
            positions="rotary",
            norm="rmsnorm",
            norm_eps=1e-6,
            qk_norm=True,
            fused_qkv=False,
            mlp="swiglu",
            mlp_ratio=8 / 3,
            mlp_multiple=64,
            tied_head=False,
            zero_init_outputs=True,
            hf_model_type="qwen3",
            gguf_arch="qwen3",
        ),
    )
}
ARCHITECTURES["qwen3-embnorm"] = dataclasses.replace(
    ARCHITECTURES["qwen3"], name="qwen3-embnorm", embedding_norm=True, fan_in_init=True
)
# Features that never reach an exported file: initialisation, or layers `GPT.standard_state_dict`
# folds into the weights. Two rows equal but for these export as the same architecture.
FOLDED_AT_EXPORT = ("name", "embedding_norm", "fan_in_init")
