"""`smallgpt sample`: a trained model continues prompts, its text printed as it is generated.

Every sample of every prompt decodes in one `Engine` batch; the sample on screen is printed token by
token while the others advance in the same steps, and each ends with a one-line summary on stderr.
Also here: the sample a training run prints when it ends (`print_training_sample`).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from smallgpt.checkpoint import load_model
from smallgpt.distributed import pick_device
from smallgpt.engine import Engine
from smallgpt.errors import SmallGPTError
from smallgpt.generate import SamplingParams, quantize_int8
from smallgpt.kvcache import bucket
from smallgpt.model import GPT
from smallgpt.recipe import TrainConfig

MAX_SAMPLE_BATCH = 64  # more samples than this wait for a free row


def sample_command(
    checkpoint: str,
    prompts: list[str],
    params: SamplingParams,
    *,
    prompt_file: str | None = None,
    num_samples: int = 1,
    interactive: bool = False,
    device: str = "auto",
    int8: bool = False,
    err_console: Console,
) -> None:
    """Print `num_samples` continuations of each prompt (and of `prompt_file`'s text); with
    `interactive`, then read prompts from stdin until it ends."""
    if params.max_new_tokens < 1:
        raise SmallGPTError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    if num_samples < 1:
        raise SmallGPTError(f"num_samples must be at least 1, got {num_samples}")
    prompts = list(prompts)
    if prompt_file is not None:
        try:
            prompts.append(Path(prompt_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise SmallGPTError(f"cannot read prompt file {prompt_file}: {exc}") from None
    model = load_model(checkpoint, pick_device(device))
    # Rows in powers of two, as the server's default pool: decode steps then run at the same sizes,
    # and a seeded sample is the text the server gives the same request alone (see `DecodeStep`).
    rows = bucket(max(len(prompts), 1) * num_samples, MAX_SAMPLE_BATCH)
    engine = Engine(quantize_int8(model) if int8 else model, max_batch=rows)
    if prompts or not interactive:
        print_samples(engine, prompts or [""], params, num_samples, err_console)
    while interactive:
        try:
            line = input("prompt> ")
        except EOFError:
            break
        print_samples(engine, [line], params, num_samples, err_console)


def print_samples(
    engine: Engine, prompts: list[str], params: SamplingParams, num_samples: int, err_console: Console
) -> None:
    """Generate `num_samples` continuations of each prompt in one batch; print them one after another,
    the one on screen as its tokens come, and a one-line summary of each to stderr."""
    if "" in prompts:
        err_console.print("note: empty prompt: starting from <|endoftext|>", highlight=False)
    shown = [p for p in prompts for _ in range(num_samples)]
    sequences = [engine.submit(request) for request in engine.requests(prompts, params, num_samples)]
    start, finished_at, printed = time.perf_counter(), {}, 0
    for i, sequence in enumerate(sequences):
        print(("-" * 40 + "\n" if i else "") + shown[i], end="", flush=True)
        while True:
            print(sequence.output[printed:], end="", flush=True)
            printed = len(sequence.output)
            if sequence.done:
                break
            engine.step()
            now = time.perf_counter()
            finished_at.update((j, now) for j, s in enumerate(sequences) if s.done and j not in finished_at)
        print(flush=True)
        printed, tokens = 0, len(sequence.token_ids)
        rate = tokens / (finished_at.get(i, time.perf_counter()) - start)
        summary = f"[{tokens} tokens, {rate:.0f} tokens/s, finish: {sequence.finish_reason}]"
        err_console.print(summary, highlight=False, markup=False)


def print_training_sample(model: GPT, cfg: TrainConfig, console: Console) -> None:
    """The text a run prints when its training ends: `sample_tokens` tokens from <|endoftext|>."""
    params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed)
    text = Engine(model, max_batch=1).generate([""], params)[0].text
    console.print("\nsample (temperature 0.8, top-k 200):", style="bold")
    console.print(text, markup=False, highlight=False)
