"""How often a seeded text changes with the batch it runs in (not a timing).

    .venv/bin/python benchmarks/bucket_texts.py [--preset tiny] [--threads 2]

A decode step runs its busy rows padded to 1, 2, 4, 8 or 16 rows, and a matmul's rounding depends on
that size (`smallgpt.kvcache.DecodeStep`). This runs 16 seeded requests (prompts of 1-40 words, 64
tokens, half greedy, half at temperature 1) on a random-weight model, each alone and all 16 together,
in the default engine and in a batch-invariant one, and counts the requests whose tokens differ and
those whose scores (the logits' log-softmax) differ in any bit.
"""

import argparse
import random

import torch

from smallgpt.config import get_preset
from smallgpt.engine import Completion, Engine, Request
from smallgpt.generate import SamplingParams
from smallgpt.model import GPT
from smallgpt.tokenizer import encode


def run(engine: Engine, requests: list[Request]) -> list[Completion]:
    sequences = [engine.submit(r) for r in requests]
    while engine.busy:
        engine.step()
    return [s.completion() for s in sequences]


def differ(a: list[Completion], b: list[Completion]) -> str:
    texts = sum(x.token_ids != y.token_ids for x, y in zip(a, b, strict=True))
    scores = sum([s[1] for s in x.scores] != [s[1] for s in y.scores] for x, y in zip(a, b, strict=True))
    return f"tokens differ in {texts} of {len(a)}, scores in {scores} of {len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, rng = GPT(get_preset(args.preset)).eval(), random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    requests = [
        Request(
            encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))),
            SamplingParams(64, temperature=1.0 if i % 2 else 0.0, seed=i),
            logprobs=0,
        )
        for i in range(16)
    ]
    for invariant in (False, True):
        alone = [run(Engine(model, 16, batch_invariant=invariant), [r])[0] for r in requests]
        together = run(Engine(model, 16, batch_invariant=invariant), requests)
        name = "batch-invariant engine" if invariant else "default engine (buckets)"
        print(f"{name}: alone vs all 16 together: {differ(alone, together)}")


if __name__ == "__main__":
    main()
