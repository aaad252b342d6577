"""The GPT-2 architecture, top to bottom: attention -> MLP -> block -> GPT.

    tokens (B, T)
      -> token embedding + learned position embedding      (B, T, C)
      -> n_layer x Block:  x = x + Attention(LayerNorm(x))
                           x = x + MLP(LayerNorm(x))        ("pre-LayerNorm" residual blocks)
      -> final LayerNorm -> linear head tied to the token embedding -> logits (B, T, vocab)

Parameter names match Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn`, ...) except
that our Linear layers store weights as (out, in) where GPT-2's Conv1D stores (in, out); the interop
module transposes those on the way in and out.

Generation uses the same layers through `GPT.forward_cached`, which keeps every layer's keys and values
in a preallocated `KVCache` so that each new token costs one position's work instead of the whole context.
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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
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
        else:  # decoding: attend over every cached position the mask allows, this step's included
            k, v = cache.store(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
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
        self, idx: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, vocab_size) after appending tokens `idx` (B, T) to `cache`.

        The new tokens take the cache's next T slots; `valid` (B, T) marks which of them are real
        (False = left padding, which no real token attends to and which takes no position). Only the
        last position goes through the head: it is the only one generation needs. Pure tensor work, so
        a decode step can be captured in a CUDA graph.
        """
        B, T = idx.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        # Per-row position ids count only real tokens, so a padded row sees 0, 1, 2... as it would alone.
        positions = cache.next_position[:, None] + valid.cumsum(1) - 1
        new_slots = cache.cursor + torch.arange(T, device=idx.device)
        cache.begin_step(new_slots, valid)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions.clamp(min=0))
        for block, layer_cache in zip(self.transformer.h, cache.layers, strict=True):
            x = block(x, layer_cache)
        cache.next_position += valid.sum(1)
        cache.cursor += T
        return self.lm_head(self.transformer.ln_f(x[:, -1]))[:, : self.config.vocab_size]

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


class KVCache:
    """Every layer's keys and values for the tokens seen so far, preallocated for the whole context.

    Storage is (n_layer, batch, n_head, block_size, head_dim) and never reallocated, so decode steps
    have static shapes. Rows share slot numbers: prompts of different lengths are left-padded to end
    at the same slot, `key_valid` (batch, block_size) says which slots hold real tokens, and
    `next_position` keeps each row's own position count. `cursor` (a 1-element tensor, so the update
    stays on the device) is the next free slot. When it reaches block_size the cache is full: positions
    are learned absolute embeddings, so sliding the window means recomputing it (see `smallgpt.generate`).
    """

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, config.block_size, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(config.block_size, device=device)
        self.mask = self.key_valid[:, None, None, :]  # replaced by `begin_step`
        self.new_slots = self.cursor
        self.layers = [LayerCache(self, i) for i in range(config.n_layer)]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reset(self) -> None:
        """Empty the cache in place (same storage, so captured CUDA graphs stay valid)."""
        self.key_valid.zero_()
        self.next_position.zero_()
        self.cursor.zero_()

    def begin_step(self, new_slots: torch.Tensor, valid: torch.Tensor) -> None:
        """Mark the slots this step writes and build its attention mask (batch, 1, T, block_size).

        A new token at slot s may attend to real tokens at slots <= s. Padding attends to itself only,
        which keeps its (unused) activations finite instead of a softmax over nothing.
        """
        self.key_valid.index_copy_(1, new_slots, valid)
        causal = self.slots[None, :] <= new_slots[:, None]  # (T, block_size)
        itself = self.slots[None, :] == new_slots[:, None]
        self.mask = ((causal & self.key_valid[:, None, :]) | itself)[:, None]
        self.new_slots = new_slots


class LayerCache:
    """One layer's view of a `KVCache`: stores this step's keys/values, hands back all slots."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache = cache
        self.keys = cache.keys[layer]
        self.values = cache.values[layer]

    @property
    def mask(self) -> torch.Tensor:
        return self.cache.mask

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.cache.new_slots, k)
        self.values.index_copy_(2, self.cache.new_slots, v)
        return self.keys, self.values
