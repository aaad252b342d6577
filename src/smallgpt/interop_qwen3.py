"""Hugging Face Qwen3 interop: the exact mapping between `arch="qwen3"` models and `Qwen3ForCausalLM`.

The layouts are the same (see `smallgpt.model`); the differences are names and bookkeeping:
  - parameter names: ours keep GPT-2's skeleton (`transformer.h.0.ln_1`), Qwen3's are Llama-style
    (`model.layers.0.input_layernorm`); `LAYER_NAMES` is the whole dictionary.
  - SmallGPT may pad the vocabulary rows of the embedding and the head; the export has exactly
    `vocab_size` rows, so no tool can ever sample a padding id.
  - Qwen3 can express more than we run (grouped-query attention, a head_dim unrelated to the width,
    a tied head, sliding windows...). Import refuses such variants with the option that differs.
Files, guards and vocabulary checks are shared with the other formats in `smallgpt.interop`.
"""

from __future__ import annotations

import re

import torch

from smallgpt.architectures import ARCHITECTURES
from smallgpt.config import ModelConfig
from smallgpt.errors import SmallGPTError
from smallgpt.tokenizer import EOT_ID

ARCH = ARCHITECTURES["qwen3"]

# Per-layer parameter names: ours (under transformer.h.N.) -> Qwen3's (under model.layers.N.).
LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
VOCAB_NAMES = ("transformer.wte.weight", "lm_head.weight")  # the rows padding applies to

# Qwen3 options our layout fixes: (our value, Qwen3Config's default). Export writes ours; import
# requires it, reading a missing option as the default.
FIXED_OPTIONS = {
    "hidden_act": ("silu", "silu"),
    "rms_norm_eps": (ARCH.norm_eps, 1e-6),
    "attention_bias": (False, False),
    "tie_word_embeddings": (False, False),
    "use_sliding_window": (False, False),
}


def hf_name(name: str) -> str:
    """`Qwen3ForCausalLM`'s name for one of our parameters."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    layer, rest = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name).groups()
    return f"model.layers.{layer}.{LAYER_NAMES[rest]}"


def hf_config_from(config: ModelConfig) -> dict:
    """The `config.json` of the `Qwen3ForCausalLM` equal to `config`; refuses what it cannot express."""
    if config.bias:
        raise SmallGPTError("cannot export to Qwen3: bias=True, but Qwen3's MLP and norms have no biases")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": ARCH.hf_model_type,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,  # every head has its own keys and values
        "head_dim": config.head_dim,
        **{key: ours for key, (ours, _) in FIXED_OPTIONS.items()},
        "rope_parameters": {"rope_type": "default", "rope_theta": ARCH.rope_theta},
        "attention_dropout": 0.0,  # dropout only acts in training; inference is the same either way
        "initializer_range": 0.02,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "use_cache": True,
        "dtype": "float32",
    }


def config_from_hf(hf_config: dict, vocab_multiple: int = 64) -> ModelConfig:
    """A SmallGPT config for a Qwen3 `config.json` (as a dict); refuses Qwen3 variants we cannot run."""
    shape = {}
    for key in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size"):  # fmt: skip
        shape[key] = value = hf_config.get(key)
        if type(value) is not int or value < 1:
            raise SmallGPTError(f"config.json has {key}={value!r}, expected a positive whole number")
    width, heads = shape["hidden_size"], shape["num_attention_heads"]
    if width % heads:
        raise SmallGPTError(f"config.json has hidden_size={width} not divisible by {heads} heads")
    config = ModelConfig(
        vocab_size=shape["vocab_size"],
        block_size=shape["max_position_embeddings"],
        n_layer=shape["num_hidden_layers"],
        n_head=heads,
        n_embd=width,
        dropout=0.0,
        bias=False,
        vocab_multiple=vocab_multiple,
        arch=ARCH.name,
    )
    # rope_theta sits in `rope_parameters` (transformers 5) or at top level (older files).
    options = {**hf_config, **(hf_config.get("rope_parameters") or {})}
    required = {
        "head_dim": (width // heads, width // heads),
        "num_key_value_heads": (heads, heads),
        "intermediate_size": (config.ffn_hidden, None),
        "rope_theta": (ARCH.rope_theta, ARCH.rope_theta),
        "rope_type": ("default", "default"),
        **FIXED_OPTIONS,
    }
    for key, (ours, default) in required.items():
        value = options.get(key, default)
        if value != ours:
            raise SmallGPTError(
                f"SmallGPT cannot run this Qwen3 variant: {key}={value!r} (it needs {ours!r})"
            )
    return config


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen3 names, vocabulary padding stripped."""
    return {
        hf_name(name): (tensor[: config.vocab_size] if name in VOCAB_NAMES else tensor).contiguous()
        for name, tensor in state.items()
    }


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_to_hf`: our names, vocabulary rows padded with zeros."""
    ours = {hf: name for name, hf in _names(config).items()}
    state = {}
    for hf, tensor in hf_state.items():
        name = ours[hf]
        padding = config.padded_vocab_size - tensor.shape[0] if name in VOCAB_NAMES else 0
        state[name] = torch.cat([tensor, tensor.new_zeros(padding, tensor.shape[1])]) if padding else tensor
    return state


def canonical_hf_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3 files already use `Qwen3ForCausalLM`'s names: nothing to rename or drop."""
    return dict(hf_state)


def _names(config: ModelConfig) -> dict[str, str]:
    layers = {f"transformer.h.{i}.{name}" for i in range(config.n_layer) for name in LAYER_NAMES}
    return {name: hf_name(name) for name in (*GLOBAL_NAMES, *sorted(layers))}
