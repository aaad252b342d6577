"""Sampling and generation against independent references: full recomputation without a cache, each
prompt run alone, float64 top-k / top-p sets, argmax, and the `smallgpt sample` command as users run it."""

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import ONE_THREAD_ENV, smallgpt

from smallgpt.architectures import ARCHITECTURES
from smallgpt.checkpoint import save_weights
from smallgpt.config import ModelConfig
from smallgpt.engine import Completion, Engine, Request, prompt_ids
from smallgpt.errors import SmallGPTError
from smallgpt.generate import (
    PACK_FROM_ROWS,
    Int8Linear,
    PackedLinear,
    RowText,
    SamplingParams,
    inverse_cdf,
    packed_for_decoding,
    quantize_int8,
    sample_next_token,
)
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, decode, encode

# Tiny, with a small context so that 200 new tokens cross it several times.
SMALL = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
LONG_PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom, " * 3


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL.to_dict(), **overrides})).eval()
    # Larger weights than the init's: peaked logits that depend on the whole context and on positions,
    # so a cache, position or padding mistake changes the tokens (each such mutation fails a test here).
    # Matrices an architecture starts at zero (the modern init's residual outputs and head) are drawn too.
    with torch.no_grad():
        for matrix in (param for param in model.parameters() if param.dim() == 2):
            if not matrix.any():
                torch.nn.init.normal_(matrix, std=0.02)
            matrix.mul_(5)
    return model


def reference_generate(model: GPT, prompt: str, params: SamplingParams) -> list[int]:
    """The slow, obviously right sampler: rerun the last block_size tokens for every new token."""
    ids = encode(prompt) or [EOT_ID]
    rng = torch.Generator().manual_seed(params.seed or 0)
    new = []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            logits = model(torch.tensor([ids[-model.config.block_size :]]))[:, -1]
            token = sample_next_token(logits, params, rng).item()
            new.append(token)
            ids.append(token)
            if token == EOT_ID:
                break
    return new


@pytest.mark.parametrize("prompt", ["The meaning of life", LONG_PROMPT], ids=["short", "longer-than-context"])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(200, temperature=0), SamplingParams(200, temperature=1.0, top_k=50, seed=7)],
    ids=["greedy", "sampled"],
)
def test_cached_generation_equals_full_recomputation_across_the_context_limit(prompt, params):
    model = small_model()
    [completion] = Engine(model).generate([prompt], params)
    assert len(completion.token_ids) == 200 and completion.finish_reason == "length"
    assert completion.token_ids == reference_generate(model, prompt, params)
    assert completion.text == decode(completion.token_ids)
    assert completion.prompt_tokens == len(encode(prompt))


@pytest.mark.parametrize("params", [SamplingParams(60, temperature=0), SamplingParams(60, seed=5)])
def test_batch_of_different_lengths_equals_each_prompt_alone(params):
    generator = Engine(small_model(), batch_invariant=True)
    prompts = ["Hi", LONG_PROMPT, "A much longer opening line, of a dozen tokens or so"]
    batch = generator.generate(prompts, params)  # every row crosses the 32-token context
    for i, (prompt, completion) in enumerate(zip(prompts, batch, strict=True)):
        alone = dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
        assert completion == generator.generate([prompt], alone)[0]


@pytest.mark.parametrize("width", [5, 256, 300, 50257])
def test_two_level_draw_lands_where_a_full_running_sum_does(width):
    """Small integer weights sum exactly in any order, so both searches must agree on every draw,
    including draws exactly at a running sum (a boundary between two columns) and just below 1."""
    gen = torch.Generator().manual_seed(width)
    weights = torch.randint(0, 4, (8, width), generator=gen).float()  # about a quarter are zero
    weights[:, 0] = 0.0  # a zero column at the very start, and whole zero blocks in row 0
    weights[0, : width // 2] = 0.0
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    zero = torch.zeros(8, 1)
    below_one, below_total = torch.ones(8, 1).nextafter(zero), total.nextafter(zero)
    at_boundaries = [cdf[:, j : j + 1] / total for j in range(0, width - 1, max(1, width // 50))]
    for u in [torch.rand(8, 1, generator=gen) for _ in range(100)] + at_boundaries + [below_one]:
        expected = torch.searchsorted(cdf, torch.minimum(u * total, below_total), right=True)
        drawn = inverse_cdf(weights, u)
        assert torch.equal(drawn, expected)
        assert bool((weights.gather(1, drawn) > 0).all())  # never a zero-weight column


def test_sampled_frequencies_are_the_softmax_at_the_temperature():
    logits = torch.full((1000,), -40.0)
    columns = torch.tensor([3, 255, 256, 999])  # on both sides of a 256-column block boundary
    logits[columns] = torch.tensor([0.0, 1.0, -0.5, 0.5])
    params = SamplingParams(temperature=0.7)
    samples = sample_next_token(logits.expand(10000, 1000), params, torch.Generator().manual_seed(0))
    assert set(samples.tolist()) == set(columns.tolist())
    frequencies = torch.bincount(samples, minlength=1000)[columns] / 10000
    expected = (logits[columns].double() / 0.7).softmax(dim=0)
    assert torch.allclose(frequencies.double(), expected, atol=0.02)  # 4 standard deviations


def test_top_k_samples_only_the_k_most_probable():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)).expand(2000, 1000)
    params = SamplingParams(temperature=2.0, top_k=3, seed=1)
    samples = sample_next_token(logits, params, torch.Generator().manual_seed(1))
    assert set(samples.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_k_through_the_generator_against_recomputed_logits():
    model = small_model()
    params = SamplingParams(40, temperature=1.5, top_k=4, seed=3)
    [completion] = Engine(model).generate(["Once upon a time"], params)
    ids = encode("Once upon a time")
    with torch.no_grad():
        for token in completion.token_ids:
            logits = model(torch.tensor([ids[-model.config.block_size :]]))[0, -1]
            assert token in logits.topk(4).indices.tolist()
            ids.append(token)


def nucleus(logits: torch.Tensor, p: float) -> set[int]:
    """Float64 reference: the smallest most-probable-first set with probability mass >= p."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < p).sum()) + 1
    return set(order[:size].tolist())


def test_top_p_samples_only_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    rng = torch.Generator().manual_seed(0)
    for p, expected in [(0.45, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2}), (0.99, {0, 1, 2, 3})]:
        samples = sample_next_token(logits, SamplingParams(top_p=p), rng)
        assert set(samples.tolist()) == expected, p


@pytest.mark.parametrize("scale", [4.0, 0.5], ids=["peaked", "flat-nucleus-of-thousands"])
def test_top_p_over_the_full_vocabulary_matches_a_float64_reference(scale):
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, 50257, generator=gen) * scale
    logits = rows.repeat_interleave(50, dim=0)
    samples = sample_next_token(logits, SamplingParams(top_p=0.9), gen).view(4, 50)
    for row, drawn in zip(rows, samples, strict=True):
        allowed = nucleus(row, 0.9)
        assert set(drawn.tolist()) <= allowed
        assert len(set(drawn.tolist())) > 1


def test_temperature_towards_zero_is_argmax():
    logits = torch.randn(200, 1000, generator=torch.Generator().manual_seed(2))
    rng = torch.Generator().manual_seed(0)
    # 1e-50 and 5e-324 round to 0 in float32: dividing by them gave nan (and a KeyError) before.
    for temperature in (0.0, 1e-4, 1e-40, 1e-50, 5e-324):
        samples = sample_next_token(logits, SamplingParams(temperature=temperature), rng)
        assert torch.equal(samples, logits.argmax(-1))


def streamed(engine: Engine, prompt: str, params: SamplingParams) -> tuple[list[str], Completion]:
    """The text deltas a sequence hands out step by step, and its completion."""
    sequence = engine.submit(Request(prompt_ids(prompt), params))
    deltas = []
    while not sequence.done:
        engine.step()
        deltas.append(sequence.delta)
    return deltas, sequence.completion()


def test_same_seed_same_text_and_deltas_add_up_to_the_text():
    engine = Engine(small_model())
    params = SamplingParams(30, seed=42)
    first = engine.generate(["Hello"], params)
    assert first == engine.generate(["Hello"], params)
    assert first != engine.generate(["Hello"], SamplingParams(30, seed=43))
    deltas, completion = streamed(engine, "Hello", params)
    assert "".join(deltas) == completion.text == first[0].text
    assert completion == first[0]


def test_padded_vocabulary_ids_are_never_sampled():
    model = small_model(vocab_multiple=64)
    assert model.lm_head.weight.shape[0] > model.config.vocab_size
    with torch.no_grad():  # make the padding rows score far above every real token
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[model.config.vocab_size :] = 10.0
    for params in (SamplingParams(20, seed=0), SamplingParams(20, temperature=0)):
        [completion] = Engine(model).generate(["x"], params)
        assert max(completion.token_ids) < model.config.vocab_size


def test_end_of_text_always_stops():
    model = small_model()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[EOT_ID] = 10.0
    [completion] = Engine(model).generate(["x"], SamplingParams(20, seed=0))
    assert completion.token_ids == [EOT_ID]
    assert completion.text == "" and completion.finish_reason == "stop"


def test_stop_string_ends_the_text_before_it():
    generator = Engine(small_model())
    full = generator.generate(["Hello"], SamplingParams(40, temperature=0))[0].text
    stop = full[12:15]
    expected = full[: full.index(stop)]
    stopped = generator.generate(["Hello"], SamplingParams(40, temperature=0, stop=(stop, "never!")))
    assert stopped[0].text == expected and stopped[0].finish_reason == "stop"
    deltas, _ = streamed(generator, "Hello", SamplingParams(40, temperature=0, stop=(stop,)))
    assert "".join(deltas) == expected


def test_text_deltas_hold_back_partial_characters_and_stop_string_prefixes():
    row = RowText(stop=("world!",))
    # "é" arrives as two byte-level tokens; "wor" and "world" might begin the stop string, so they wait.
    assert [row.add(b) for b in (b"caf\xc3", b"\xa9 hello wor", b"ld?", b" world")] == [
        "caf",
        "é hello ",
        "world?",
        " ",
    ]
    assert row.add(b"!") == "" and row.stopped and row.text == "café hello world? "
    last = RowText(stop=("xyz",))
    assert last.add(b"ab x") == "ab " and last.add(b"y", final=True) == "xy"


def test_empty_prompt_starts_from_end_of_text():
    model = small_model()
    [completion] = Engine(model).generate([""], SamplingParams(10, temperature=0))
    assert completion.prompt_tokens == 1
    assert completion.token_ids == reference_generate(model, "", SamplingParams(10, temperature=0))


def test_training_mode_is_restored_and_dropout_is_off_while_generating():
    model = small_model(dropout=0.5).train()
    generator = Engine(model)
    params = SamplingParams(10, temperature=0)
    first = generator.generate(["Hello"], params)
    assert model.training
    assert first == generator.generate(["Hello"], params)
    assert first == Engine(model.eval()).generate(["Hello"], params)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be at least 1"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be at least 0"),
        (dict(stop=("",)), "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(SmallGPTError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_weights_on_every_linear_keep_the_distribution_and_leave_the_model_alone(arch):
    model = small_model(arch=arch)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with torch.no_grad():  # biases start at zero: draw them, so that a dropped bias shows
        for bias in (linear.bias for linear in linears.values() if linear.bias is not None):
            bias.normal_(std=0.1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    quantized = quantize_int8(model)
    assert not [name for name, module in quantized.named_modules() if isinstance(module, nn.Linear)]
    assert [name for name, module in quantized.named_modules() if isinstance(module, Int8Linear)] == list(
        linears
    )
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, approx = model(idx), quantized(idx)
    # Rounding each weight to 1/254 of its row's range moves a logit by ~1% of the logits' spread.
    assert (approx - exact).abs().max() < 0.03 * (exact.max() - exact.min())
    exact, approx = exact.log_softmax(-1), approx.log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1)
    assert kl.max() < 0.01
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.9
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    if model.config.architecture.tied_head:  # the original keeps its tie
        assert model.lm_head.weight is model.transformer.wte.weight
    greedy = SamplingParams(30, temperature=0)  # "Hello" + 30 tokens fill the 32-token context
    [completion] = Engine(quantized).generate(["Hello"], greedy)
    assert completion.token_ids == reference_generate(quantized, "Hello", greedy)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="packed GEMM is MKL's")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_twin_shares_the_weights_and_follows_them(arch):
    model = small_model(arch=arch)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    twin = packed_for_decoding(model, 16)
    assert [name for name, module in twin.named_modules() if isinstance(module, PackedLinear)] == linears
    assert {id(p) for p in twin.parameters()} == {id(p) for p in model.parameters()}  # shared, not copied
    ids = torch.randint(0, 50257, (16, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for rows in (PACK_FROM_ROWS, 8, 16):  # packed: another kernel, the same products to rounding
            torch.testing.assert_close(twin(ids[:rows]), model(ids[:rows]), atol=1e-4, rtol=1e-5)
        few = ids[: PACK_FROM_ROWS - 1]  # too few rows to pack: the plain layers, bit for bit
        assert torch.equal(twin(few), model(few))
        before = twin(ids)
        for param in model.parameters():  # trained further (in place): the packings follow
            param.mul_(0.5)
        torch.testing.assert_close(twin(ids), model(ids), atol=1e-4, rtol=1e-5)
        assert not torch.allclose(twin(ids), before)
    assert packed_for_decoding(model, PACK_FROM_ROWS - 1) is None  # no step would use it
    assert packed_for_decoding(small_model(arch=arch).to(torch.bfloat16), 16) is None
    assert packed_for_decoding(quantize_int8(model), 16) is None  # int8 layers are not nn.Linear


def test_model_with_another_vocabulary_is_refused():
    with pytest.raises(SmallGPTError, match="incompatible checkpoint"):
        Engine(GPT(ModelConfig(vocab_size=1000, block_size=8, n_layer=1, n_head=1, n_embd=8)))


# --- the command line ---


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_weights(small_model(), path)
    return path


def test_sample_streams_the_prompt_and_its_greedy_continuation(checkpoint, tmp_path):
    expected = Engine(small_model()).generate(["Hello"], SamplingParams(12, temperature=0))[0].text
    result = smallgpt("sample", str(checkpoint), "--prompt=Hello", "--temperature=0", "--max-new-tokens=12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Hello{expected}\n"
    assert "12 tokens" in result.stderr and "finish: length" in result.stderr
    # A temperature that underflows float32 is greedy (it was a KeyError from nan probabilities).
    tiny_temperature = smallgpt(
        "sample", str(checkpoint), "--prompt=Hello", "--temperature=1e-50", "--max-new-tokens=12"
    )
    assert tiny_temperature.returncode == 0 and tiny_temperature.stdout == result.stdout
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hello", encoding="utf-8")
    stop = expected[5:8]
    from_file = smallgpt(
        "sample", str(checkpoint.parent), "--prompt-file", str(prompt_file), "--temperature", "0",
        "--max-new-tokens", "12", "--stop", stop, "--stop", "unused",
    )  # fmt: skip
    assert from_file.stdout == f"Hello{expected[: expected.index(stop)]}\n"


def test_sample_seeds_num_samples_and_empty_prompt(checkpoint):
    """(Several prompts x --num-samples, --int8 and --interactive: test_architectures, every architecture.)"""
    args = ("sample", str(checkpoint), "--seed", "5", "--num-samples", "2", "--max-new-tokens", "8")
    first, second = smallgpt(*args), smallgpt(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    one, two = first.stdout.split("-" * 40 + "\n")
    assert one != two
    assert "starting from <|endoftext|>" in first.stderr


def test_sample_bad_input_gives_one_line_errors(checkpoint, tmp_path):
    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("hello")
    other_vocab = tmp_path / "other.safetensors"
    save_weights(GPT(ModelConfig(vocab_size=1000, block_size=8, n_layer=1, n_head=1, n_embd=8)), other_vocab)
    ckpt = str(checkpoint)
    cases = [
        ([ckpt, "--temperature", "-1"], "temperature must be >= 0"),
        ([ckpt, "--top-k", "0"], "top_k must be at least 1"),
        ([ckpt, "--top-p", "1.5"], "top_p must be in (0, 1]"),
        ([ckpt, "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        ([ckpt, "--num-samples", "0"], "num_samples must be at least 1"),
        ([str(tmp_path / "missing")], "checkpoint not found"),
        ([str(not_weights)], "not a readable safetensors file"),
        ([str(other_vocab)], "incompatible checkpoint"),
        ([ckpt, "--prompt-file", str(tmp_path / "absent.txt")], "cannot read prompt file"),
    ]
    # All at once: each is a fresh Python process, and they mostly wait on imports.
    command = [sys.executable, "-m", "smallgpt", "sample"]
    runs = [
        subprocess.Popen([*command, *args], stdout=-1, stderr=-1, text=True, env=ONE_THREAD_ENV)
        for args, _ in cases
    ]
    for (args, message), run in zip(cases, runs, strict=True):
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 1, (args, stderr)
        assert message in stderr and "Traceback" not in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1, (args, stderr)


def test_sequences_sample_together_only_when_every_distribution_field_agrees():
    """The grouping key is derived: every field not marked per-sequence is in it, so a new field cannot
    be left out by hand (which would sample a whole group with the first request's setting)."""
    base, changed = (
        SamplingParams(),
        dict(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.5, seed=1, stop=("x",)),
    )
    assert set(changed) == {f.name for f in dataclasses.fields(SamplingParams)}  # a new field: add it here
    same_group = {
        name
        for name, value in changed.items()
        if dataclasses.replace(base, **{name: value}).sampler == base.sampler
    }
    assert same_group == {"max_new_tokens", "seed", "stop"}
