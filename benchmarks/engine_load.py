"""Generated tokens/s of the engine alone (no HTTP) under a server-like load, on this machine.

    .venv/bin/python benchmarks/engine_load.py [--load mixed] [--preset tiny] [--threads 2] [--rounds 3]

`clients` sequences are kept in flight in one `Engine` of --max-batch rows (random weights): as soon
as one finishes, the next request joins, as closed-loop HTTP clients would do with no time between
requests. The loads:
  - mixed: like `serve_load.py`'s mixed clients, prompts of 1-60 words (those over 16 tokens are
    prefilled, the rest fed through the decode steps), max_tokens from 1 to 64;
  - identical: "Request i says", 16 tokens each;
  - long: 16-token prompts, 2 x the context of new tokens each (GPT-2's window is recomputed at
    every step once full; a rotary model's cache rolls).
Prints generated tokens/s of each round and their median. To compare two versions of the code, run
this script alternately with each on PYTHONPATH: in-process figures move far less than the server's.
"""

import argparse
import random
import statistics
import time

import torch

from smallgpt.config import get_preset
from smallgpt.engine import Engine
from smallgpt.generate import SamplingParams
from smallgpt.model import GPT

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]


def load(kind: str, count: int, context: int) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens) of each request, the same list in every run."""
    rng = random.Random(0)
    if kind == "mixed":
        prompts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 60))) for _ in range(count)]
        return [(prompt, rng.randint(1, 64)) for prompt in prompts]
    if kind == "identical":
        return [(f"Request {i} says", 16) for i in range(count)]
    return [(" ".join(rng.choices(WORDS, k=16)), 2 * context) for _ in range(count)]


def run(engine: Engine, requests: list[tuple[str, int]], clients: int) -> tuple[float, int]:
    """(wall seconds, tokens generated) with `clients` requests in flight until all are done."""
    pending, running, generated = list(reversed(requests)), [], 0
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < clients:
            prompt, tokens = pending.pop()
            params = SamplingParams(tokens, seed=len(requests) - len(pending))
            running += [engine.submit(r) for r in engine.requests([prompt], params)]
        engine.step()
        for sequence in [s for s in running if s.done]:
            generated += len(sequence.token_ids)
            running.remove(sequence)
    return time.perf_counter() - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=["mixed", "identical", "long"], default="mixed")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = Engine(GPT(get_preset(args.preset)).eval(), max_batch=args.max_batch)
    requests = load(args.load, args.requests, engine.capacity)
    run(engine, requests[: args.clients * 2], args.clients)  # warm-up: every bucket's packing made
    rates = []
    for _ in range(args.rounds):
        wall, generated = run(engine, requests, args.clients)
        rates.append(generated / wall)
        setting = f"{args.load} load, {args.preset}, {args.clients} clients, --max-batch {args.max_batch}"
        print(f"{setting}, {args.threads} thread(s): {generated} tokens in {wall:.2f} s = {rates[-1]:.0f}/s")
    print(f"median: {statistics.median(rates):.0f} generated tokens/s")


if __name__ == "__main__":
    main()
