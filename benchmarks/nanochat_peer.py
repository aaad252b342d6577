"""nanochat's base-training recipe at tiny-modern's shape: the same-run peer for `recipe_compare.py`.

    .venv/bin/python benchmarks/nanochat_peer.py --nanochat NANOCHAT --tokens 0.2 0.6 --json

NANOCHAT is a checkout of github.com/karpathy/nanochat (issue 22 ran commit 92d63d4); nothing of it is
copied here. Its `GPT` is built at tiny-modern's shape (layers, width, heads, context, GPT-2's vocabulary,
which its code pads to a multiple of 64) and initialised by its `init_weights`; its `setup_optimizer`
gives its Muon + AdamW with `scripts/base_train.py`'s default reference rates, not rescaled for our
batch (its rule, rates x sqrt(batch / 2^19), is tuned for batches 500x ours), and weight decay likewise
unscaled (`--weight-decay W` replaces its 0.28, e.g. by the ~0.21 its rule gives at this shape).
The schedules are base_train.py's own functions (warm-up, warm-down to 5% over the last 65%,
Muon momentum 0.85 -> 0.97 -> 0.90, cosine weight decay), read out of that script with its argument
defaults rather than rewritten. Each update is 8 x 128 tokens from SmallGPT's `RandomBatches` (seed
1337) over the training split, the windows issue 22's run used (tiny-modern itself now samples in
epochs), and the score is `full_pass_loss`, the number `smallgpt train` prints last, through a thin
wrapper. The JSON lines carry recipe_compare.py's fields, so the two tables line up.

On a CPU its package runs unchanged: NANOCHAT_DTYPE=float32 is set before the import (its CPU default
anyway), attention takes its SDPA fallback (no flash-attention kernels), its optimizer's own
`torch.compile`d steps compile for the CPU (needs a C compiler; the timings start after the first
update, so that one-off compile is not counted), and the model runs eager (base_train.py
compiles it; same maths). No distributed init is needed: without a process group its optimizer owns
every parameter.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import torch
from recipe_compare import print_record, run_record  # the record every recipe table prints (same dir)

from smallgpt.distributed import Runtime
from smallgpt.evaluate import full_pass_loss
from smallgpt.loader import RandomBatches, load_split
from smallgpt.recipe import resolve_config

SHAPE = resolve_config("tiny-modern")
MICRO_BATCH = 8  # sequences per update, as tiny-modern's batch
SCHEDULES = ("get_lr_multiplier", "get_muon_momentum", "get_weight_decay")


def base_train_recipe(
    script: Path, num_iterations: int, weight_decay: float | None = None
) -> tuple[argparse.Namespace, dict]:
    """base_train.py's argument defaults and its schedule functions for a run of `num_iterations`,
    Muon's weight decay peaking at `weight_decay` (default: the script's reference value).

    The script trains when run, so its `parser.add_argument` calls and its three schedule functions
    are lifted from its syntax tree and run alone, with the globals they read."""
    tree = ast.parse(script.read_text())
    arguments = [
        node
        for node in tree.body
        if isinstance(node, ast.Expr) and ast.unparse(node).startswith("parser.add_argument(")
    ]
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in SCHEDULES]
    if len(functions) != len(SCHEDULES):
        raise SystemExit(f"{script} lacks one of {', '.join(SCHEDULES)}: not the nanochat this expects")
    parser = argparse.ArgumentParser()
    exec(compile(ast.Module(arguments, []), str(script), "exec"), {"parser": parser})
    defaults = parser.parse_args([])
    if weight_decay is not None:
        defaults.weight_decay = weight_decay
    # "No batch rescaling": the reference weight decay as it stands, as the reference rates.
    scope = {"args": defaults, "num_iterations": num_iterations, "weight_decay_scaled": defaults.weight_decay}
    exec(compile("import math", str(script), "exec"), scope)
    exec(compile(ast.Module(functions, []), str(script), "exec"), scope)
    return defaults, {name: scope[name] for name in SCHEDULES}


class Scored(torch.nn.Module):
    """nanochat's GPT as `full_pass_loss` expects a model: `config.block_size`, and `model(x, y)` -> loss."""

    def __init__(self, gpt: torch.nn.Module, block_size: int) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = argparse.Namespace(block_size=block_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gpt(x, y)


def run_once(
    nanochat: Path,
    tokens: float,
    data: Path,
    val_tokens: int | None = None,
    weight_decay: float | None = None,
) -> dict:
    """Train nanochat's recipe for `tokens` tokens at tiny-modern's shape; recipe_compare.py's fields."""
    from nanochat.gpt import GPT, GPTConfig

    shape = SHAPE.model
    per_update = MICRO_BATCH * shape.block_size
    updates = max(1, round(tokens / per_update))
    defaults, schedule = base_train_recipe(nanochat / "scripts" / "base_train.py", updates, weight_decay)
    config = GPTConfig(
        sequence_len=shape.block_size, vocab_size=shape.vocab_size, n_layer=shape.n_layer,
        n_head=shape.n_head, n_kv_head=shape.n_head, n_embd=shape.n_embd,
        window_pattern=defaults.window_pattern,
    )  # fmt: skip
    torch.manual_seed(1337)
    with contextlib.redirect_stdout(io.StringIO()):  # its notes on padding and rate scaling
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        model.init_weights()
        optimizer = model.setup_optimizer(
            unembedding_lr=defaults.unembedding_lr, embedding_lr=defaults.embedding_lr,
            scalar_lr=defaults.scalar_lr, matrix_lr=defaults.matrix_lr, weight_decay=defaults.weight_decay,
        )  # fmt: skip
    batches = RandomBatches(load_split(data, "train", shape.vocab_size), shape.block_size, MICRO_BATCH, 1337)
    for step in range(updates):  # base_train.py's update, one micro-batch per step
        if step == min(1, updates - 1):  # the clock starts after its optimizer's one-off compile
            started, cpu_started = time.perf_counter(), time.process_time()
        x, y = batches.next_batch()
        loss = model(x, y)
        loss.backward()
        lr_multiplier = schedule["get_lr_multiplier"](step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                group["momentum"] = schedule["get_muon_momentum"](step)
                group["weight_decay"] = schedule["get_weight_decay"](step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    val = load_split(data, "val", shape.vocab_size)
    cpu = Runtime(0, 0, 1, torch.device("cpu"))
    val_loss = full_pass_loss(
        Scored(model, shape.block_size), val, MICRO_BATCH, cpu, torch.float32, max_tokens=val_tokens
    )
    trained, timed = updates * per_update, max(updates - 1, 1) * per_update
    overrides = {} if weight_decay is None else {"weight_decay": weight_decay}
    return run_record(
        "nanochat@tiny-modern", overrides, updates, trained, val_loss, val_tokens or len(val), loss.item(),
        seconds, cpu_seconds, timed,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat", required=True, type=Path, help="a nanochat checkout")
    parser.add_argument("--tokens", nargs="+", type=float, default=[0.2], help="budgets in millions")
    parser.add_argument("--data", help="prepared data dir (default: the bundled corpus)")
    parser.add_argument("--val-tokens", type=int, help="score only the split's first N tokens")
    parser.add_argument("--weight-decay", type=float, help="Muon's peak weight decay (default: base_train's)")
    parser.add_argument("--json", action="store_true", help="one JSON line per run")
    args = parser.parse_args()
    if not (args.nanochat / "nanochat" / "gpt.py").is_file():
        raise SystemExit(f"{args.nanochat} is not a nanochat checkout (no nanochat/gpt.py)")
    if args.data is None:
        from smallgpt.prepare import default_data_dir

        args.data = default_data_dir()
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    sys.path.insert(0, str(args.nanochat))
    for millions in args.tokens:
        r = run_once(args.nanochat, millions * 1e6, Path(args.data), args.val_tokens, args.weight_decay)
        print_record(millions, r, args.json)


if __name__ == "__main__":
    main()
