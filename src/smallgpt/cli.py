"""The `smallgpt` command: a thin layer of typed options over the pipeline modules.

Each subcommand parses its options, calls one function of the stage it belongs to, and prints the
result. Errors the user can fix arrive as `SmallGPTError` and leave as one line on stderr with exit
status 1 (`main` below); usage mistakes get typer's usage message and exit status 2.
"""

from __future__ import annotations

import errno
import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from smallgpt import __version__
from smallgpt.config import DEFAULT_PRESET, PRESETS
from smallgpt.errors import SmallGPTError, os_reason
from smallgpt.files import os_error_behind
from smallgpt.limits import API_KEY_ENV, Limits

app = typer.Typer(
    name="smallgpt",
    help="SmallGPT: GPT-2-style language models, from raw text to generated text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)
PRESET_HELP = f"Model preset: {', '.join(PRESETS)} [default: {DEFAULT_PRESET}]."
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."


def _version(value: bool) -> None:
    if value:
        console.print(f"smallgpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """SmallGPT: GPT-2-style language models, from raw text to generated text."""


@app.command()
def tokenize(
    text: Annotated[str, typer.Argument(help="Text to split into GPT-2 BPE tokens.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print ids and pieces as JSON.")] = False,
) -> None:
    """Show how GPT-2's byte-pair encoding splits TEXT: ids, pieces and count."""
    from smallgpt.tokenizer import encode, token_pieces

    ids = encode(text)
    pieces = token_pieces(ids)
    if as_json:
        print(json.dumps({"ids": ids, "pieces": pieces, "count": len(ids)}))
        return
    table = Table("#", "id", "piece")
    for position, (token_id, piece) in enumerate(zip(ids, pieces, strict=True)):
        table.add_row(str(position), str(token_id), repr(piece))
    console.print(table)
    console.print(f"ids: {ids}")
    console.print(f"{len(ids)} tokens")


def _no_extra_words(ctx: typer.Context, what: str) -> None:
    """Refuse words the command does not take; several paths are most likely a glob the shell expanded."""
    if ctx.args:
        words = " ".join(ctx.args[:3]) + (" ..." if len(ctx.args) > 3 else "")
        hint = (
            ": a glob is expanded by the shell unless quoted; write it in quotes, e.g. 'my-texts/*.txt'"
            if any(not word.startswith("-") and "=" not in word for word in ctx.args)
            else ""
        )
        raise SmallGPTError(f"{what} takes one {what.split()[-1]}; got extra argument(s) {words}{hint}")


@app.command(context_settings={"allow_extra_args": True})
def prepare(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="'default' (bundled corpus), 'openwebtext', a Hugging Face dataset name, or local "
            ".txt/.jsonl/.jsonl.gz/.parquet files: a file, a directory or a glob."
        ),
    ],
    out: Annotated[
        Optional[str],
        typer.Option(
            "--out",
            help="Output directory for train.bin, val.bin, meta.json (for 'default': the cache, "
            "which --data default names).",
        ),
    ] = None,
    val_fraction: Annotated[
        Optional[float],
        typer.Option(help="Share of documents for validation [default: 0.005; 'default': 0.05]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 1337,
    max_docs: Annotated[Optional[int], typer.Option(help="Stop after this many documents.")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text (JSON / parquet / HF).")] = "text",
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset to read.")] = "train",
    subset: Annotated[
        Optional[str], typer.Option(help="Subset (configuration) of a Hugging Face dataset, e.g. en.")
    ] = None,
    doc_separator: Annotated[
        Optional[str], typer.Option(help="Split .txt files into documents at this string.")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Block size for the samples statistic.")] = 256,
    force: Annotated[bool, typer.Option("--force", help="Replace existing prepared data.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Tokenize a corpus into OUT/train.bin, OUT/val.bin (uint16 GPT-2 ids) and OUT/meta.json."""
    import os

    _no_extra_words(ctx, "prepare SOURCE")
    # Preparing never hands data to torch: stop `datasets` importing it (saves seconds and ~200 MB).
    os.environ.setdefault("USE_TORCH", "0")
    from smallgpt.prepare import default_data_dir, prepare_corpus, print_report, statistics_table

    if out is None:
        if source != "default" or val_fraction is not None or seed != 1337 or max_docs is not None:
            raise SmallGPTError(
                "--out DIR is needed (only `prepare default` with its default settings has a home of its own)"
            )
        where = default_data_dir(force=force)
        console.print(statistics_table(json.loads((where / "meta.json").read_text())))
        console.print(f"the bundled corpus is prepared in {where}: --data default names it", soft_wrap=True)
        return
    meta = prepare_corpus(
        source,
        out,
        val_fraction=val_fraction,
        seed=seed,
        max_docs=max_docs,
        text_field=text_field,
        split=split,
        subset=subset,
        doc_separator=doc_separator,
        block_size=block_size,
        force=force,
        show_progress=not quiet,
    )
    print_report(meta, out, console)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[--preset NAME] [--json] [KEY=VALUE | --KEY VALUE ...]",
)
def model(
    ctx: typer.Context,
    preset: Annotated[
        Optional[str],
        typer.Option(help=PRESET_HELP),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Print a preset's layers, parameter counts and training recipe; settings as in `train`."""
    from smallgpt.runs import model_command

    model_command(ctx.args, preset, as_json=as_json, console=console)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[--preset NAME] [--config FILE] [--data DIR|default] [--out RUN_DIR] "
    "[--resume RUN_DIR] [--init-from CHECKPOINT] [KEY=VALUE | --KEY VALUE ...]",
)
def train(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Option("--config", help="TOML file of settings.")] = None,
    preset: Annotated[
        Optional[str],
        typer.Option(help=PRESET_HELP),
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="Prepared data dir; 'default' (or none) = the bundled corpus; --resume: the run's."
        ),
    ] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory (default: runs/PRESET).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="--resume RUN_DIR: continue a run from its last checkpoint.")
    ] = False,
    init_from: Annotated[
        Optional[str], typer.Option(help="Start from a checkpoint's weights (fine-tuning).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help=DEVICE_HELP)] = None,
    allow_different_data: Annotated[
        bool,
        typer.Option("--allow-different-data", help="On --resume, accept data other than the run's own."),
    ] = False,
) -> None:
    """Train a model; any setting can follow as key=value or --key value (e.g. max_iters=2000).

    With no arguments: the default preset (see --preset) on the bundled corpus, ending with a sample.
    Under `torchrun --nproc_per_node=N` the same command trains on N processes (DDP).
    """
    from smallgpt.runs import train_command

    args = list(ctx.args) + ([f"device={device}"] if device else [])
    result = train_command(
        args, preset=preset, config_file=config, data=data, out=out, resume=resume, init_from=init_from,
        console=console, allow_different_data=allow_different_data,
    )  # fmt: skip
    if result.interrupted:
        raise typer.Exit(130)


@app.command(name="eval")
def eval_(
    checkpoint: Annotated[str, typer.Argument(help="Run dir (best, else latest), checkpoint dir or file.")],
    data: Annotated[
        str,
        typer.Option(
            help="Prepared data dir ('default' = the bundled corpus), or a raw .txt/.jsonl/.jsonl.gz/"
            ".parquet file."
        ),
    ],
    split: Annotated[str, typer.Option(help="Split of a prepared data dir: val or train.")] = "val",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    text_field: Annotated[str, typer.Option(help="Field holding the text in .jsonl/.parquet.")] = "text",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (what training picks here: measured on a CPU), float32, bfloat16.")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Loss and perplexity of a checkpoint over every block of DATA, deterministically."""
    from smallgpt.evaluate import evaluate_checkpoint
    from smallgpt.monitor import PassProgress, progress_display

    # On stderr, so that --json output stays clean; a log or a pipe gets a periodic line instead.
    with progress_display(err_console, enabled=err_console.is_terminal) as bar:
        result = evaluate_checkpoint(
            checkpoint, data, split=split, batch_size=batch_size, device=device, dtype=dtype,
            text_field=text_field, progress=PassProgress(bar, "evaluating"),
        )  # fmt: skip
    if as_json:
        print(json.dumps(result))
        return
    console.print(
        f"{result['checkpoint']} on {result['data']}: {result['tokens']:,} tokens, "
        f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} ({result['dtype']})",
        highlight=False,
    )


@app.command()
def plot(run_dir: Annotated[str, typer.Argument(help="Training run directory.")]) -> None:
    """Redraw RUN_DIR/loss.png (train and validation loss vs tokens) from RUN_DIR/metrics.jsonl."""
    from smallgpt.plot import plot_run

    console.print(f"wrote {plot_run(run_dir)}", highlight=False)


@app.command()
def sample(
    checkpoint: Annotated[
        str, typer.Argument(help="Run dir (best, else latest), checkpoint dir or .safetensors.")
    ],
    prompt: Annotated[
        Optional[list[str]],
        typer.Option(help="Text to continue (repeatable); empty starts from <|endoftext|>."),
    ] = None,
    prompt_file: Annotated[Optional[str], typer.Option(help="Read the prompt from this UTF-8 file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate per sample.")] = 200,
    temperature: Annotated[float, typer.Option(help="Randomness; 0 = greedy (always the likeliest).")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample only among the k likeliest tokens.")] = None,
    top_p: Annotated[
        Optional[float], typer.Option(help="Sample only among the smallest set with this probability.")
    ] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="Same seed, same text (sample i uses seed + i).")
    ] = None,
    num_samples: Annotated[int, typer.Option(help="How many samples per prompt.")] = 1,
    stop: Annotated[
        Optional[list[str]],
        typer.Option(help="End a sample at this text (repeatable); <|endoftext|> always ends it."),
    ] = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", help="Prompt loop: type a prompt, get samples; Ctrl-D ends.")
    ] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    int8: Annotated[
        bool, typer.Option("--int8", help="int8 weights: ~2x faster on a CPU, logits within ~1%.")
    ] = False,
) -> None:
    """Continue prompts with a trained model, all samples in one batch, printing tokens as they come."""
    from smallgpt.generate import SamplingParams
    from smallgpt.sample import sample_command

    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop or ()))
    sample_command(
        checkpoint, list(prompt or []), params, prompt_file=prompt_file, num_samples=num_samples,
        interactive=interactive, device=device, int8=int8, err_console=err_console,
    )  # fmt: skip


@app.command()
def serve(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, checkpoint dir or .safetensors file.")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 = all.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 8000,
    max_tokens_cap: Annotated[
        int, typer.Option(help="Most max_tokens a request may ask.")
    ] = Limits.max_tokens_cap,
    max_batch: Annotated[
        int, typer.Option(help="Sequences decoded together (cache rows).")
    ] = Limits.max_batch,
    max_queue: Annotated[int, typer.Option(help="Sequences that may wait; beyond: 429.")] = Limits.max_queue,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may run.")
    ] = Limits.request_timeout,
    batch_invariant: Annotated[
        bool,
        typer.Option(
            "--batch-invariant",
            help="Every decode step computes all --max-batch rows: a seeded text is the same whatever else "
            "runs, but a request alone costs a full batch's step.",
        ),
    ] = False,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar=API_KEY_ENV, help="Require Authorization: Bearer KEY on /v1 routes."),
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Serve a model: OpenAI-compatible API at /v1/completions, playground at /."""
    from smallgpt.serve import serve as run_server

    limits = Limits(
        max_tokens_cap=max_tokens_cap,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout=request_timeout,
    )
    options = dict(host=host, port=port, device=device, limits=limits, api_key=api_key)
    run_server(checkpoint, **options, batch_invariant=batch_invariant)


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, checkpoint dir or .safetensors file.")],
    out: Annotated[
        str, typer.Option("--out", help="Model directory to write (with --format gguf: a .gguf file).")
    ],
    file_format: Annotated[
        str, typer.Option("--format", help="hf: a Hugging Face directory; gguf: one file for llama.cpp.")
    ] = "hf",
    gguf_type: Annotated[
        Optional[str], typer.Option("--type", help="GGUF weights: f16 (default), f32 or q8_0 (8-bit).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds an export.")] = False,
) -> None:
    """Write a checkpoint as a Hugging Face model directory (weights, config, tokenizer) or a GGUF file."""
    if file_format == "gguf":
        from smallgpt.interop_gguf import DEFAULT_TYPE, export_to_gguf

        export_to_gguf(checkpoint, out, type_name=gguf_type or DEFAULT_TYPE, force=force)
        console.print(f"exported {checkpoint} -> {out}", highlight=False, soft_wrap=True)
        run = f'llama-completion -m {out} -no-cnv -p "Once upon a time"'
        console.print(f"run it with llama.cpp: {run}", highlight=False, soft_wrap=True)
        return
    if file_format != "hf":
        raise SmallGPTError(f"unknown --format {file_format!r}; choose hf or gguf")
    if gguf_type is not None:
        raise SmallGPTError("--type sets the weights of a GGUF file: use it with --format gguf")
    from smallgpt.interop import export_to_hf

    export_to_hf(checkpoint, out, force=force)
    console.print(f"exported {checkpoint} -> {out}", highlight=False, soft_wrap=True)
    load = f'AutoModelForCausalLM.from_pretrained("{out}")'
    console.print(f"load it with transformers: {load}", highlight=False, soft_wrap=True)


@app.command(name="import")
def import_(
    hf_dir: Annotated[str, typer.Argument(help="Local Hugging Face GPT-2 model directory.")],
    out: Annotated[str, typer.Option("--out", help="Directory to write the SmallGPT checkpoint to.")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds a checkpoint.")] = False,
) -> None:
    """Read a GPT-2 model directory (e.g. your download of gpt2) into a SmallGPT checkpoint."""
    from smallgpt.interop import import_from_hf

    _refuse_smallgpt_checkpoint(hf_dir)
    path = import_from_hf(hf_dir, out, force=force)
    console.print(f"imported {hf_dir} -> {path}", highlight=False, soft_wrap=True)
    console.print(f"use it with: smallgpt sample {out}  |  smallgpt train --init-from {out}", soft_wrap=True)


def _refuse_smallgpt_checkpoint(path: str) -> None:
    """`import` reads Hugging Face directories; a SmallGPT run or checkpoint needs no conversion."""
    from pathlib import Path

    from smallgpt.checkpoint import is_smallgpt_checkpoint

    if not Path(path).is_dir() or not is_smallgpt_checkpoint(path):
        return  # a Hub model id, a file (refused by the import itself), or a Hugging Face directory
    raise SmallGPTError(
        f"{path} is already a SmallGPT checkpoint; use it directly (smallgpt sample {path}, "
        f"smallgpt train --init-from {path}), or `smallgpt export` it for Hugging Face"
    )


def main() -> None:
    """Entry point of the `smallgpt` script: user errors become one line, never a traceback."""
    try:
        app()
    except SmallGPTError as exc:
        _fail(str(exc))
    except Exception as exc:  # a full or read-only disk where no module expected a write (a cache, ...)
        error = os_error_behind(exc)
        if error is None or error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        _fail(f"cannot write {error.filename or 'an output'}: {os_reason(error)}")
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


def _fail(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)
