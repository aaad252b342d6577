"""Hugging Face GPT-2 interop: the exact mapping between `arch="gpt2"` models and `GPT2LMHeadModel`.

The two models are the same architecture with the same parameter names (SmallGPT's live under the
same `transformer.*` prefix). The differences are bookkeeping:
  - GPT-2 uses `Conv1D` layers whose weight is stored (in, out); our `nn.Linear` stores (out, in).
  - SmallGPT may pad the vocabulary rows of the embedding; GPT-2 has exactly `vocab_size` rows.
  - GPT-2 checkpoints carry non-parameter buffers (`attn.bias` causal masks) that we do not need, and
    OpenAI's own files were saved from the bare `GPT2Model`, without the `transformer.` prefix.
Files, guards and vocabulary checks are shared with the other formats in `smallgpt.interop`.
"""

from __future__ import annotations

import torch

from smallgpt.architectures import ARCHITECTURES
from smallgpt.config import GPT2_VOCAB_SIZE, ModelConfig
from smallgpt.errors import SmallGPTError
from smallgpt.tokenizer import EOT_ID

ARCH = ARCHITECTURES["gpt2"]

# Weights stored transposed by GPT-2's Conv1D layers.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers some GPT-2 files carry; they are constants, not weights.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")

# GPT-2 options that the architecture fixes: written on export, required on import. Each value is
# also GPT2Config's default, so an option missing from a config.json means the same thing.
FIXED_OPTIONS = {
    "activation_function": "gelu_new",  # GELU, tanh approximation
    "n_inner": None,  # MLP width 4 * n_embd
    "layer_norm_epsilon": ARCH.norm_eps,
    "scale_attn_weights": True,  # attention scores divided by sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,  # the output head is the token embedding
}


def hf_name(name: str) -> str:
    """`GPT2LMHeadModel`'s name for one of our parameters: the same, as SmallGPT keeps GPT-2's names."""
    return name


def config_from_hf(hf_config: dict, vocab_multiple: int = 64) -> ModelConfig:
    """A SmallGPT config for a GPT-2 `config.json` (as a dict); refuses GPT-2 variants we cannot run."""
    defaults = {
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": 1024,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
    }
    shape = {key: hf_config.get(key, default) for key, default in defaults.items()}
    for key, value in shape.items():
        if type(value) is not int:
            raise SmallGPTError(f"config.json has {key}={value!r}, expected a whole number")
    for key, fixed in FIXED_OPTIONS.items():
        value = hf_config.get(key, fixed)
        same = (
            value == fixed
            or (key == "activation_function" and value == "gelu_pytorch_tanh")  # the same function
            or (key == "n_inner" and value == 4 * shape["n_embd"])
        )
        if not same:
            raise SmallGPTError(
                f"SmallGPT cannot run this GPT-2 variant: {key}={value!r} (it needs {fixed!r})"
            )
    return ModelConfig(
        vocab_size=shape["vocab_size"],
        block_size=shape["n_positions"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        dropout=0.0,
        vocab_multiple=vocab_multiple,
        arch=ARCH.name,
    )


def hf_config_from(config: ModelConfig) -> dict:
    """The `config.json` of the `GPT2LMHeadModel` equal to `config`; refuses what GPT-2 cannot express."""
    if not config.bias:
        raise SmallGPTError(
            "cannot export to GPT-2: bias=False, but GPT-2 has biases in every Linear and LayerNorm"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": ARCH.hf_model_type,
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        **FIXED_OPTIONS,
        # Our one dropout rate sits where GPT-2 has three: embeddings, attention weights, residuals.
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "initializer_range": 0.02,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "use_cache": True,
        "dtype": "float32",
    }


def canonical_hf_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a GPT-2 file under `GPT2LMHeadModel`'s names, without the causal-mask buffers."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = f"transformer.{name}"
        state[name] = tensor
    return state


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a GPT-2 state dict onto SmallGPT parameter names, shapes and vocabulary padding."""
    state = {}
    for name, tensor in hf_state.items():
        if name == "lm_head.weight":
            continue  # the head is tied to wte
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
