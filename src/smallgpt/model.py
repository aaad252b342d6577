"""Decoder architectures on one skeleton, top to bottom: attention -> MLP -> block -> GPT.

    tokens (B, T)
      -> token embedding (+ learned position embedding, if positions are learned)   (B, T, C)
      -> n_layer x Block:  x = x + Attention(Norm(x))
                           x = x + MLP(Norm(x))          ("pre-norm" residual blocks)
      -> final Norm -> linear head -> logits (B, T, vocab)

Where architectures differ (positions, norm, QK-norm, fused q|k|v, MLP, tied head, init), the layers
read a feature of `config.architecture`, a row of `smallgpt.architectures.ARCHITECTURES` (GPT-2's and
Qwen3's layouts today); no layer asks which architecture it is. Parameter names follow Hugging Face's
`GPT2LMHeadModel` (`transformer.h.0.attn.c_attn`, ...) for every architecture; the interop modules
rename them to `Qwen3ForCausalLM`'s on the way out. Our Linear layers store weights
as (out, in); GPT-2's Conv1D stores (in, out), which interop transposes.

Generation uses the same layers through `GPT.forward_cached`, which hands every layer's keys and values
to a KV cache (`smallgpt.kvcache`) so that each new token costs one position's work instead of the
whole context.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.config import ModelConfig
from smallgpt.loss import linear_cross_entropy

# Which logits `GPT.forward_cached` returns: after the last token, after every token, or none.
CachedLogits = Literal["last", "all", "none"]


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` computed in its input's dtype: x / rms(x) * weight.

    Under bf16 autocast the QK-norm's inputs are bf16 projections while its gain is an fp32 master
    weight; PyTorch's fused kernel needs the two alike (otherwise a slow unfused path and a warning on
    every run), so the gain meets the input's dtype. Its gradient still reaches the fp32 weight.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """The normalisation layer: LayerNorm, or RMSNorm, which only rescales (no mean, no bias)."""
    arch = config.architecture
    if arch.norm == "rmsnorm":
        return RMSNorm(dim, eps=arch.norm_eps)
    return nn.LayerNorm(dim, eps=arch.norm_eps, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding: rotate each (i, i + D/2) pair of q and k by angle position * f_i.

    A query at position m and a key at position n then score q R(m)^T R(n) k = q R(n - m) k: attention
    sees only the distance between tokens. Frequencies f_i = theta^(-2i/D), as in Llama and Qwen.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # a constant, not a weight

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (..., T, head_dim) for integer positions (..., T)."""
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, n_head, T, D) rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per pair."""
    cos, sin = (t.unsqueeze(-3) if t.dim() == 3 else t for t in rope)  # per-row positions: add heads
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # One matmul can produce queries, keys and values for all heads at once (GPT-2); three
        # matrices suit Muon, which orthogonalises each update matrix: q, k, v are separate maps.
        C, arch = config.n_embd, config.architecture
        self.fused_qkv = arch.fused_qkv
        if self.fused_qkv:
            self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(C, C, bias=config.bias) for _ in range(3))
        self.qk_norm = arch.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, eps=arch.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, eps=arch.norm_eps)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The dtype attention computes in while gradients are on, whatever autocast picks (None: the
        # inputs'): set by training where a measurement found it faster (`GPT.train_attention_in`).
        self.grad_dtype: torch.dtype | None = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys, values (B, T, n_head, head_dim); with QK-norm each q and k head RMS-normalised."""
        B, T, C = x.shape
        if self.fused_qkv:
            q, k, v = (t.view(B, T, self.n_head, -1) for t in self.c_attn(x).split(C, dim=2))
        else:
            q, k, v = (p(x).view(B, T, self.n_head, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, n_head, head_dim) -> (B, n_head, T, head_dim): each head attends independently.
        q, k, v = (t.transpose(1, 2) for t in self.project(x))
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        # softmax(q k^T / sqrt(head_dim) + causal mask) v, through PyTorch's fused kernels
        # (FlashAttention / memory-efficient attention where the device has them).
        # Generating, the cache stores this step's keys/values and attends over all it holds.
        y = self.attend(q, k, v) if cache is None else cache.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if self.grad_dtype is None or not torch.is_grad_enabled():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = (t.to(self.grad_dtype) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)


class MLP(nn.Module):
    """The position-wise feed-forward of GPT-2: expand 4x, GELU (tanh approximation), project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """The gated feed-forward of Llama and Qwen: a SiLU gate multiplies a second projection, then back to C.

    Three matrices instead of two, so the hidden width is ~8/3 C for the parameters of a 4x MLP.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


MLPS = {"gelu": MLP, "swiglu": SwiGLU}  # Architecture.mlp -> the layer


class Block(nn.Module):
    """One transformer layer. Normalising *before* each sub-layer keeps the residual path clean."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLPS[config.architecture.mlp](config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The decoder-only language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        arch = config.architecture
        # Positions enter as a learned vector each, or as rotations of queries and keys (`Rotary`).
        learned = arch.positions == "learned"
        wpe = nn.Embedding(config.block_size, config.n_embd) if learned else None
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                **({"wpe": wpe} if wpe is not None else {}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=make_norm(config, config.n_embd),
            )
        )
        self.rotary = None if learned else Rotary(config.head_dim, arch.rope_theta)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if arch.tied_head:
            # Weight tying: the head that scores tokens is the embedding that represents them.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if not name.endswith("c_proj.weight"):
                continue
            if arch.zero_init_outputs:
                # Layers that write into the residual stream start at zero: each block begins as the
                # identity and grows into its role (as in modded-nanogpt); Muon's first update is full-rank.
                nn.init.zeros_(param)
            else:
                # GPT-2: scale their init by 1/sqrt(2 * n_layer), since each of the 2 * n_layer
                # sub-layers adds to the residual stream and its variance would otherwise grow.
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if arch.zero_init_outputs and not arch.tied_head:
            nn.init.zeros_(self.lm_head.weight)  # a uniform first guess; the head learns from there
        if arch.fan_in_init:
            self._init_fan_in()

    @torch.no_grad()
    def _init_fan_in(self) -> None:
        """nanochat's scales (see `Architecture.fan_in_init`); outputs that start at zero stay zero."""
        for name, module in self.transformer.h.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("c_proj"):
                nn.init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
        for block in self.transformer.h:
            if block.attn.qk_norm:
                nn.init.constant_(block.attn.q_norm.weight, 1.2)
                nn.init.constant_(block.attn.k_norm.weight, 1.2)
        if self.config.architecture.embedding_norm:  # its scale is free: large rows, small AdamW steps
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        if not self.config.architecture.tied_head:  # not quite zero: blocks get a gradient at step 1
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor):
        """Token vectors (B, T, C), and the rotary angles attention needs (None for learned positions).

        Positions enter here and only here: added as learned vectors, or as rotations of each
        layer's queries and keys.
        """
        x = self.transformer.wte(idx)
        if self.config.architecture.embedding_norm:
            x = self.normalise_embedding(x)
        if self.rotary is None:
            return self.transformer.drop(x + self.transformer.wpe(positions)), None
        return self.transformer.drop(x), self.rotary(positions)

    def normalise_embedding(self, rows: torch.Tensor) -> torch.Tensor:
        """Each embedding row divided by its root mean square (no gain): `embedding_norm`."""
        return F.rms_norm(rows, (rows.size(-1),), eps=self.config.architecture.norm_eps)

    def standard_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the same function without the layers export folds away (`FOLDED_AT_EXPORT`).

        An embedding norm depends on the token's row alone, so normalising the table's rows once gives
        a table that plain Qwen3 (or llama.cpp) looks up to the same vectors.
        """
        state = self.state_dict()
        if self.config.architecture.embedding_norm:
            with torch.no_grad():
                state["transformer.wte.weight"] = self.normalise_embedding(state["transformer.wte.weight"])
        return state

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm output (B, T, C) for token ids (B, T)."""
        T = idx.shape[1]
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x, rope = self.embed(idx, torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x, rope)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for `idx`; or, given `targets`, the mean next-token loss.

        The loss path never builds the full logits tensor (see `smallgpt.loss`); targets equal to
        -1 are ignored.
        """
        hidden = self.hidden_states(idx)
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, self.config.vocab_size)
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward_cached(
        self, idx: torch.Tensor, positions: torch.Tensor, cache, logits: CachedLogits = "last"
    ) -> torch.Tensor | None:
        """Logits after tokens `idx` (B, T) at `positions` (B, T), keys and values going to `cache`.

        `cache.layers[i].attend(q, k, v)` stores layer i's new keys/values and returns its attention
        output (see `smallgpt.kvcache`). Returns (B, vocab) for the "last" position only, all that
        sampling needs, (B, T, vocab) for "all" positions (to score a prompt), or None: only the cache
        is filled, and the head, a small model's largest matmul, is skipped. Pure tensor work, so a
        decode step can be captured in a CUDA graph.
        """
        x, rope = self.embed(idx, positions)
        for block, layer_cache in zip(self.transformer.h, cache.layers, strict=True):
            x = block(x, rope, layer_cache)
        if logits == "none":
            return None
        x = self.transformer.ln_f(x[:, -1] if logits == "last" else x)
        return self.lm_head(x)[..., : self.config.vocab_size]

    def train_attention_in(self, dtype: torch.dtype | None) -> None:
        """Attention forward + backward in `dtype` whatever autocast picks (None: autocast's choice).
        Training sets it where `smallgpt.precision` measured it faster; generation and evaluation
        (no gradients) keep autocast's."""
        for block in self.transformer.h:
            block.attn.grad_dtype = dtype

    # --- bookkeeping used by the CLI, training and benchmarks ---

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the vocabulary matrices, as the seed counted (~10.7M).

        A tied head is the token embedding, so it is counted once; an untied head is left out of the
        non-embedding count like the embedding, so the two architectures compare by their blocks.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wte.weight.numel()
            if not self.config.architecture.tied_head:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), head and attention included.

        Each matmul weight costs one multiply-add (2 FLOPs) per token: the blocks and the head, not
        the embedding lookups. Attention scores and the weighted sum add 2 * 2 * n_layer * T * C for a
        full context of T positions (counted in full, as is conventional). ~187 MFLOP for smallgpt-10m.
        """
        cfg = self.config
        matmul_weights = sum(p.numel() for p in self.transformer.h.parameters() if p.dim() == 2)
        dense = matmul_weights + cfg.padded_vocab_size * cfg.n_embd
        attention = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd
        return 3 * (2 * dense + 2 * attention)
