"""The GPT-2 architecture, top to bottom: attention -> MLP -> block -> GPT.

    tokens (B, T)
      -> token embedding + learned position embedding      (B, T, C)
      -> n_layer x Block:  x = x + Attention(LayerNorm(x))
                           x = x + MLP(LayerNorm(x))        ("pre-LayerNorm" residual blocks)
      -> final LayerNorm -> linear head tied to the token embedding -> logits (B, T, vocab)

Parameter names match Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn`, ...) except
that our Linear layers store weights as (out, in) where GPT-2's Conv1D stores (in, out); the interop
module transposes those on the way in and out.

Generation uses the same layers through `GPT.forward_cached`, which hands every layer's keys and values
to a KV cache (`smallgpt.kvcache`) so that each new token costs one position's work instead of the
whole context.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.config import ModelConfig
from smallgpt.loss import linear_cross_entropy


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # One matmul produces queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends independently.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(head_dim) + causal mask) v, through PyTorch's fused kernels
        # (FlashAttention / memory-efficient attention where the device has them).
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:  # generating: the cache stores this step's keys/values and attends over what it holds
            y = cache.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU (GPT-2's tanh approximation), project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer layer. Normalising *before* each sub-layer keeps the residual path clean."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The decoder-only language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying: the head that scores tokens is the embedding that represents them.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of layers that write into the residual stream by 1/sqrt(2 * n_layer),
        # since each of the 2 * n_layer sub-layers adds to it and the variance would otherwise grow.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm output (B, T, C) for token ids (B, T)."""
        T = idx.shape[1]
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        positions = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
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
        self, idx: torch.Tensor, positions: torch.Tensor, cache, last_only: bool = True
    ) -> torch.Tensor:
        """Logits after tokens `idx` (B, T) at `positions` (B, T), keys and values going to `cache`.

        `cache.layers[i].attend(q, k, v)` stores layer i's new keys/values and returns its attention
        output (see `smallgpt.kvcache`). Returns (B, vocab) for the last position only, all that
        sampling needs, or (B, T, vocab) for every position (to score a prompt). Pure tensor work, so
        a decode step can be captured in a CUDA graph.
        """
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for block, layer_cache in zip(self.transformer.h, cache.layers, strict=True):
            x = block(x, layer_cache)
        x = self.transformer.ln_f(x[:, -1] if last_only else x)
        return self.lm_head(x)[..., : self.config.vocab_size]

    # --- bookkeeping used by the CLI, training and benchmarks ---

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the token embedding, as the seed counted (~10.7M).

        The head is tied to the token embedding, so it is counted once, as part of the embedding.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wte.weight.numel()
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
