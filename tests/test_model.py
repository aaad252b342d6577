"""The model against an independent reference: Hugging Face's GPT2LMHeadModel with the same weights."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from smallgpt.architectures import ARCHITECTURES
from smallgpt.config import ModelConfig, get_preset
from smallgpt.interop_gpt2 import state_dict_from_hf
from smallgpt.loss import linear_cross_entropy
from smallgpt.model import GPT

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=50257, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def hf_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=SMALL["vocab_size"],
        n_positions=SMALL["block_size"],
        n_layer=SMALL["n_layer"],
        n_head=SMALL["n_head"],
        n_embd=SMALL["n_embd"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    # HF initialises biases and LayerNorms to constants; randomise them so the test covers them too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_logits_match_hf_gpt2(vocab_multiple):
    hf = hf_gpt2()
    config = ModelConfig(**SMALL, vocab_multiple=vocab_multiple)
    ours = GPT(config).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape == (3, 40, 50257)
    assert (got - expected).abs().max().item() <= 1e-4


def test_loss_matches_hf_loss():
    hf = hf_gpt2()
    config = ModelConfig(**SMALL)
    ours = GPT(config).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(idx, labels=idx).loss  # HF shifts labels internally
        got = ours(idx[:, :-1], idx[:, 1:])
    assert abs(got.item() - expected.item()) < 1e-4


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT(get_preset("tiny")).eval()
    a = torch.randint(0, 50257, (1, 20))
    b = a.clone()
    b[0, 10:] = torch.randint(0, 50257, (10,))
    with torch.no_grad():
        assert torch.allclose(model(a)[0, :10], model(b)[0, :10], atol=1e-6)


def test_padded_vocabulary_ids_never_get_probability():
    """Make the 47 padding rows of the tied embedding/head huge, so that any leak would dominate;
    they still never get probability (logits, loss) and are never sampled."""
    from smallgpt.engine import Engine
    from smallgpt.generate import SamplingParams

    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, vocab_multiple=64)).eval()
    V = SMALL["vocab_size"]
    with torch.no_grad():
        model.lm_head.weight[V:] = 1e3 * torch.randn(50304 - V, SMALL["n_embd"])
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        hidden = model.hidden_states(idx)
        unmasked = hidden @ model.lm_head.weight.T  # what an unsliced head would score
        assert (unmasked.argmax(-1) >= V).all()  # the padding would win every position
        logits = model(idx)
        assert logits.shape[-1] == V
        torch.testing.assert_close(logits, unmasked[..., :V])
        # The loss normalises over the real ids only: equal to cross-entropy on the sliced logits.
        targets = torch.randint(0, V, (2, 16))
        expected = F.cross_entropy(unmasked[..., :V].flatten(0, 1), targets.flatten())
        torch.testing.assert_close(model(idx, targets), expected)
    completions = Engine(model).generate(
        ["The", "A padded vocabulary", ""], SamplingParams(max_new_tokens=32, temperature=2.0, seed=1)
    )
    sampled = [token for completion in completions for token in completion.token_ids]
    assert len(sampled) >= 3 and max(sampled) < V


def test_gpt2_initialisation():
    model = GPT(get_preset("smallgpt-10m"))
    std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / (2 * 6) ** 0.5) < 0.001
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("vocab_size, padded", [(100, 128), (128, 128)])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(vocab_size, padded):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab_size, (37,), generator=gen)
    targets[[0, 5, 9]] = -1  # ignored positions
    loss = linear_cross_entropy(hidden, weight, targets, vocab_size, columns=8)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy((hidden @ weight.t())[:, :vocab_size], targets, ignore_index=-1)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-12)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-12)
    assert torch.allclose(grads[1], weight.grad, atol=1e-12)


def test_sequence_longer_than_context_is_refused():
    model = GPT(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_training_attention_in_fp32_under_bf16_autocast(arch):
    """`train_attention_in(float32)`: with gradients on, attention computes in fp32 from the bf16
    projections (and its gradients reach the bf16 weights); without gradients autocast's bf16 stays."""
    model = GPT(ModelConfig(**SMALL, arch=arch, bias=ARCHITECTURES[arch].hf_model_type == "gpt2"))
    model.train_attention_in(torch.float32)
    attn = model.transformer.h[0].attn
    q, k, v = (torch.randn(2, 4, 8, 16).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn.attend(q, k, v)
        with torch.no_grad():
            assert attn.attend(q, k, v).dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.float32 and torch.equal(y, want)
    y.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    with torch.no_grad():  # Qwen3's zero-initialised outputs would keep the blocks' gradients at 0
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()  # the whole model trains through it
    assert model.transformer.h[0].attn.c_proj.weight.grad.abs().sum() > 0  # fed by the fp32 attention


def test_qk_norm_under_bf16_autocast_takes_the_fused_kernel_without_a_warning():
    """The QK-norm sees bf16 projections and has an fp32 gain; the gain follows the input's dtype,
    so PyTorch's fused RMSNorm runs (it warns and falls back when the two differ)."""
    model = GPT(get_preset("tiny-modern"))
    idx = torch.randint(0, 50257, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()
    assert model.transformer.h[0].attn.q_norm.weight.grad.dtype == torch.float32
