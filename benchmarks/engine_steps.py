"""What a decode step costs at 1 busy row and at 16, in-process (no HTTP), and where the time goes.

    .venv/bin/python benchmarks/engine_steps.py [--preset tiny] [--threads 1] [--rounds 3]

The batching figure of `serve_load.py --compare` (16 concurrent clients' tokens/s against a
--max-batch 1 server's) cannot exceed what the engine gives alone: 16 tokens per 16-row step against
one per one-row step. This keeps 1, then 16, seeded sequences decoding in one `Engine` (pool of 16
rows, random weights), alternated --rounds times, and prints the median wall time of `Engine.step`
over --steps steps with its two parts: sampling (`Engine._sample`, one token per row) and the
decode forward (`DecodeStep`, the model over the step's rows), then 16 x (1-row step) / (16-row step).

On a CPU with MKL the steps of 4+ rows run a twin of the model with packed matmul weights
(`smallgpt.generate.packed_for_decoding`); the steps then alternate between the twin and the plain
model, 10 steps each in turn (a box's speed can drift within seconds, so only interleaved steps
compare; single steps in turn would make the two copies of the weights evict each other from the
cache, which a server running one of them never does), and it prints both and what packing saves
on a 16-row step.
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

TURN = 10  # steps per variant in turn


def timed(timings: list[dict], part: str, function):
    """`function`, adding each call's wall time to timings[0][part] (the variant being timed)."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        timings[0][part].append(time.perf_counter() - started)
        return result

    return wrapper


def step_times(engine: Engine, timings: list[dict], rows: int, steps: int, variants: dict) -> dict:
    """{variant: median ms per step and per part} with `rows` sequences decoding, the variants (the
    decode step's packed twin, or None) taking turns every TURN steps, after a few warm-up steps."""
    prompts = [f"Request {i} says" for i in range(rows)]
    params = SamplingParams(steps + 20, seed=1)
    sequences = [engine.submit(r) for r in engine.requests(prompts, params)]
    for _ in range(8):  # the prompts are fed, the steps run at `rows` rows from here on
        engine.step()
    measured = {name: defaultdict(list) for name in variants}
    for i in range(steps):
        name = list(variants)[i // TURN % len(variants)]
        engine.decode.packed, timings[0] = variants[name], measured[name]
        started = time.perf_counter()
        engine.step()
        measured[name]["step"].append(time.perf_counter() - started)
    for sequence in sequences:
        sequence.cancelled = True
    engine.step()
    return {
        name: {part: statistics.median(values) * 1000 for part, values in parts.items()}
        for name, parts in measured.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = Engine(GPT(get_preset(args.preset)).eval(), max_batch=16)
    timings = [defaultdict(list)]
    engine._sample = timed(timings, "sampling", engine._sample)
    engine.decode._run = timed(timings, "forward", engine.decode._run)
    variants = {"packed": engine.decode.packed, "plain": None}
    if variants["packed"] is None:  # (no packing here: not a CPU with MKL)
        del variants["packed"]
    print(f"{args.preset}, {args.threads} torch thread(s), median ms of {args.steps} steps:")
    for _ in range(args.rounds):
        one, sixteen = (
            step_times(engine, timings, rows, args.steps * len(variants), variants) for rows in (1, 16)
        )
        for name in variants:
            for rows, parts in ((1, one[name]), (16, sixteen[name])):
                print(f"  {name:6s} {rows:2d} rows: step {parts['step']:5.2f} = sampling "
                      f"{parts['sampling']:5.2f} + forward {parts['forward']:5.2f} + the rest")  # fmt: skip
            ratio = 16 * one[name]["step"] / sixteen[name]["step"]
            print(f"  {name:6s} 16 x (1-row step) / (16-row step) = {ratio:.2f}x")
        if len(variants) == 2:
            print(
                f"  16-row step, plain / packed = {sixteen['plain']['step'] / sixteen['packed']['step']:.2f}x"
            )


if __name__ == "__main__":
    main()
