"""The Qwen3 architecture against transformers' own `Qwen3ForCausalLM`, both ways, and its cached path."""

import dataclasses
import json
import re

import pytest
import torch

from smallgpt.architectures import ARCHITECTURES
from smallgpt.checkpoint import load_model, save_weights
from smallgpt.config import ModelConfig, get_preset
from smallgpt.errors import SmallGPTError
from smallgpt.interop import export_to_hf, import_from_hf
from smallgpt.kvcache import DecodeStep, KVPool
from smallgpt.model import GPT
from smallgpt.recipe import DEFAULT_PRESET

transformers = pytest.importorskip("transformers")

QWEN3 = dict(vocab_size=50257, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False)
QWEN3 = {**QWEN3, "arch": "qwen3"}


def hf_qwen3(seed: int = 0):
    """A random local Qwen3ForCausalLM of SmallGPT's Qwen3 layout (no download); norms randomised too."""
    torch.manual_seed(seed)
    config = ModelConfig(**QWEN3)
    hf_config = transformers.Qwen3Config(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.block_size,
        hidden_size=config.n_embd,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        head_dim=config.head_dim,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # RMSNorm gains start at 1: make them differ per channel
                param.add_(torch.randn_like(param) * 0.2)
    return model


def random_qwen3_smallgpt(config: ModelConfig | None = None) -> GPT:
    """A SmallGPT Qwen3 with every parameter random (zero-initialised head and projections otherwise)."""
    torch.manual_seed(0)
    model = GPT(config or ModelConfig(**QWEN3)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(
                1 + 0.2 * torch.randn_like(param) if param.dim() == 1 else 0.05 * torch.randn_like(param)
            )
    return model


TOKENS = torch.randint(0, 50257, (2, 50), generator=torch.Generator().manual_seed(1))


def test_hf_qwen3_imports_with_equal_logits_and_exports_back_identically(tmp_path):
    hf = hf_qwen3()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(import_from_hf(tmp_path / "hf", tmp_path / "run"))
    assert ours.config == ModelConfig(**QWEN3)
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-4

    export_to_hf(tmp_path / "run", tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    original = hf.state_dict()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(again.state_dict()[k], original[k]) for k in original)


def test_export_loads_in_transformers_with_equal_logits_and_imports_back_identically(tmp_path):
    model = random_qwen3_smallgpt()
    save_weights(model, tmp_path / "model.safetensors")
    out = export_to_hf(tmp_path / "model.safetensors", tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()  # untied
    with torch.no_grad():
        assert (hf(TOKENS).logits - model(TOKENS)).abs().max().item() <= 1e-4

    back = load_model(import_from_hf(out, tmp_path / "back"))
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):  # padding rows: not exported, zero again
            assert torch.equal(back.state_dict()[name][:50257], tensor[:50257]), name
            assert not back.state_dict()[name][50257:].any()
        else:
            assert torch.equal(back.state_dict()[name], tensor), name


def test_the_embedding_norm_row_exports_as_plain_qwen3_with_equal_greedy_text(tmp_path):
    """`qwen3-embnorm`'s embedding norm is folded into the exported table: transformers' Qwen3, which has
    no such norm, computes the same logits and greedy continuation; importing it back gives plain qwen3."""
    config = dataclasses.replace(get_preset(DEFAULT_PRESET), arch="qwen3-embnorm")
    assert config.architecture.embedding_norm and not ARCHITECTURES["qwen3"].embedding_norm
    model = random_qwen3_smallgpt(config)  # embedding rows of random scale: folding them matters
    save_weights(model, tmp_path / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_to_hf(tmp_path / "model.safetensors", tmp_path / "hf")
    )
    with torch.no_grad():
        assert (hf(TOKENS).logits - model(TOKENS)).abs().max().item() <= 1e-4
        prompt, ours = TOKENS[:1, :8], TOKENS[:1, :8]
        for _ in range(24):  # greedy, the whole context each step
            ours = torch.cat([ours, model(ours)[:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()
    back = load_model(import_from_hf(tmp_path / "hf", tmp_path / "back"))
    assert back.config == dataclasses.replace(config, arch="qwen3")
    with torch.no_grad():
        assert (back(TOKENS) - model(TOKENS)).abs().max().item() <= 1e-4


def test_export_refuses_an_architecture_with_features_the_format_cannot_hold(monkeypatch, tmp_path):
    other = dataclasses.replace(ARCHITECTURES["qwen3"], name="qwen3-theta", rope_theta=5e5)
    monkeypatch.setitem(ARCHITECTURES, other.name, other)
    save_weights(GPT(ModelConfig(**{**QWEN3, "arch": other.name})), tmp_path / "model.safetensors")
    with pytest.raises(SmallGPTError, match="arch qwen3-theta has features qwen3 cannot hold"):
        export_to_hf(tmp_path / "model.safetensors", tmp_path / "hf")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads=2 (it needs 4)"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True (it needs False)"),
        ({"intermediate_size": 100}, "intermediate_size=100 (it needs 192)"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "rope_theta=1000000.0"),
    ],
)
def test_import_refuses_qwen3_variants_it_cannot_run(tmp_path, change, message):
    hf_qwen3().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SmallGPTError, match=re.escape(f"cannot run this Qwen3 variant: {message}")):
        import_from_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_refuses_biases():
    with pytest.raises(SmallGPTError, match="cannot export to Qwen3: bias=True"):
        from smallgpt.interop_qwen3 import hf_config_from

        hf_config_from(ModelConfig(**{**QWEN3, "bias": True}))


def test_cached_decoding_equals_the_full_forward():
    """Keys are cached already rotated, each at its own row's positions: prefill + a decode step of
    rows with different lengths equals recomputing each sequence whole."""
    model = random_qwen3_smallgpt()
    pool = KVPool(model.config, rows=2)
    prompts = [TOKENS[0, :20].tolist(), TOKENS[1, :30].tolist()]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            logits = pool.prefill(model, row, prompt)
            assert torch.allclose(logits, model(torch.tensor([prompt]))[0, -1], atol=1e-4)
        logits = DecodeStep(model, pool)(TOKENS[:, 40])
        for row, prompt in enumerate(prompts):
            whole = torch.tensor([[*prompt, TOKENS[row, 40].item()]])
            assert torch.allclose(logits[row], model(whole)[0, -1], atol=1e-4)


def test_modern_layout_is_qwen3s():
    model = GPT(ModelConfig(**QWEN3))
    names = {name for name, _ in model.named_parameters()}
    assert "transformer.wpe.weight" not in names and not any(name.endswith(".bias") for name in names)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not model.lm_head.weight.any() and not model.transformer.h[0].attn.c_proj.weight.any()
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
