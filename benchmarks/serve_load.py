"""Load on `smallgpt serve`: many clients at once against a `tiny` model, on this machine.

    .venv/bin/python benchmarks/serve_load.py                 (1,000 requests; about 1-3 minutes on 2 cores)
    .venv/bin/python benchmarks/serve_load.py --compare       (batching vs --max-batch 1, same run)

Starts `smallgpt serve` in a child process on a free 127.0.0.1 port (a random-weight `tiny` checkpoint
unless --checkpoint is given), then sends --requests completions from --concurrency client threads,
each with keep-alive, max_tokens 16 by default, seed = request number. Every response must be a 200
with one choice and usage counts, else it counts as a failure. Prints requests/s, latency percentiles
and generated tokens/s. Only loopback is contacted; each request has a timeout and the whole run a
deadline, so it always ends.

--compare measures what continuous batching buys and what a lone request pays for it, with a
--max-batch 1 server and a default (--max-batch 16) one running side by side (and, with --invariant,
a --batch-invariant one):
  - one request alone (--lone-tokens sampled tokens), sent to each server in turn, --repeats times;
  - generated tokens/s at --concurrency, --max-batch 16 against 1, for identical clients (all
    max_tokens alike: they move in waves) and for mixed ones (prompts of 1-60 words, max_tokens from 1
    to 4x --max-tokens, so sequences join and leave at every step);
  - on the default server, the wall time of 16 simultaneous requests against one alone.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.progress import Progress

REQUEST_TIMEOUT_S = 120


def random_tiny_checkpoint(directory: Path) -> Path:
    import torch

    from smallgpt.checkpoint import save_weights
    from smallgpt.config import get_preset
    from smallgpt.model import GPT

    torch.manual_seed(0)
    path = directory / "tiny.safetensors"
    save_weights(GPT(get_preset("tiny")), path)
    return path


def start_server(
    checkpoint: Path, log_path: Path, options: list[str], threads: int | None
) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "smallgpt", "serve", str(checkpoint), "--port", str(port)]
    command += ["--device", "cpu", *options]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"server did not start; its log:\n{log_path.read_text()}")


def client_call(
    connections: threading.local, port: int, body: dict, stream: bool
) -> tuple[float, float, int]:
    """(latency s, time to first text s, completion tokens) of one request; raises on any failure."""
    if not hasattr(connections, "http"):
        connections.http = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    started = time.perf_counter()
    try:
        connections.http.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connections.http.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        if not stream:
            reply = json.loads(response.read())
            assert len(reply["choices"]) == 1 and reply["choices"][0]["finish_reason"] in ("stop", "length")
            return (
                time.perf_counter() - started,
                time.perf_counter() - started,
                reply["usage"]["completion_tokens"],
            )
        first, tokens, done = None, 0, False
        for line in response:  # server-sent events: "data: {...}" lines, "data: [DONE]" last
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                first = first or time.perf_counter()
                tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
        assert done and tokens > 0, "stream ended without [DONE] or usage"
        return time.perf_counter() - started, first - started, tokens
    except Exception:
        connections.http.close()
        del connections.http  # a fresh connection for this thread's next request
        raise


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_load(port: int, bodies: list[dict], concurrency: int, deadline: float, stream: bool):
    """Send every body from `concurrency` threads; (results, failures, wall seconds)."""
    connections, results, failures = threading.local(), [], []
    with ThreadPoolExecutor(concurrency) as pool, Progress(transient=True) as progress:
        task = progress.add_task("requests", total=len(bodies))
        started = time.perf_counter()
        futures = [pool.submit(client_call, connections, port, body, stream) for body in bodies]
        for future in futures:
            remaining = deadline - (time.perf_counter() - started)
            try:
                results.append(future.result(timeout=max(remaining, 0.001)))
            except Exception as exc:
                failures.append(repr(exc))
                if remaining <= 0:
                    pool.shutdown(cancel_futures=True)
            progress.advance(task)
        wall = time.perf_counter() - started
    return results, failures, wall


def report(results, failures, wall: float, stream: bool) -> float:
    """Print the run's figures; returns generated tokens/s."""
    latencies = [r[0] for r in results]
    print(f"failures:     {len(failures)}" + (f"  (first: {failures[0]})" if failures else ""))
    tokens_per_s = sum(r[2] for r in results) / wall
    if len(latencies) >= 2:
        print(f"throughput:   {len(results) / wall:.1f} requests/s, {tokens_per_s:.0f} generated tokens/s")
        p50, p99 = (percentile(latencies, q) * 1000 for q in (50, 99))
        print(f"latency:      p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        if stream:
            print(f"first text:   p50 {percentile([r[1] for r in results], 50) * 1000:.0f} ms")
    print(f"wall time:    {wall:.1f} s")
    return tokens_per_s


def mixed_bodies(body: dict, count: int, max_tokens: int) -> list[dict]:
    """Clients unlike each other: prompts of 1 to 60 words (short ones are fed through the decode
    steps, long ones prefilled), max_tokens from 1 to 4 x `max_tokens`; the same list in every run."""
    rng, words = random.Random(0), ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    return [
        {
            **body,
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))),
            "max_tokens": rng.randint(1, 4 * max_tokens),
            "seed": i,
        }
        for i in range(count)
    ]


def compare(args, checkpoint: Path, tmp: Path, bodies: list[dict], mixed: list[dict]) -> int:
    """A lone request on each server in turn, then batching (--max-batch 16) against one at a time
    (--max-batch 1) under both loads; returns the failure count."""
    servers = {"--max-batch 1": ["--max-batch", "1"], "--max-batch 16": ["--max-batch", "16"]}
    if args.invariant:
        servers["--max-batch 16 --batch-invariant"] = ["--max-batch", "16", "--batch-invariant"]
    running, failed = {}, 0
    try:
        for i, (name, options) in enumerate(servers.items()):
            running[name] = start_server(checkpoint, tmp / f"server-{i}.log", options, args.threads)
        ports = {name: port for name, (_, port) in running.items()}
        for port in ports.values():
            run_load(port, bodies[:16], args.concurrency, args.deadline, args.stream)  # warm-up
        alone = {**bodies[0], "max_tokens": args.lone_tokens}
        times, tokens = {name: [] for name in ports}, {}
        for _ in range(args.repeats):  # alternated: each server in turn, the same seeded request
            for name, port in ports.items():
                results, failures, wall = run_load(port, [alone], 1, args.deadline, args.stream)
                failed += len(failures)
                times[name].append(wall)
                tokens[name] = results[0][2] if results else 0
        print(f"one request alone (max_tokens {args.lone_tokens}), best / median of {args.repeats}:")
        best_one = min(times["--max-batch 1"])
        for name, walls in times.items():
            best, median = min(walls), statistics.median(walls)
            rate = tokens[name] / best
            print(f"  {name:32s} {best * 1000:6.0f} / {median * 1000:6.0f} ms, {tokens[name]} tokens, "
                  f"{rate:4.0f} tokens/s: {best / best_one:.2f}x the time at --max-batch 1")  # fmt: skip
        for load, load_bodies in (("identical clients", bodies), ("mixed lengths", mixed)):
            rates = {}
            for name in ("--max-batch 1", "--max-batch 16"):
                print(f"{load}, {name}:")
                results, failures, wall = run_load(
                    ports[name], load_bodies, args.concurrency, args.deadline, args.stream
                )
                rates[name], failed = report(results, failures, wall, args.stream), failed + len(failures)
            speed_up = rates["--max-batch 16"] / rates["--max-batch 1"]
            print(f"{load}: batching speed-up {speed_up:.1f}x the generated tokens/s of --max-batch 1")
        one, sixteen = [], []
        for _ in range(args.repeats):
            one.append(run_load(ports["--max-batch 16"], bodies[:1], 1, args.deadline, args.stream)[2])
            sixteen.append(run_load(ports["--max-batch 16"], bodies[:16], 16, args.deadline, args.stream)[2])
        one_s, sixteen_s = statistics.median(one), statistics.median(sixteen)
        print(f"--max-batch 16: one request alone {one_s * 1000:.0f} ms; 16 at once "
              f"{sixteen_s * 1000:.0f} ms = {sixteen_s / one_s:.1f}x (median of {args.repeats})")  # fmt: skip
    finally:
        for server, _ in running.values():
            server.terminate()
            server.wait(timeout=30)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="default 1000; 160 with --compare")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--compare", action="store_true", help="--max-batch 16 against 1, same run")
    parser.add_argument("--repeats", type=int, default=5, help="--compare: timings of 1 vs 16 requests")
    parser.add_argument("--lone-tokens", type=int, default=96, help="--compare: tokens of the lone request")
    parser.add_argument("--invariant", action="store_true", help="--compare: a --batch-invariant server too")
    parser.add_argument("--stream", action="store_true", help="stream every response (SSE)")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    parser.add_argument("--checkpoint", help="model to serve (default: a random-weight tiny model)")
    parser.add_argument("--deadline", type=float, default=900, help="give up after this many seconds")
    args = parser.parse_args()
    requests = args.requests or (160 if args.compare else 1000)

    body = {"max_tokens": args.max_tokens, "stream": args.stream}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    bodies = [{**body, "prompt": f"Request {i} says", "seed": i} for i in range(requests)]
    print(f"server:       smallgpt serve {args.checkpoint or 'a random-weight tiny model'} on 127.0.0.1")
    load = f"{requests} requests, {args.concurrency} at a time, max_tokens {args.max_tokens}"
    print(f"load:         {load}{', streamed' if args.stream else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_tiny_checkpoint(Path(tmp))
        if args.compare:
            mixed = mixed_bodies(body, requests, args.max_tokens)
            failed = compare(args, checkpoint, Path(tmp), bodies, mixed)
        else:
            options = ["--max-batch", str(args.max_batch)]
            server, port = start_server(checkpoint, Path(tmp) / "server.log", options, args.threads)
            try:
                results, failures, wall = run_load(port, bodies, args.concurrency, args.deadline, args.stream)
            finally:
                server.terminate()
                server.wait(timeout=30)
            print(f"--max-batch {args.max_batch}:")
            report(results, failures, wall, args.stream)
            failed = len(failures)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
