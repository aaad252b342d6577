"""Hugging Face GPT-2 interop: the exact mapping between SmallGPT and `GPT2LMHeadModel` weights.

The two models are the same architecture with the same parameter names (SmallGPT's live under the
same `transformer.*` prefix). The differences are bookkeeping:
  - GPT-2 uses `Conv1D` layers whose weight is stored (in, out); our `nn.Linear` stores (out, in).
  - SmallGPT may pad the vocabulary rows of the embedding; GPT-2 has exactly `vocab_size` rows.
  - GPT-2 checkpoints carry non-parameter buffers (`attn.bias` causal masks) that we do not need.
"""

from __future__ import annotations

import torch

from smallgpt.config import ModelConfig

# Weights stored transposed by GPT-2's Conv1D layers.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf_config: dict, vocab_multiple: int = 64) -> ModelConfig:
    """A SmallGPT config for a GPT-2 `config.json` (as a dict)."""
    return ModelConfig(
        vocab_size=hf_config["vocab_size"],
        block_size=hf_config["n_positions"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=hf_config["n_embd"],
        dropout=0.0,
        vocab_multiple=vocab_multiple,
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a GPT-2 state dict onto SmallGPT parameter names, shapes and vocabulary padding."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers; the head is tied to wte
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    wte = state["transformer.wte.weight"]
    padding = config.padded_vocab_size - wte.shape[0]
    if padding:
        state["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(padding, wte.shape[1])])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_from_hf`: GPT-2 names, Conv1D layout, padding stripped, head untied."""
    hf_state = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        hf_state[name] = tensor.contiguous()
    hf_state["transformer.wte.weight"] = hf_state["transformer.wte.weight"][: config.vocab_size].contiguous()
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    return hf_state
