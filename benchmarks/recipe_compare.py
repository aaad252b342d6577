"""The seed's recipe against the modern one at equal tokens: full-pass validation loss, tokens/s, wall time.

    .venv/bin/python benchmarks/recipe_compare.py                          (tiny vs tiny-modern, 0.2M tokens)
    .venv/bin/python benchmarks/recipe_compare.py --tokens 0.2 0.6 2 --json
    .venv/bin/python benchmarks/recipe_compare.py --presets tiny-modern --set muon_lr=0.04   (one sweep point)
    .venv/bin/python benchmarks/recipe_compare.py --tokens 2 --parallel          (presets side by side)
    .venv/bin/python benchmarks/recipe_compare.py --presets tiny-modern tiny-modern:nanochat --tokens 0.2 0.6
                                  (the modern preset against it plus issue 22's nanochat-style bundle)
    .venv/bin/python benchmarks/recipe_compare.py --presets smallgpt-10m smallgpt-10m-modern --tokens 0.2 \
        --data MIXCORPUS_DIR --val-tokens 65536 --set warmup_iters=3 --parallel   (the seed's shape)

Each run builds the `Trainer` that `smallgpt train --preset NAME` builds (data: the bundled corpus by
default), with `max_iters` set so the run sees the budget's tokens (the schedule stretches to fit),
times the updates alone, then scores the whole validation split (`full_pass_loss`, the number
`smallgpt train` prints last). The presets run one after the other in this process, on the same data
and thread count, so their figures compare. On a shared machine `--parallel` runs them at the same
time instead, one process and one thread each, so both see the same contention; the process CPU time
per token is printed beside the wall time either way. Its sibling `nanochat_peer.py` runs nanochat's own
recipe at tiny-modern's shape and prints the same fields, for the peer's row of the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

from smallgpt.config import parse_overrides
from smallgpt.distributed import Runtime
from smallgpt.evaluate import full_pass_loss
from smallgpt.recipe import resolve_config
from smallgpt.train import Trainer

# `PRESET:nanochat`: a modern preset plus what issue 22 took from nanochat that still exports as plain
# Qwen3: the embedding's RMS norm and nanochat's init (`qwen3-embnorm`), a decay over the last 65% to
# 5% of the peak, the head's own rate, the embedding's beta2 0.995, Muon's momentum 0.85 -> 0.97 over
# 100 updates -> 0.90 over the decay. `--set` overrides apply on top (to ablate one piece).
NANOCHAT_BUNDLE = {
    "arch": "qwen3-embnorm", "decay_fraction": 0.65, "min_lr": 0.0006,
    "head_lr": 0.02, "embedding_beta2": 0.995, "muon_momentum": 0.97,
    "muon_momentum_start": 0.85, "muon_momentum_end": 0.90, "muon_momentum_warmup": 100,
}  # fmt: skip


def run_once(
    preset: str, tokens: float, data: Path, overrides: dict[str, str], val_tokens: int | None = None
) -> dict:
    """Train `preset` for `tokens` tokens; its final validation loss (over the first `val_tokens`
    of the split, default all of it) and timings."""
    name, _, variant = preset.partition(":")
    if variant not in ("", "nanochat"):
        raise SystemExit(f"unknown recipe variant {variant!r} (known: nanochat)")
    settings = {**NANOCHAT_BUNDLE, **overrides} if variant else overrides
    probe = resolve_config(name, overrides=settings)
    per_update = probe.train.batch_size * probe.model.block_size
    updates = max(1, round(tokens / per_update))
    quiet = {"eval_interval": updates, "sample_tokens": 0, "device": "cpu"}  # one checkpoint, at the end
    run = resolve_config(name, overrides={**settings, **quiet, "max_iters": updates})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(run, data, Path(out), Runtime(0, 0, 1, torch.device("cpu")), Console(quiet=True))
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(updates):
            loss = trainer.update()
        last_loss = loss.item()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        val_loss = full_pass_loss(
            trainer.model,
            trainer.val_tokens,
            run.train.micro_batch_size,
            trainer.rt,
            trainer.dtype,
            max_tokens=val_tokens,
        )
    trained = updates * per_update
    return run_record(
        preset, overrides, updates, trained, val_loss, val_tokens or len(trainer.val_tokens), last_loss,
        seconds, cpu_seconds,
    )  # fmt: skip


def run_record(
    preset: str, overrides: dict, updates: int, trained: int, val_loss: float, val_tokens: int,
    last_loss: float, seconds: float, cpu_seconds: float, timed: int | None = None,
) -> dict:  # fmt: skip
    """One run's figures, the fields every recipe table prints (`nanochat_peer.py` returns them too).
    `timed`: the tokens the clock saw, when it missed some (default: all `trained`)."""
    timed = timed or trained
    return {
        "preset": preset,
        "overrides": overrides,
        "tokens": trained,
        "updates": updates,
        "val_loss": val_loss,
        "val_tokens": val_tokens,
        "last_train_loss": last_loss,
        "train_seconds": seconds,
        "tokens_per_s": timed / seconds,
        "cpu_us_per_token": cpu_seconds / timed * 1e6,
        "threads": torch.get_num_threads(),
    }


def print_record(millions: float, record: dict, as_json: bool) -> None:
    """A run as one JSON line, or as one line of the table."""
    if as_json:
        print(json.dumps(record), flush=True)
        return
    r = record
    print(
        f"{millions:g}M tokens  {r['preset']:<20} val loss {r['val_loss']:.3f}   "
        f"{r['tokens_per_s']:,.0f} tokens/s   {r['train_seconds']:,.0f} s   "
        f"CPU {r['cpu_us_per_token']:,.0f} us/token   {r['overrides'] or ''}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny-modern"])
    parser.add_argument("--tokens", nargs="+", type=float, default=[0.2], help="budgets in millions")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    parser.add_argument("--data", help="prepared data dir (default: the bundled corpus)")
    parser.add_argument("--val-tokens", type=int, help="score only the split's first N tokens")
    parser.add_argument("--parallel", action="store_true", help="presets at once, 1 thread each")
    parser.add_argument("--json", action="store_true", help="one JSON line per run")
    args = parser.parse_args()
    if args.data is None:
        from smallgpt.prepare import default_data_dir

        args.data = default_data_dir()
    overrides = parse_overrides(args.set)
    for millions in args.tokens:
        jobs = [
            (preset, millions * 1e6, Path(args.data), overrides, args.val_tokens) for preset in args.presets
        ]
        if args.parallel:
            with ProcessPoolExecutor(len(jobs), initializer=torch.set_num_threads, initargs=(1,)) as pool:
                results = list(pool.map(run_once, *zip(*jobs, strict=True)))
        else:
            results = [run_once(*job) for job in jobs]
        for r in results:
            print_record(millions, r, args.json)
        if not args.json and len(results) > 1:
            base = results[0]
            for r in results[1:]:
                print(
                    f"  {r['preset']} - {base['preset']}: {r['val_loss'] - base['val_loss']:+.3f} nats, "
                    f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}x wall time per token",
                    flush=True,
                )


if __name__ == "__main__":
    main()
