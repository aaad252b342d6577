"""Which run `smallgpt train` starts: a new one, a resumed one, or one initialised from weights.

The command line gives a preset, a TOML file and `key=value` words (`smallgpt.recipe` turns them into a
`RunConfig`); `--resume RUN_DIR` reads the run's own config, data and step from its newest checkpoint
and keeps its learning-rate schedule. Then `smallgpt.train.train` runs it (fitting the micro-batch to
the world size under torchrun, unless the user chose one). `smallgpt model` shows the same RunConfig
before any of it runs (`model_command`, `model_summary`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from smallgpt.checkpoint import RunStart, read_model_config
from smallgpt.config import parse_overrides
from smallgpt.errors import SmallGPTError
from smallgpt.model import GPT
from smallgpt.recipe import RunConfig, config_file_keys, resolve_config
from smallgpt.train import TrainResult, train


def model_summary(run: RunConfig) -> dict:
    """What `smallgpt model` shows of a run: its shape, parameter counts, FLOPs and recipe."""
    with torch.device("meta"):  # shapes without storage: any size can be counted
        gpt = GPT(run.model)
    return {
        "preset": run.preset,
        "config": run.model.to_dict(),
        "parameters": gpt.num_params(non_embedding=False),
        "non_embedding_parameters": gpt.num_params(non_embedding=True),
        "flops_per_token": gpt.flops_per_token(),
        "train": dataclasses.asdict(run.train),
        "layers": [
            {"name": name, "shape": list(p.shape), "count": p.numel()} for name, p in gpt.named_parameters()
        ],
    }


def model_command(args: list[str], preset: str | None, *, as_json: bool, console: Console) -> None:
    """`smallgpt model`: the summary of a preset with `args` (key=value) applied, as a table or JSON."""
    positional, overrides = split_cli_args(args)
    if positional:
        raise SmallGPTError(f"unexpected argument {positional[0]!r}: settings are written key=value")
    run = resolve_config(preset, None, overrides)
    config, summary = run.model, model_summary(run)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table("parameter", "shape", "count", title=f"{run.preset}: {config}")
    for layer in summary["layers"]:
        table.add_row(layer["name"], "x".join(map(str, layer["shape"])), f"{layer['count']:,}")
    console.print(table)
    head = (
        "head tied to wte" if config.architecture.tied_head else "untied head: not counted as non-embedding"
    )
    console.print(f"architecture:             {config.arch}")
    console.print(f"total parameters:         {summary['parameters']:,}  ({head})")
    console.print(f"non-embedding parameters: {summary['non_embedding_parameters']:,}")
    console.print(f"training FLOPs per token: {summary['flops_per_token']:,}")
    recipe = " ".join(f"{key}={value}" for key, value in summary["train"].items())
    console.print(f"training recipe (smallgpt train --preset {run.preset}): {recipe}", highlight=False)


def train_command(
    args: list[str],
    *,
    preset: str | None = None,
    config_file: str | None = None,
    data: str | None = None,
    out: str | None = None,
    resume: bool = False,
    init_from: str | None = None,
    console: Console | None = None,
    allow_different_data: bool = False,
) -> TrainResult:
    """`smallgpt train`: settings from preset/file/`args`, data (default: the bundled corpus, or on
    --resume the run's own), run dir."""
    positional, overrides = split_cli_args(args)
    if resume and len(positional) == 1:  # --resume RUN_DIR
        if out is not None and Path(out) != Path(positional[0]):
            raise SmallGPTError(f"--resume {positional[0]} continues that run in place: drop --out {out}")
        out, positional = positional[0], []
    if positional:
        hint = " (an unquoted glob? quote it)" if len(positional) > 1 else ""
        raise SmallGPTError(
            f"unexpected argument(s) {' '.join(positional)}{hint}: settings are written key=value"
        )
    if resume and init_from is not None:
        raise SmallGPTError("--resume continues a run; --init-from starts a new one: use one of them")
    start = RunStart()
    if resume:
        if out is None:
            raise SmallGPTError("--resume needs the run: smallgpt train --resume RUN_DIR")
        start = RunStart.resume(out)
        saved = RunConfig.from_dict(start.state["config"])
        run = keep_schedule(
            saved, resolve_config(preset, config_file, overrides, base=saved), start.state["step"]
        )
        if run.train.lr_decay_iters != saved.train.lr_decay_iters and console is not None:
            console.print(
                f"note: max_iters {saved.train.max_iters} -> {run.train.max_iters} keeps the learning-rate "
                f"schedule (lr_decay_iters={run.train.lr_decay_iters}); updates past it run at min_lr",
                highlight=False,
            )
        if data is None:
            data = recorded_data(out, start.state)
    elif init_from is not None:
        start = RunStart.init_from(init_from)
        run = resolve_config(preset, config_file, overrides, model=read_model_config(start.weights))
    else:
        run = resolve_config(preset, config_file, overrides)
    from smallgpt.prepare import data_dir_for

    data = data_dir_for(data)
    out_dir = out if out is not None else Path("runs") / run.preset
    chosen = "micro_batch_size" in overrides or "micro_batch_size" in config_file_keys(config_file)
    return train(
        run, data, out_dir, start=start, console=console,
        allow_different_data=allow_different_data, fit_micro_batch=not (resume or chosen),
    )  # fmt: skip


def split_cli_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Extra command-line words -> (positional words, overrides): key=value, --key=value, --key value."""
    positional, pairs = [], []
    words = iter(args)
    for word in words:
        if word.startswith("--"):
            key = word[2:]
            if "=" not in key:
                value = next(words, None)
                if value is None:
                    raise SmallGPTError(f"option {word} needs a value")
                key = f"{key}={value}"
            pairs.append(key)
        elif "=" in word:
            pairs.append(word)
        else:
            positional.append(word)
    return positional, parse_overrides(pairs)


def keep_schedule(saved: RunConfig, wanted: RunConfig, step: int) -> RunConfig:
    """What a changed max_iters means on --resume: more (or fewer) updates on the same schedule.

    The learning rate of the updates already taken is never rewritten: a run that decayed over its
    first max_iters keeps decaying over those (lr_decay_iters is pinned to the old max_iters) and
    spends any extra updates at min_lr, instead of jumping back up a re-stretched cosine with no
    warm-up. Giving lr_decay_iters explicitly re-plans the decay, jump included.
    """
    new = wanted.train
    if new.max_iters < step:
        raise SmallGPTError(f"max_iters={new.max_iters} is below the step the run has reached ({step})")
    if new.max_iters != saved.train.max_iters and new.lr_decay_iters == saved.train.lr_decay_iters == 0:
        new = dataclasses.replace(new, lr_decay_iters=saved.train.max_iters)
    return dataclasses.replace(wanted, train=new)


def recorded_data(run_dir: str | Path, state: dict) -> str:
    """The data directory a run's checkpoint says it trained on, where --resume continues by default."""
    recorded = state.get("data")
    path = recorded.get("path") if isinstance(recorded, dict) else None
    if not isinstance(path, str):
        raise SmallGPTError(f"{run_dir} does not record its training data (an older run): give --data")
    if not Path(path).is_dir():
        raise SmallGPTError(f"{run_dir} trained on {path}, which is gone: give --data")
    return path
