"""Load on `smallgpt serve`: many clients at once against a `tiny` model, on this machine.

    .venv/bin/python benchmarks/serve_load.py                 (1,000 requests; about 1-3 minutes on 2 cores)
    .venv/bin/python benchmarks/serve_load.py --compare       (batching vs --max-batch 1, same run)

Starts `smallgpt serve` in a child process on a free 127.0.0.1 port (a random-weight `tiny` checkpoint
unless --checkpoint is given), then sends --requests completions from --concurrency client threads,
each with keep-alive, max_tokens 16 by default, seed = request number. Every response must be a 200
with one choice and usage counts, else it counts as a failure. Prints requests/s, latency percentiles
and generated tokens/s. Only loopback is contacted; each request has a timeout and the whole run a
deadline, so it always ends.

--compare measures what continuous batching buys, both servers in the same run on the same machine:
generated tokens/s at --concurrency 16 with --max-batch 16 against the one-at-a-time baseline
(--max-batch 1), and on the batching server the wall time of 16 simultaneous requests against one
alone (median of --repeats each).
"""

import argparse
import http.client
import json
import os
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
    checkpoint: Path, log_path: Path, max_batch: int, threads: int | None
) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "smallgpt",
        "serve",
        str(checkpoint),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-batch",
        str(max_batch),
    ]
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


def compare(args, checkpoint: Path, tmp: Path, bodies: list[dict]) -> int:
    """Batching (--max-batch 16) against one at a time (--max-batch 1); returns the failure count."""
    rates, failed = {}, 0
    for max_batch in (1, 16):
        server, port = start_server(checkpoint, tmp / f"server-{max_batch}.log", max_batch, args.threads)
        try:
            run_load(port, bodies[:16], args.concurrency, args.deadline, args.stream)  # warm-up
            print(f"--max-batch {max_batch}:")
            results, failures, wall = run_load(port, bodies, args.concurrency, args.deadline, args.stream)
            rates[max_batch], failed = report(results, failures, wall, args.stream), failed + len(failures)
            if max_batch == 16:
                one, sixteen = [], []
                for _ in range(args.repeats):
                    one.append(run_load(port, bodies[:1], 1, args.deadline, args.stream)[2])
                    sixteen.append(run_load(port, bodies[:16], 16, args.deadline, args.stream)[2])
                one_s, sixteen_s = statistics.median(one), statistics.median(sixteen)
                print(f"one request alone: {one_s * 1000:.0f} ms; 16 at once: {sixteen_s * 1000:.0f} ms "
                      f"= {sixteen_s / one_s:.1f}x (median of {args.repeats})")  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"batching speed-up: {rates[16] / rates[1]:.1f}x the generated tokens/s of --max-batch 1")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="default 1000; 160 with --compare")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--compare", action="store_true", help="--max-batch 16 against 1, same run")
    parser.add_argument("--repeats", type=int, default=5, help="--compare: timings of 1 vs 16 requests")
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
            failed = compare(args, checkpoint, Path(tmp), bodies)
        else:
            server, port = start_server(checkpoint, Path(tmp) / "server.log", args.max_batch, args.threads)
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
