"""What a decode step costs at 1 busy row and at 16, in-process (no HTTP), and where the time goes.

    .venv/bin/python benchmarks/engine_steps.py [--preset tiny] [--threads 1] [--rounds 3]

The batching figure of `serve_load.py --compare` (16 concurrent clients' tokens/s against a
--max-batch 1 server's) cannot exceed what the engine gives alone: 16 tokens per 16-row step against
one per one-row step. This keeps 1, then 16, seeded sequences decoding in one `Engine` (pool of 16
rows, random weights), alternated --rounds times, and prints the median wall time of `Engine.step`
over --steps steps with its two parts: sampling (`Engine._sample`, one token per row) and the
decode forward (`DecodeStep`, the model over the step's rows), then 16 x (1-row step) / (16-row step).
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch

from smallgpt.config import get_preset
from smallgpt.engine import Engine
from smallgpt.generate import SamplingParams
from smallgpt.model import GPT


def timed(timings: dict, part: str, function):
    """`function`, adding each call's wall time to timings[part]."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        timings[part].append(time.perf_counter() - started)
        return result

    return wrapper


def step_times(engine: Engine, timings: dict, rows: int, steps: int) -> dict[str, float]:
    """Median ms per step (and per part) with `rows` sequences decoding, after a few warm-up steps."""
    prompts = [f"Request {i} says" for i in range(rows)]
    sequences = [engine.submit(r) for r in engine.requests(prompts, SamplingParams(steps + 20, seed=1))]
    for _ in range(8):  # the prompts are fed, the steps run at `rows` rows from here on
        engine.step()
    timings.clear()
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        timings["step"].append(time.perf_counter() - started)
    for sequence in sequences:
        sequence.cancelled = True
    engine.step()
    return {part: statistics.median(values) * 1000 for part, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = Engine(GPT(get_preset(args.preset)).eval(), max_batch=16)
    timings = defaultdict(list)
    engine._sample = timed(timings, "sampling", engine._sample)
    engine.decode._run = timed(timings, "forward", engine.decode._run)
    print(f"{args.preset}, {args.threads} torch thread(s), median ms of {args.steps} steps:")
    for _ in range(args.rounds):
        one, sixteen = (step_times(engine, timings, rows, args.steps) for rows in (1, 16))
        for rows, parts in ((1, one), (16, sixteen)):
            print(f"  {rows:2d} rows: step {parts['step']:5.2f} = sampling {parts['sampling']:5.2f} "
                  f"+ forward {parts['forward']:5.2f} + the rest")  # fmt: skip
        print(f"  16 x (1-row step) / (16-row step) = {16 * one['step'] / sixteen['step']:.2f}x")


if __name__ == "__main__":
    main()
