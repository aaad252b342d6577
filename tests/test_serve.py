"""`smallgpt serve` as clients meet it: a live server process on a free local port, called through the
official `openai` client, raw HTTP, schemathesis and a headless browser.

The server must return exactly what the library itself generates (`Generator` on the same checkpoint
is the reference), whatever else it is doing at the time.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import requests
import torch

from smallgpt.checkpoint import load_model, save_weights
from smallgpt.config import get_preset
from smallgpt.engine import Engine
from smallgpt.generate import SamplingParams
from smallgpt.limits import Limits
from smallgpt.model import GPT
from smallgpt.serve import model_name
from smallgpt.tokenizer import decode, encode

LARGE_CAP = 100_000  # lets a request run for minutes, to watch a disconnect stop it
SMALL_CAP = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_weights(GPT(get_preset("tiny")), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The library on the same weights, on one torch thread like the servers (see `running_server`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(load_model(checkpoint), max_batch=Limits.max_batch)  # the server's arithmetic
    torch.set_num_threads(threads)


def expected(reference: Engine, prompt: str | list[str], n: int = 1, **params):
    """What the server answers a request with these prompts and n, sent alone: the engine's
    completions, choice i with seed + i (one list for a list of prompts)."""
    completions = reference.generate(
        [prompt] if isinstance(prompt, str) else prompt, SamplingParams(**params), n
    )
    return completions[0] if isinstance(prompt, str) and n == 1 else completions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(checkpoint: Path, *options: str, env: dict | None = None):
    """`python -m smallgpt serve` in a subprocess; yields its base URL; its log must show no crash."""
    port, log_path = free_port(), checkpoint.parent / f"server-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "smallgpt", "serve", str(checkpoint), "--port", str(port), *options]
    # One torch thread, as in `reference`: the same arithmetic, so the same sampled text (thread counts
    # change float summation order); and two processes spinning two threads each on two cores crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not server_is_up(base):
            assert process.poll() is None, f"server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server did not start:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
    server_log = log_path.read_text()
    assert "Traceback" not in server_log and " 500 " not in server_log, server_log


def server_is_up(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=2).ok
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, "--max-tokens-cap", str(LARGE_CAP), "--device", "cpu") as base:
        yield base


@pytest.fixture(scope="module")
def small_server(checkpoint):
    """max_tokens capped at 8, so that schemathesis's requests stay quick."""
    with running_server(checkpoint, "--max-tokens-cap", str(SMALL_CAP)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def active_choices(base: str) -> int:
    return requests.get(f"{base}/health", timeout=10).json()["active_choices"]


def wait_until_idle(base: str, within: float) -> None:
    deadline = time.monotonic() + within
    while active_choices(base):
        assert time.monotonic() < deadline, "generation still running after the client left"
        time.sleep(0.1)


# --- the openai client ---


def test_plain_completion_is_the_library_generation(client, reference):
    prompt = "The meaning of life is"
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    want = expected(reference, prompt, max_new_tokens=12, temperature=0)
    assert result.object == "text_completion" and result.model == "tiny" and len(result.choices) == 1
    assert result.choices[0].text == want.text and result.choices[0].finish_reason == want.finish_reason
    assert result.usage.prompt_tokens == len(encode(prompt))
    assert result.usage.completion_tokens == len(want.token_ids) > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_seeded_sampling_repeats_and_honours_top_k_top_p(client, reference):
    options = dict(max_tokens=16, temperature=0.9, top_p=0.9, seed=3)
    first = client.completions.create(model="tiny", prompt="Once", extra_body={"top_k": 50}, **options)
    again = client.completions.create(model="tiny", prompt="Once", extra_body={"top_k": 50}, **options)
    want = expected(reference, "Once", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    assert first.choices[0].text == again.choices[0].text == want.text


def test_streamed_completion(client, reference, server):
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Hello",
            max_tokens=20,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    want = expected(reference, "Hello", max_new_tokens=20, seed=5)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    # On the wire: server-sent events, every one a `data:` line, the last one [DONE].
    body = {"prompt": "Hello", "max_tokens": 3, "stream": True}
    raw = requests.post(f"{server}/v1/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_choices_and_prompt_lists(client, reference):
    result = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, n=3, seed=11)
    assert [c.index for c in result.choices] == [0, 1, 2]
    want = expected(reference, "Hi", n=3, max_new_tokens=8, seed=11)  # choice i samples with seed + i
    assert [c.text for c in result.choices] == [w.text for w in want]
    assert result.usage.prompt_tokens == len(encode("Hi"))  # the prompt counts once, not n times
    streamed = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, n=3, seed=11, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:  # the choices' deltas arrive interleaved, told apart by index
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in result.choices]
    both = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=4, n=2, seed=1)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    want = expected(reference, ["a", "b c"], n=2, max_new_tokens=4, seed=1)
    assert [c.text for c in both.choices] == [w.text for w in want]
    assert both.usage.prompt_tokens == len(encode("a")) + len(encode("b c"))


def test_stop_strings_end_the_text(client, reference):
    prompt = "The weather today"
    full = expected(reference, prompt, max_new_tokens=24, temperature=0).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()  # a random model's text: this picks two of its characters as the stop string
    cut = full[: full.find(stop)]
    for stops in (stop, [stop, "never appears"]):
        result = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stops
        )
        assert result.choices[0].text == cut and result.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_prompt_longer_than_the_context_is_refused_unless_truncation_is_asked(client):
    tail = " the quick brown fox" * 40  # 160 tokens: more than the tiny model's 128-token context
    with pytest.raises(openai.BadRequestError, match="does not fit the model's context of 128 tokens"):
        client.completions.create(model="tiny", prompt="x " * 300 + tail, max_tokens=6, temperature=0)
    results = [
        client.completions.create(
            model="tiny",
            prompt=head + tail,
            max_tokens=6,
            temperature=0,
            extra_body={"truncate_prompt_tokens": 128},
        )  # fmt: skip
        for head in ("x " * 300, "different words " * 50)
    ]
    assert results[0].choices[0].text == results[1].choices[0].text  # only the last 128 tokens matter
    assert results[0].usage.prompt_tokens == 128


def test_extreme_but_valid_values_are_served(client, reference):
    greedy = client.completions.create(model="tiny", prompt="Edge", max_tokens=6, temperature=0)
    nucleus = client.completions.create(model="tiny", prompt="Edge", max_tokens=6, top_p=5e-324, seed=1)
    assert nucleus.choices[0].text == greedy.choices[0].text  # a vanishing nucleus is the top token
    # An empty prompt starts from <|endoftext|>; choice seeds wrap around 2**64 (seed i = seed + i).
    edge = client.completions.create(model="tiny", prompt="", max_tokens=3, seed=2**63 - 1, n=2)
    want = expected(reference, [""], n=2, max_new_tokens=3, seed=2**63 - 1)
    assert [c.text for c in edge.choices] == [w.text for w in want]
    assert want[1] == expected(reference, [""], n=2, max_new_tokens=3, seed=2**63)[0]  # seed + 1
    hot = dict(temperature=1e308, top_k=10**9)  # every token equally likely; the seed as torch takes it
    result = client.completions.create(
        model="tiny",
        prompt="Edge",
        max_tokens=3,
        seed=-(2**63),
        temperature=1e308,
        extra_body={"top_k": 10**9},
    )
    assert result.choices[0].text == expected(reference, "Edge", max_new_tokens=3, seed=2**63, **hot).text


def test_models_health_schema_and_playground(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    health = requests.get(f"{server}/health", timeout=10).json()
    assert (
        health["status"] == "ok" and health["context_length"] == 128 and health["max_tokens_cap"] == LARGE_CAP
    )
    paths = requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/completions", "/v1/models", "/health"} <= set(paths)
    page = requests.get(server, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and "SmallGPT playground" in page.text


def test_the_model_is_named_after_its_run_or_file(tmp_path):
    best = tmp_path / "runs" / "tiny" / "best"
    best.mkdir(parents=True)
    (best / "model.safetensors").touch()
    (tmp_path / "gpt2.v1.safetensors").touch()
    assert model_name(tmp_path / "runs" / "tiny") == "tiny"
    assert model_name(best / "model.safetensors") == "best"
    assert model_name(tmp_path / "gpt2.v1.safetensors") == "gpt2.v1"


# --- bad input: always OpenAI's error object, never a 500 ---

BAD_REQUESTS = [
    ("malformed JSON", '{"prompt": "hi",', 400, None),
    ("not an object", "[1, 2]", 400, None),
    ("missing prompt", {"max_tokens": 4}, 400, "prompt"),
    ("prompt of the wrong type", {"prompt": 5}, 400, "prompt"),
    ("prompt list with a number", {"prompt": ["a", 3]}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("max_tokens as text", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("fractional max_tokens", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature as text", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("stream as text", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens over the cap", {"prompt": "a", "max_tokens": SMALL_CAP + 1}, 400, "max_tokens"),
    ("negative temperature", {"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p over one", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("top_k zero", {"prompt": "a", "top_k": 0}, 400, "top_k"),
    ("n zero", {"prompt": "a", "n": 0}, 400, "n"),
    ("too many choices", {"prompt": ["a", "b", "c"], "n": 6}, 400, "n"),
    ("empty stop string", {"prompt": "a", "stop": ""}, 400, "stop"),
    ("five stop strings", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
    ("seed beyond int64", {"prompt": "a", "seed": 2**70}, 400, "seed"),
    ("unsupported OpenAI field", {"prompt": "a", "best_of": 2}, 400, "best_of"),
    ("logprobs over five", {"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ("token id beyond the vocabulary", {"prompt": [1, 50257]}, 400, "prompt"),
    ("empty token list", {"prompt": [[]]}, 400, "prompt"),
    ("stop string too long", {"prompt": "a", "stop": "x" * 257}, 400, "stop"),
    ("prompt longer than the context", {"prompt": [5] * 129}, 400, "prompt"),
    (
        "truncation beyond the context",
        {"prompt": "a", "truncate_prompt_tokens": 130},
        400,
        "truncate_prompt_tokens",
    ),
    ("logprobs with stream", {"prompt": "a", "logprobs": 1, "stream": True}, 400, "logprobs"),
]


@pytest.mark.parametrize(
    "body, status, param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_an_openai_error(small_server, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(
        f"{small_server}/v1/completions", data=data, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


UNION_FIELD_MISTAKES = [
    ({"prompt": [1, 50257]}, "prompt: token id 50257 (position 1) is not in the vocabulary (0 to 50256)"),
    ({"prompt": [[5], [7, -1]]}, "prompt: prompt 1: token id -1 (position 1) is not in the vocabulary"),
    ({"prompt": [[5], []]}, "prompt: prompt 1 is an empty list of token ids"),
    ({"prompt": ["a"] * 2000}, "prompt: holds 2000 prompts; a request may hold at most 16"),
    ({"prompt": ["a", 3]}, "prompt: must be a string, a list of strings, a list of token ids or a list of"),
    ({"prompt": {"text": "a"}}, "token-id lists, not an object"),
    ({"prompt": "a", "stop": ""}, "stop: an empty stop string would stop before the first token"),
    ({"prompt": "a", "stop": ["x", ""]}, "stop: an empty stop string"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop: holds 5 stop strings; at most 4"),
    ({"prompt": "a", "stop": [3]}, "stop: must be a string or a list of strings"),
]


@pytest.mark.parametrize("body, message", UNION_FIELD_MISTAKES, ids=[m for _, m in UNION_FIELD_MISTAKES])
def test_a_field_of_several_forms_says_what_is_wrong_with_the_value_sent(small_server, body, message):
    """Not the first form's complaint ("Input should be a valid string" for every prompt mistake)."""
    response = requests.post(f"{small_server}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"], response.json()["error"]["message"]


def test_openai_client_sees_the_error(small_server):
    client = openai.OpenAI(base_url=f"{small_server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=SMALL_CAP + 1)


def test_oversized_bodies_are_refused(small_server):
    body = json.dumps({"prompt": "x" * Limits.max_body_bytes}).encode()
    url, headers = f"{small_server}/v1/completions", {"Content-Type": "application/json"}
    declared = requests.post(url, data=body, headers=headers, timeout=30)
    chunked = requests.post(url, data=iter([body[:1000], body[1000:]]), headers=headers, timeout=30)
    for response in (declared, chunked):
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    under = body[: Limits.max_body_bytes // 2] + b'", "truncate_prompt_tokens": 128}'
    assert requests.post(url, data=under, headers=headers).ok


def test_unknown_routes_and_methods(small_server):
    for method, path, status in [("GET", "/v2/nothing", 404), ("POST", "/v1/models", 405)]:
        response = requests.request(method, f"{small_server}{path}", timeout=10)
        assert response.status_code == status and response.json()["error"]["message"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["no-such-run"], "checkpoint not found: no-such-run"),
        (["CHECKPOINT", "--max-tokens-cap", "0"], "max_tokens cap must be at least 1, got 0"),
        (["CHECKPOINT", "--device", "abacus"], "unknown device 'abacus': use auto, cpu, cuda, cuda:N or mps"),
        (["CHECKPOINT", "--port", "70000"], "port must be in 1..65535, got 70000"),
        (["CHECKPOINT", "--max-batch", "0"], "max_batch must be at least 1, got 0"),
    ],
)
def test_serve_command_refuses_bad_options_in_one_line(checkpoint, options, message):
    options = [str(checkpoint) if o == "CHECKPOINT" else o for o in options]
    result = subprocess.run(
        [sys.executable, "-m", "smallgpt", "serve", *options], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and result.stderr.strip() == f"error: {message}"


def test_serve_on_a_busy_port_is_a_one_line_error(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "smallgpt", "serve", str(checkpoint), "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "serving" not in result.stdout
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


# --- scoring: echo, logprobs, token-id prompts, max_tokens 0 ---


def test_scoring_token_prompts_with_echo_and_max_tokens_0_through_the_openai_client(client, reference):
    """What evaluation harnesses send (lm-eval's local-completions): the scores must be the model's
    own log-softmax at every prompt position."""
    texts = ["The quick brown fox jumps over the lazy dog", "Once upon a time, there was"]
    prompts = [encode(t) for t in texts]
    result = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=3)
    assert result.usage.prompt_tokens == sum(map(len, prompts)) and result.usage.completion_tokens == 0
    for choice, ids, text in zip(result.choices, prompts, texts, strict=True):
        assert choice.text == text and choice.finish_reason == "length"
        with torch.no_grad():
            want = reference.model(torch.tensor([ids]))[0].log_softmax(-1)
        logprobs = choice.logprobs
        assert logprobs.tokens == [decode([i]) for i in ids]
        assert logprobs.text_offset == [len(decode(ids[:t])) for t in range(len(ids))]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        for t in range(1, len(ids)):
            assert logprobs.token_logprobs[t] == pytest.approx(want[t - 1, ids[t]].item(), abs=1e-5)
            top = want[t - 1].topk(3)
            assert list(logprobs.top_logprobs[t]) == [decode([i]) for i in top.indices.tolist()]
            assert list(logprobs.top_logprobs[t].values()) == pytest.approx(top.values.tolist(), abs=1e-5)


def test_generated_logprobs_and_echo_with_text_prompts(client, reference):
    prompt = "Hello there"
    result = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=1
    )
    want = expected(reference, prompt, max_new_tokens=5, temperature=0)
    ids = encode(prompt) + want.token_ids
    choice = result.choices[0]
    assert choice.text == prompt + want.text
    assert choice.logprobs.tokens == [decode([i]) for i in ids]
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [logits[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4
    )
    # Greedy: every generated token is its position's most probable one.
    for t in range(len(encode(prompt)), len(ids)):
        assert choice.logprobs.token_logprobs[t] == max(choice.logprobs.top_logprobs[t].values())
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.tokens == [decode([i]) for i in want.token_ids]
    assert plain.choices[0].logprobs.text_offset[0] == 0


def test_temperature_that_underflows_is_greedy(client):
    greedy = client.completions.create(model="tiny", prompt="Edge", max_tokens=6, temperature=0)
    tiny = client.completions.create(model="tiny", prompt="Edge", max_tokens=6, temperature=1e-50, seed=1)
    assert tiny.choices[0].text == greedy.choices[0].text


# --- admission control and the API key ---


def test_overload_gets_429_with_retry_after_and_admitted_requests_lose_nothing(checkpoint, reference):
    key = "s3cret-key"
    options = ("--max-batch", "1", "--max-queue", "1", "--device", "cpu")
    with running_server(checkpoint, *options, env={"SMALLGPT_API_KEY": key}) as base:
        url = f"{base}/v1/completions"
        auth = {"Authorization": f"Bearer {key}"}
        refused = []

        def call(seed: int) -> str:
            body = {"prompt": "Busy", "max_tokens": 12, "seed": seed}
            while True:  # a polite client: wait as told, then retry
                response = requests.post(url, json=body, headers=auth, timeout=120)
                if response.status_code != 429:
                    assert response.status_code == 200, response.text
                    return response.json()["choices"][0]["text"]
                refused.append(response.headers["Retry-After"])
                time.sleep(float(response.headers["Retry-After"]) / 10)

        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(call, range(6)))
        one_row = Engine(reference.model, max_batch=1)  # the server's arithmetic: a one-row pool
        params = [SamplingParams(12, seed=s) for s in range(6)]
        assert texts == [one_row.generate(["Busy"], p)[0].text for p in params]
        assert refused and set(refused) == {"1"}
        # The key: required on /v1, compared exactly; /health stays open.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            response = requests.post(url, json={"prompt": "a", "max_tokens": 1}, headers=headers, timeout=30)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{base}/v1/models", timeout=30).status_code == 401
        assert requests.get(f"{base}/health", timeout=30).ok
        with_key = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        assert [m.id for m in with_key.models.list()] == ["tiny"]


# --- concurrency ---


def test_simultaneous_streams_on_a_batch_invariant_server_are_each_the_text_alone(checkpoint, reference):
    """With --batch-invariant every step computes the whole pool: a seeded text does not depend on
    what else runs, so 8 streams at once each equal that request alone (in such an engine)."""
    invariant = Engine(reference.model, max_batch=Limits.max_batch, batch_invariant=True)

    def stream(base: str, seed: int) -> str:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        chunks = client.completions.create(
            model="tiny", prompt="Tell me", max_tokens=24, seed=seed, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    server = running_server(checkpoint, "--batch-invariant", "--device", "cpu")
    with server as base, ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda seed: stream(base, seed), range(8)))
    assert texts == [expected(invariant, "Tell me", max_new_tokens=24, seed=s).text for s in range(8)]


def test_a_stalled_client_neither_blocks_others_nor_keeps_its_work(server, client):
    body = {"prompt": "Slowly", "max_tokens": LARGE_CAP // 2, "stream": True}
    slow = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60)
    lines = slow.iter_lines()  # (kept: a dropped iterator would close the connection)
    assert next(lines).startswith(b"data: ")  # it is generating; now it stops reading
    quick = client.completions.create(model="tiny", prompt="Quick", max_tokens=8)
    assert quick.choices[0].finish_reason == "length" and active_choices(server) == 1
    slow.close()  # the client goes away mid-stream: its minutes of work must stop now
    wait_until_idle(server, within=15)


def test_a_client_that_gives_up_on_a_plain_request_frees_its_work(server):
    """The request would run for minutes, unless the random model samples <|endoftext|> early (about
    1 in 50,000 a token): then it is answered at once, and the next seed is tried."""
    for seed in range(3):
        body = {"prompt": "Patience", "max_tokens": LARGE_CAP // 2, "seed": seed}
        try:
            reply = requests.post(f"{server}/v1/completions", json=body, timeout=1.5)
        except requests.Timeout:
            break
        assert reply.json()["choices"][0]["finish_reason"] == "stop"
    else:
        pytest.fail("three requests of 50,000 tokens all ended early")
    wait_until_idle(server, within=15)


# --- the OpenAPI schema, fuzzed ---


def test_schemathesis_finds_no_server_error(small_server, tmp_path):
    """Fuzz every operation of the live schema (valid and invalid requests, wrong methods): no 5xx, and
    status codes, headers and bodies as the schema documents them. Not checked: that every
    schema-valid request is accepted -- a schema cannot say "prompts x n <= 16"."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{small_server}/openapi.json"]
    command += ["--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "25"]
    command += ["--seed", "1", "--generation-database", "none", "--no-color"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


# --- the playground in a real browser ---

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_playground_streams_text_in_headless_chromium(small_server, reference, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        page.goto(small_server)
        sync_api.expect(page.locator("#model")).to_contain_text("tiny", timeout=30_000)
        # Record every text the output shows, to see it arrive in pieces rather than at once. Each
        # record's new text node is the text after one chunk, so this holds even when a busy machine
        # hands the page all chunks in one network read (the observer's callback then runs once).
        page.evaluate(
            """() => {
                window.seen = [];
                new MutationObserver(records => records.forEach(record => record.addedNodes.forEach(
                    node => window.seen.push(node.textContent)))).observe(
                    document.querySelector('#output'), {childList: true, subtree: true});
            }"""
        )
        page.fill("#prompt", "In the beginning")
        page.fill("#max_tokens", str(SMALL_CAP))
        page.fill("#seed", "7")
        page.fill("#top_k", "")
        page.click("#generate")
        # Done when the final usage chunk has put the prompt's token count in the stats line.
        sync_api.expect(page.locator("#stats")).to_contain_text("prompt", timeout=60_000)
        sync_api.expect(page.locator("#generate")).to_be_enabled(timeout=60_000)
        screenshot = tmp_path / "playground.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"playground screenshot: {screenshot}")
        text, seen = page.inner_text(".completion"), page.evaluate("window.seen")
        stats = page.inner_text("#stats")
        browser.close()
    want = expected(reference, "In the beginning", max_new_tokens=SMALL_CAP, temperature=0.8, seed=7)
    assert text == want.text
    assert len({s for s in seen if s}) > 2  # several partial texts: it streamed
    assert f"prompt {len(encode('In the beginning'))} tokens" in stats
    assert f"{len(want.token_ids)} tokens generated" in stats
