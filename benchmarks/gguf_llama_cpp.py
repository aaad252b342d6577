"""llama.cpp runs SmallGPT's GGUF exports as SmallGPT does: greedy tokens compared, type by type.

For each run and each GGUF type (f32, f16, q8_0) the run is exported, loaded by llama.cpp itself
(through llama-cpp-python, which builds llama.cpp from source: `pip install llama-cpp-python`), and
each prompt is continued greedily by both:
  - tokenizer: llama.cpp's tokens for the prompt equal ours;
  - free-running: llama.cpp's own greedy continuation against ours (identical? common prefix);
  - teacher-forced: llama.cpp's top token at every position of our continuation, against ours (the
    share that agree; one early flip does not sink the rest, as it does free-running).
Exit status 1 unless f32 is identical everywhere and q8_0 agrees on >= 90% of tokens.

    PYTHONPATH=src python benchmarks/gguf_llama_cpp.py runs/tiny-modern runs/tiny [--tokens 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from smallgpt.checkpoint import load_model
from smallgpt.engine import Engine
from smallgpt.generate import SamplingParams
from smallgpt.interop_gguf import TYPES, export_to_gguf
from smallgpt.tokenizer import encode

PROMPTS = [
    "It is a truth universally acknowledged",
    "Once upon a time",
    "The meaning of life is",
    "CHAPTER I",
]


def llama_greedy(llm, prompt: list[int], tokens: int) -> list[int]:
    """llama.cpp's greedy continuation: the top token of its logits, fed back, `tokens` times."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def llama_top_tokens(llm, prompt: list[int], continuation: list[int]) -> list[int]:
    """llama.cpp's top token at each position of `continuation`, given everything before it."""
    llm.reset()
    llm.eval(prompt + continuation[:-1])
    start = len(prompt) - 1
    return [int(np.argmax(llm.scores[start + i])) for i in range(len(continuation))]


def main() -> int:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run dirs or checkpoints to export")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"llama-cpp-python {llama_cpp.__version__}; {len(PROMPTS)} prompts x {args.tokens} greedy tokens")
    print(f"{'run':<22} {'arch':<6} {'type':<5} {'MB':>6} {'tokenizer':>9} {'identical':>9} "
          f"{'common prefix':>13} {'teacher-forced':>14}")  # fmt: skip
    ok = True
    for run in args.runs:
        model = load_model(run)
        engine = Engine(model)
        ours = [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(args.tokens, temperature=0))]
        for type_name in TYPES:
            with tempfile.TemporaryDirectory() as tmp:
                path = export_to_gguf(run, Path(tmp) / "model.gguf", type_name=type_name)
                size = path.stat().st_size / 1e6
                llm = llama_cpp.Llama(
                    str(path), n_ctx=model.config.block_size, n_threads=1, logits_all=True, verbose=False
                )
                same_tokens, identical, prefix, agree = 0, 0, 0, 0
                for prompt, continuation in zip(PROMPTS, ours, strict=True):
                    ids = encode(prompt)
                    same_tokens += llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
                    theirs = llama_greedy(llm, ids, args.tokens)
                    identical += theirs == continuation
                    prefix += next(
                        (i for i, (a, b) in enumerate(zip(theirs, continuation, strict=True)) if a != b),
                        args.tokens,
                    )
                    top = llama_top_tokens(llm, ids, continuation)
                    agree += sum(a == b for a, b in zip(top, continuation, strict=True))
                del llm
            n = len(PROMPTS)
            share = agree / (n * args.tokens)
            print(f"{Path(run).name:<22} {model.config.arch:<6} {type_name:<5} {size:6.1f} "
                  f"{same_tokens:>7}/{n} {identical:>7}/{n} {prefix / n:>13.1f} {share:>13.1%}")  # fmt: skip
            if (
                (type_name == "f32" and identical < n)
                or (type_name == "q8_0" and share < 0.9)
                or same_tokens < n
            ):
                ok = False
    print("PASS" if ok else "FAIL: f32 must match exactly, q8_0 on >= 90% of tokens")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
