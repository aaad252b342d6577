"""The engine's scheduling against independent references: each request run alone, the model's own
log-softmax over the whole prompt, and unpadded decode steps."""

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from test_generate import LONG_PROMPT, small_model

from smallgpt.config import ModelConfig
from smallgpt.engine import FEED_UP_TO, Engine, Request
from smallgpt.generate import SamplingParams
from smallgpt.kvcache import DecodeStep, KVPool, _DecodeView, bucket
from smallgpt.model import GPT
from smallgpt.tokenizer import encode


@pytest.fixture(scope="module")
def model():
    return small_model()


def mixed_requests() -> list[Request]:
    """16 requests unlike each other: prompt lengths (past the 32-token context too), lengths, stop
    strings, sampler settings, seeds."""
    prompts = ["Hi", LONG_PROMPT, "A much longer opening line, of a dozen tokens or so", "x"]
    samplers = [dict(), dict(temperature=0), dict(top_k=5), dict(top_p=0.8, temperature=0.7)]
    stops = [(), ("e",), ("the", "an"), ()]
    return [
        Request(
            encode(prompts[i % 4]),
            SamplingParams(6 + 2 * i, seed=100 + i, stop=stops[i // 4], **samplers[i // 4 % 4]),
        )
        for i in range(16)
    ]


def complete(engine: Engine, requests: list[Request], join_every: int | None = None):
    """Submit all requests at once, or one more every `join_every` steps; step until all are done."""
    sequences, pending, step = [], list(requests), 0
    while pending or not all(s.done for s in sequences):
        if pending and join_every is None:
            sequences += [engine.submit(r) for r in pending]
            pending = []
        elif pending and step % join_every == 0:
            sequences.append(engine.submit(pending.pop(0)))
        engine.step()
        step += 1
    return [s.completion() for s in sequences]


def scored(request: Request) -> Request:
    """The request with its tokens' log-probabilities kept: comparing those compares the logits bit
    for bit, not only the tokens they led to."""
    return dataclasses.replace(request, logprobs=0)


def test_batch_invariant_engine_gives_the_same_text_alone_and_in_a_batch_of_16(model):
    requests = [scored(r) for r in mixed_requests()]
    engine = Engine(model, max_batch=16, batch_invariant=True)
    alone = [complete(engine, [r])[0] for r in requests]
    assert complete(Engine(model, max_batch=16, batch_invariant=True), requests) == alone
    assert {c.finish_reason for c in alone} == {"stop", "length"}  # both kinds of ending happened
    assert len({len(c.token_ids) for c in alone}) > 4  # sequences left the batch at different steps
    # Joining between steps (continuous batching) changes nothing either.
    assert complete(Engine(model, max_batch=16, batch_invariant=True), requests, join_every=3) == alone


def test_batch_invariant_engine_over_a_longer_context():
    """With a 128-token context a decode step attends over 32, 64, 96 or 128 slots, whatever its
    longest row needs: a row alone and the same row beside longer ones see different spans."""
    model, requests = small_model(block_size=128), [scored(r) for r in mixed_requests()]
    engine = Engine(model, max_batch=16, batch_invariant=True)
    alone = [complete(engine, [r])[0] for r in requests]
    assert complete(Engine(model, max_batch=16, batch_invariant=True), requests) == alone


def test_a_request_alone_is_the_same_in_any_pool(model):
    """Alone, a request's steps run at one row whatever the pool holds: the same logits, bit for bit,
    as a one-row engine's (the server's default pool and `smallgpt sample`'s)."""
    for request in [scored(r) for r in mixed_requests()[::3]]:
        assert complete(Engine(model, max_batch=16), [request]) == complete(
            Engine(model, max_batch=1), [request]
        )


def test_within_a_bucket_a_row_is_the_same_whatever_its_batch_mates(model):
    """Steps run the busy rows padded to 1, 2, 4, 8 or 16 rows. At one size, a row's logits do not
    depend on how many rows are busy nor on what the others hold: 5 and 8 busy rows (both padded to
    8), with different batch-mates, give row 0 the same logits bit for bit over 20 steps."""
    own, mates = encode("Hi there"), [encode(t) for t in ("x", LONG_PROMPT[:30], "Once upon a", "7 8 9")]
    logits = []
    for others in (mates[:4], [*mates[::-1], *mates[:3]]):  # 4 batch-mates, then 7 others
        pool = KVPool(model.config, 16)
        step = DecodeStep(model, pool)
        with torch.no_grad():
            for row, ids in enumerate([own, *others]):
                pool.prefill(model, row, ids)
            assert step.size(1 + len(others)) == 8
            tokens = torch.arange(1 + len(others)) + 40
            logits.append(torch.stack([step(tokens)[0] for _ in range(20)]))
    assert torch.equal(logits[0], logits[1])


def test_a_seeded_batch_repeats_itself(model):
    """Whatever sizes its steps ran at, the same requests submitted the same way give the same text."""
    requests = [scored(r) for r in mixed_requests()]
    assert complete(Engine(model), requests, join_every=2) == complete(Engine(model), requests, join_every=2)


def test_a_row_decodes_bit_for_bit_the_same_whatever_span_its_batch_mates_need():
    model = small_model(block_size=128)
    short, long = encode("Hi there"), encode(LONG_PROMPT)[:60]
    logits, spans = [], []
    for mates in ([], [long]):
        pool = KVPool(model.config, 4)
        step = DecodeStep(model, pool, every_row=True)  # (1 and 2 busy rows: both steps at 4 rows)
        with torch.no_grad():
            for row, ids in enumerate([short, *mates]):
                pool.prefill(model, row, ids)
            spans.append(_DecodeView(pool, 4).mask.shape[-1])
            tokens = torch.tensor([7, 8][: 1 + len(mates)])
            logits.append(torch.stack([step(tokens)[0] for _ in range(60)]))  # row 0 crosses 32
    assert spans[0] < spans[1]  # (32 and 64)
    assert torch.equal(logits[0], logits[1])


def test_requests_beyond_the_pool_wait_for_a_row(model):
    """Six requests through two rows: four wait, each joins as a row frees, and all come out as they
    do alone (batch-invariant steps: alone, a request's steps would otherwise run at one row, here
    at two, which may round differently)."""
    requests = mixed_requests()[::3]
    engine = Engine(model, max_batch=2, batch_invariant=True)
    alone = [complete(engine, [r])[0] for r in requests]
    sequences = [engine.submit(r) for r in requests]
    engine.step()
    assert len(engine.active) == 2 and len(engine.waiting) == len(requests) - 2
    while engine.busy:
        engine.step()
        assert len(engine.active) <= 2
    assert [s.completion() for s in sequences] == alone


def test_a_cancelled_sequence_leaves_at_the_next_step_and_others_go_on(model):
    requests = mixed_requests()[:4]
    engine = Engine(model, max_batch=4)
    alone = [complete(engine, [r])[0] for r in requests]
    sequences = [engine.submit(r) for r in requests]
    engine.step()
    sequences[0].cancelled = True  # its client left (the server sets this from the event loop)
    engine.step()
    assert sequences[0] not in engine.active and len(engine.active) == 3
    assert int(engine.pool.lengths[3]) == 0  # the freed row was refilled by the last one: rows stay packed
    while engine.busy:
        engine.step()
    assert [s.completion() for s in sequences[1:]] == alone[1:]


def test_a_step_reports_what_changed_before_its_decode_step(model):
    """The server answers finished requests while the batch computes its next decode step."""
    engine, requests = Engine(model, max_batch=2), mixed_requests()[:2]
    sequences = [engine.submit(r) for r in requests]
    events, reported, decode = [], [], engine.decode
    engine.decode = lambda tokens: events.append("decode") or decode(tokens)
    while engine.busy:
        reported.clear()
        returned = engine.step(report=lambda changed: events.append("report") or reported.extend(changed))
        assert reported == returned
    assert events[:4] == ["report", "decode", "report", "decode"] and events[-1] == "report"
    assert [s.completion() for s in sequences] == [complete(engine, [r])[0] for r in requests]


def test_a_deadline_ends_generation_with_what_it_has(model):
    engine = Engine(model, max_batch=2)
    late = engine.submit(Request(encode("Hello"), SamplingParams(50, seed=1), deadline=time.monotonic() - 1))
    while engine.busy:
        engine.step()
    assert late.completion().finish_reason == "length" and len(late.token_ids) == 1


def test_echoed_scores_are_the_models_log_softmax_at_every_prompt_position(model):
    prompt = encode(LONG_PROMPT)[:33]  # the whole 32-token context is seen, plus the last token scored
    with torch.no_grad():
        reference = model(torch.tensor([prompt[:-1]]))[0].log_softmax(-1)  # predicts prompt[1:]
    engine = Engine(model, max_batch=2)
    for max_new_tokens, scored in [(0, prompt), (3, prompt[:32])]:  # to generate, the prompt must fit
        request = Request(
            scored, SamplingParams(max_new_tokens, temperature=0.5, seed=0), logprobs=5, echo=True
        )
        [done] = complete(engine, [request])
        assert done.prompt_scores[0] is None and len(done.prompt_scores) == len(scored)
        for t, (token, logprob, top) in enumerate(done.prompt_scores[1:]):
            assert token == scored[t + 1]
            assert logprob == pytest.approx(reference[t, token].item(), abs=1e-5)
            values, ids = reference[t].topk(5)
            assert [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
        assert len(done.token_ids) == max_new_tokens


def test_generated_tokens_are_scored_at_temperature_1_whatever_the_sampling_temperature(model):
    prompt = encode("Once upon a time")
    request = Request(prompt, SamplingParams(45, temperature=0.5, seed=3), logprobs=2)
    [done] = complete(Engine(model, max_batch=2), [request])
    ids = prompt + done.token_ids
    with torch.no_grad():
        for t, (token, logprob, top) in enumerate(done.scores):  # 45 tokens: past the context too
            window = ids[: len(prompt) + t][-model.config.block_size :]
            reference = model(torch.tensor([window]))[0, -1].log_softmax(-1)
            assert token == done.token_ids[t]
            assert logprob == pytest.approx(reference[token].item(), abs=1e-4)
            assert [i for i, _ in top] == reference.topk(2).indices.tolist()


def count_head_calls_and_steps(model, requests: list[Request]):
    """(the first request's completion, calls of the model's head, decode steps) in a 2-row engine."""
    engine, calls = Engine(model, max_batch=2), {"head": 0, "step": 0}
    decode = engine.decode
    engine.decode = lambda tokens: calls.update(step=calls["step"] + 1) or decode(tokens)
    hook = model.lm_head.register_forward_hook(lambda *_: calls.update(head=calls["head"] + 1))
    try:
        return complete(engine, requests)[0], calls["head"], calls["step"]
    finally:
        hook.remove()


def test_beside_others_a_long_prompt_is_prefilled_without_the_head(model):
    """A prompt over FEED_UP_TO tokens (here past the 32-token context) joining other sequences is
    prefilled but for its last token, logits="none": the cache is what a full prefill leaves, and the
    head runs in the decode steps only. Alone, the prefill gives its logits at once (one head call
    more than steps). Either way the first token is scored as the model scores the window."""
    prompt = encode(LONG_PROMPT)
    assert len(prompt) > model.config.block_size > FEED_UP_TO
    caches = []
    for logits in ("last", "none"):
        pool = KVPool(model.config, 1)
        with torch.no_grad():
            out = pool.prefill(model, 0, prompt[-32:-1], logits=logits)
        assert (out is None) == (logits == "none")
        caches.append((pool.keys.clone(), pool.values.clone(), pool.lengths.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*caches, strict=True))
    with torch.no_grad():
        reference = model(torch.tensor([prompt[-32:]]))[0, -1].log_softmax(-1)
    for prompts, extra_head_calls in (([prompt, encode("Hi")], 0), ([prompt], 1)):
        requests = [Request(p, SamplingParams(3, temperature=0, seed=0), logprobs=3) for p in prompts]
        done, head_calls, steps = count_head_calls_and_steps(model, requests)
        assert head_calls == steps + extra_head_calls
        token, logprob, top = done.scores[0]
        assert token == reference.argmax().item()
        assert logprob == pytest.approx(reference[token].item(), abs=1e-5)
        assert [i for i, _ in top] == reference.topk(3).indices.tolist()


def test_scoring_only_a_one_token_prompt_has_nothing_to_score(model):
    [done] = complete(Engine(model), [Request(encode("Hi"), SamplingParams(0), logprobs=1, echo=True)])
    assert done.prompt_scores == [None] and done.token_ids == [] and done.finish_reason == "length"


def test_decode_steps_padded_to_buckets_equal_unpadded_steps(model):
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 9, 16, 17, 64)] == [1, 2, 4, 8, 16, 16, 32, 64]
    assert [bucket(n, 12) for n in (3, 9, 12)] == [4, 12, 12]
    prompts = [encode(p) for p in ("Hi", "The meaning of life", "x y z", "Once upon a time there was")]
    logits = []
    for every_row in (True, False):
        pool = KVPool(model.config, 8, dtype=torch.float32)
        step = DecodeStep(model, pool, every_row=every_row)
        with torch.no_grad():
            for row, ids in enumerate(prompts[:3]):  # 3 busy rows: a bucket of 4, a pool of 8
                pool.prefill(model, row, ids)
            assert step.size(3) == (8 if every_row else 4)
            logits.append(torch.cat([step(torch.tensor([11, 12, 13])) for _ in range(3)]))
        assert pool.lengths.tolist() == [len(p) + 3 for p in prompts[:3]] + [0] * 5
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


# --- past the context with rotary positions: the cache rolls instead of recomputing the window ---


def rotary_model(n_layer: int, seed: int = 0) -> GPT:
    """A small Qwen3-layout model with peaked logits, so a wrong position or slot changes the tokens."""
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="qwen3", block_size=16, n_layer=n_layer, n_head=2, n_embd=32, dropout=0.0, bias=False
    )
    model = GPT(config).eval()
    with torch.no_grad():  # the init zeroes output projections: give every matrix weights that matter
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 2.0 / param.shape[1] ** 0.5)
    return model


class SlidingWindow:
    """Reference attention over a whole sequence at once: each token sees itself and the
    `window - 1` tokens before it, keys and values computed from that same full forward."""

    def __init__(self, n_layer: int, window: int):
        self.window = window
        self.layers = [self] * n_layer

    def attend(self, q, k, v):
        i = torch.arange(q.shape[2])
        distance = i[:, None] - i[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(distance >= 0) & (distance < self.window))


def greedy_with_scores(model: GPT, prompt: list[int], tokens: int):
    request = Request(prompt, SamplingParams(tokens, temperature=0), logprobs=0)
    done = complete(Engine(model, max_batch=4), [request])[0]
    assert len(done.token_ids) == tokens  # no early <|endoftext|>: the whole span past the context ran
    return done


def test_rolling_cache_is_sliding_window_attention_for_300_tokens():
    model, prompt = rotary_model(n_layer=2), encode("Once upon a time")
    done = greedy_with_scores(model, prompt, 300)  # 300 tokens past a 16-token context
    sequence = torch.tensor([prompt + done.token_ids[:-1]])
    with torch.no_grad():
        reference = model.forward_cached(
            sequence, torch.arange(sequence.shape[1])[None], SlidingWindow(2, 16), logits="all"
        )[0, len(prompt) - 1 :].log_softmax(-1)
    assert done.token_ids == reference.argmax(-1).tolist()
    logprobs = torch.tensor([score[1] for score in done.scores])
    chosen = reference.gather(1, torch.tensor(done.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(logprobs, chosen, atol=1e-4, rtol=0)


def test_one_layer_rolling_cache_equals_recomputing_the_window():
    """With one layer a cached key depends on its own token and position only, so rolling is exact:
    every next token is what a fresh forward over the last block_size tokens predicts."""
    model, prompt = rotary_model(n_layer=1, seed=1), encode("It was a dark and stormy night")
    done = greedy_with_scores(model, prompt, 60)
    history = prompt + done.token_ids
    with torch.no_grad():
        for t, score in enumerate(done.scores):
            window = torch.tensor([history[: len(prompt) + t][-16:]])
            expected = model(window)[0, -1].log_softmax(-1)
            assert done.token_ids[t] == int(expected.argmax())
            assert abs(score[1] - float(expected[done.token_ids[t]])) < 1e-4


def test_gpt2_positions_still_recompute_the_window():
    assert not ModelConfig().architecture.relative_positions
    assert ModelConfig(arch="qwen3").architecture.relative_positions
    assert not KVPool(ModelConfig(n_layer=1, n_embd=8, n_head=1, block_size=4), 1).rolling
