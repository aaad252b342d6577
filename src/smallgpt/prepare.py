"""Raw text → GPT-2 token files: `train.bin`, `val.bin` and `meta.json`.

Documents arrive in batches from `smallgpt.sources` (any corpus, streamed). Each document goes to the
train or the validation split by a seeded coin flip, is tokenized (batches in a thread pool: tiktoken
releases the GIL, so every core works) and appended to its split's file followed by one
`<|endoftext|>` (id 50256). Ids fit in uint16 because GPT-2's vocabulary has 50,257 < 65,536 entries.

Files are written under hidden temporary names and renamed only when the whole corpus has been read;
`meta.json` is renamed last, so a directory with a `meta.json` is a complete one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from smallgpt.config import check_seed
from smallgpt.errors import SmallGPTError, os_reason
from smallgpt.files import atomic_write_text, fsync_path, make_dir, writing
from smallgpt.sources import REPLACEMENTS, document_batches, open_source
from smallgpt.tokenizer import EOT_ID, get_tokenizer, tokenizer_hash

OUTPUT_FILES = ("train.bin", "val.bin", "meta.json")
VAL_FRACTION = 0.005  # the seed's share of documents held out, for corpora of thousands of documents
DEFAULT_CORPUS_VAL_FRACTION = 0.05  # the bundled corpus has only 413 documents: 0.5% would be 1 or 2
# A corpus too small to split by document is a small one: hold out at least a tenth of its tokens.
CARVED_VAL_FRACTION = 0.1


def cache_dir() -> Path:
    """`$SMALLGPT_CACHE`, else `$XDG_CACHE_HOME/smallgpt`, else `~/.cache/smallgpt`."""
    if os.environ.get("SMALLGPT_CACHE"):
        return Path(os.environ["SMALLGPT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "smallgpt"


def default_val_fraction(source: str) -> float:
    """The validation share `prepare` uses when none is given: the bundled corpus has its own."""
    return DEFAULT_CORPUS_VAL_FRACTION if source == "default" else VAL_FRACTION


def data_dir_for(data: str | Path | None, *, raw_files: bool = False) -> Path:
    """What a `--data` option names: `default` (or nothing) is the bundled corpus, else a directory.

    With `raw_files` (`smallgpt eval`) a text file is taken as it is; a token file never is: its
    directory is what was meant.
    """
    if data is None or str(data) == "default":
        return default_data_dir()
    path = Path(data)
    if path.is_file() and (path.suffix == ".bin" or not raw_files):
        hint = (
            f"give its directory: --data {path.parent}"
            if path.suffix == ".bin"
            else f"prepare it first: smallgpt prepare {data} --out data/NAME, then --data data/NAME"
        )
        raise SmallGPTError(f"--data {data} is a file; --data takes a prepared data directory ({hint})")
    return path


def default_data_dir(*, force: bool = False) -> Path:
    """The bundled corpus, prepared into the cache on first use and reused afterwards (`--data default`)."""
    out_dir = make_dir(cache_dir() / "data" / "default", "cache directory")
    # Several processes (DDP ranks) may ask at once: the first prepares, the others wait and reuse.
    with writing(out_dir / ".lock"):
        lock = open(out_dir / ".lock", "w")  # noqa: SIM115 (closed by the `with` below)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta_path = out_dir / "meta.json"
        if meta_path.is_file() and not force:
            meta = json.loads(meta_path.read_text())
            if meta.get("source") == "default" and meta["tokenizer"]["hash"] == tokenizer_hash():
                return out_dir
        prepare_corpus("default", out_dir, force=True)
    return out_dir


def encode_documents(texts: list[str]) -> np.ndarray:
    """The documents' GPT-2 ids as one uint16 array, each document followed by `<|endoftext|>`.

    `encode_to_numpy` with no special tokens allowed or disallowed equals `encode_ordinary`, but hands
    back a buffer instead of a list of Python ints, so the GIL is held only briefly.
    """
    encoding = get_tokenizer()
    eot = np.array([EOT_ID], dtype=np.uint32)
    parts = []
    for text in texts:
        parts += [encoding.encode_to_numpy(text, disallowed_special=()), eot]
    return np.concatenate(parts).astype(np.uint16) if parts else np.empty(0, dtype=np.uint16)


class SplitWriter:
    """Appends one split's tokens to a hidden temporary file and keeps the split's statistics."""

    def __init__(self, final_path: Path) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp_path, "wb")  # noqa: SIM115 (closed in close/discard)
        self.documents = 0
        self.tokens = 0
        self.token_counts = np.zeros(EOT_ID + 1, dtype=np.int64)

    def append(self, tokens: np.ndarray, documents: int) -> None:
        tokens.tofile(self.file)
        self.documents += documents
        self.tokens += len(tokens)
        self.token_counts += np.bincount(tokens, minlength=EOT_ID + 1)

    def statistics(self, block_size: int) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "unique_tokens": int(np.count_nonzero(self.token_counts)),
            # Non-overlapping (x, y) pairs: x = block_size tokens, y = the same shifted by one.
            "samples": max(self.tokens - 1, 0) // block_size,
            # Lets training check the ids against a model's vocabulary without reading the file.
            "max_token_id": int(np.flatnonzero(self.token_counts)[-1]) if self.tokens else None,
        }

    def take_back(self) -> np.ndarray:
        """Empty the split and return every token written to it so far."""
        self.file.flush()
        tokens = np.fromfile(self.tmp_path, dtype=np.uint16)
        self.file.seek(0)
        self.file.truncate()
        self.documents, self.tokens = 0, 0
        self.token_counts[:] = 0
        return tokens

    def close(self) -> None:
        """Write out the last buffered tokens and flush the file to disk (where a full disk shows)."""
        self.file.close()
        fsync_path(self.tmp_path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # tokens a full disk refused: they go with the file
            self.file.close()
        self.tmp_path.unlink(missing_ok=True)


class _ProgressBar:
    """Documents and tokens so far, with their rates, on stderr (gone once the table is printed)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]tokenizing"),
            BarColumn(bar_width=16),
            TextColumn("{task.completed:,} docs · {task.fields[tokens]:.1f}M tokens"),
            TextColumn("· {task.fields[docs_rate]:,.0f} docs/s · {task.fields[tokens_rate]:.2f}M tokens/s"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled or not console.is_terminal,  # a log would get only a blank line
        )
        self.task = self.progress.add_task("", total=total, tokens=0.0, docs_rate=0.0, tokens_rate=0.0)
        self.started = time.perf_counter()

    def show(self, documents: int, tokens: int) -> None:
        seconds = time.perf_counter() - self.started
        millions = tokens / 1e6
        rates = {"docs_rate": documents / seconds, "tokens_rate": millions / seconds}
        self.progress.update(self.task, completed=documents, tokens=millions, **rates)


def _check_arguments(
    out_dir: Path, val_fraction: float, seed: int, block_size: int, max_docs: int | None, force: bool
) -> None:
    check_seed("--seed", seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise SmallGPTError(f"--out {out_dir} is a file, not a directory")
    if not 0 <= val_fraction < 1:
        raise SmallGPTError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    if block_size < 1:
        raise SmallGPTError(f"--block-size must be at least 1, not {block_size}")
    if max_docs is not None and max_docs < 1:
        raise SmallGPTError(f"--max-docs must be at least 1, not {max_docs}")
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise SmallGPTError(f"{out_dir} already holds prepared data ({', '.join(existing)}); use --force")


def tokenize_into(
    batches, writers: dict[str, SplitWriter], val_fraction: float, seed: int, max_docs: int | None, bar
) -> tuple[int, int]:
    """Split, tokenize and write every document of `batches`; returns (documents, empty ones skipped).

    The reading thread deals documents out to a thread pool, one job per split per batch, and writes
    finished jobs in submission order, so the files come out in stream order.
    """
    coin = np.random.default_rng(seed)  # one draw per document, in stream order: deterministic split
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pending: deque[tuple[SplitWriter, int, Future]] = deque()
    documents = skipped = 0

    def write_oldest() -> None:
        writer, count, future = pending.popleft()
        writer.append(future.result(), count)

    with ThreadPoolExecutor(workers) as pool:
        for texts in batches:
            kept = [text for text in texts if text and not text.isspace()]
            skipped += len(texts) - len(kept)
            if max_docs is not None:
                kept = kept[: max_docs - documents]
            documents += len(kept)
            to_val = coin.random(len(kept)) < val_fraction
            for name, in_split in (("train", ~to_val), ("val", to_val)):
                chosen = [text for text, keep in zip(kept, in_split, strict=True) if keep]
                if chosen:
                    pending.append((writers[name], len(chosen), pool.submit(encode_documents, chosen)))
            while len(pending) > 2 * workers:  # every core busy, yet a bounded amount of text in memory
                write_oldest()
            bar.show(documents, writers["train"].tokens + writers["val"].tokens)
            if documents == max_docs:
                break
        while pending:
            write_oldest()
    bar.show(documents, writers["train"].tokens + writers["val"].tokens)
    return documents, skipped


def prepare_corpus(
    source: str,
    out_dir: str | Path,
    *,
    val_fraction: float | None = None,
    seed: int = 1337,
    max_docs: int | None = None,
    text_field: str = "text",
    split: str = "train",
    subset: str | None = None,
    doc_separator: str | None = None,
    block_size: int = 256,
    force: bool = False,
    show_progress: bool = True,
) -> dict:
    """Tokenize `source` into `out_dir/{train,val}.bin` + `meta.json`; returns the meta dict."""
    out_dir = Path(out_dir)
    val_fraction = default_val_fraction(source) if val_fraction is None else val_fraction
    _check_arguments(out_dir, val_fraction, seed, block_size, max_docs, force)
    created = not out_dir.exists()
    make_dir(out_dir, "--out directory")  # before reading anything: an unwritable --out fails at once
    writers: dict[str, SplitWriter] = {}
    bar = _ProgressBar(max_docs, show_progress)
    try:
        dataset, text_field = open_source(source, text_field, split, doc_separator, subset)
        replaced_before = REPLACEMENTS.count  # opening may decode a few records: count the stream once
        writers.update((name, SplitWriter(out_dir / f"{name}.bin")) for name in ("train", "val"))
        with bar.progress:
            batches = document_batches(dataset, text_field, doc_separator, source)
            documents, skipped = tokenize_into(batches, writers, val_fraction, seed, max_docs, bar)
        carved = _check_splits(writers, source, val_fraction)
    except BaseException as exc:
        for writer in writers.values():
            writer.discard()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        if isinstance(exc, OSError):  # read-only directory, full disk: the user's to fix
            raise SmallGPTError(f"cannot write to {out_dir}: {os_reason(exc)}") from None
        raise
    all_counts = writers["train"].token_counts + writers["val"].token_counts
    meta = {
        "source": source,
        "tokenizer": {"name": "gpt2", "hash": tokenizer_hash(), "eot_id": EOT_ID, "dtype": "uint16"},
        "arguments": {
            "val_fraction": val_fraction,
            "seed": seed,
            "max_docs": max_docs,
            "text_field": text_field,
            "split": split,
            "subset": subset,
            "doc_separator": doc_separator,
            "block_size": block_size,
        },
        "replaced_characters": REPLACEMENTS.count - replaced_before,
        "empty_documents_skipped": skipped,
        "val_carved_tokens": carved,  # > 0: validation is the stream's tail, not whole documents
        "seconds": round(time.perf_counter() - bar.started, 2),
        "splits": {name: writer.statistics(block_size) for name, writer in writers.items()},
        "total": {
            "documents": documents,
            "tokens": int(all_counts.sum()),
            "unique_tokens": int(np.count_nonzero(all_counts)),
        },
    }
    _publish(out_dir, writers, meta)
    return meta


def _check_splits(writers: dict[str, SplitWriter], source: str, val_fraction: float) -> int:
    """Refuse an empty corpus; carve validation from the stream when documents were too few to split.

    Returns the number of tokens carved (0 when the split is by document).
    """
    train, val = writers["train"], writers["val"]
    documents = train.documents + val.documents
    if documents == 0:
        raise SmallGPTError(f"{source} holds no documents (all empty or whitespace)")
    if val_fraction == 0 or (val.documents and train.documents):
        return 0
    # Too few documents for the coin flips to fill both splits: hold out the tail of the token
    # stream instead (at least 2 tokens: one prediction), the rest of it stays for training.
    tokens = np.concatenate([train.take_back(), val.take_back()])
    carved = math.ceil(len(tokens) * max(val_fraction, CARVED_VAL_FRACTION))
    carved = max(carved, 2)
    if len(tokens) - carved < 2:
        raise SmallGPTError(
            f"{source} holds {len(tokens)} tokens: too little text to train on and validate "
            "(add text, or use --val-fraction 0 to train on all of it without validation)"
        )
    train.append(tokens[:-carved], documents)
    val.append(tokens[-carved:], 0)
    return carved


def _publish(out_dir: Path, writers: dict[str, SplitWriter], meta: dict) -> None:
    """Rename the finished files into place; meta.json goes last and marks the directory complete.
    Both splits are on disk before either replaces an old one: a full disk leaves the old data whole."""
    try:
        for writer in writers.values():
            writer.close()
        (out_dir / "meta.json").unlink(missing_ok=True)
        for writer in writers.values():
            writer.tmp_path.replace(writer.final_path)
    except OSError as exc:  # a full disk, or a directory named train.bin in the way
        for writer in writers.values():
            writer.discard()
        raise SmallGPTError(f"cannot write to {out_dir}: {os_reason(exc)}") from None
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")


def statistics_table(meta: dict) -> Table:
    """The seed's "Dataset Statistics" table, per split."""
    splits = meta["splits"]
    block_size = meta["arguments"]["block_size"]
    table = Table("", "train", "val", "total", title=f"Dataset statistics: {meta['source']}")
    for key, label in [("documents", "documents"), ("tokens", "tokens (EOT included)")]:
        table.add_row(
            label, f"{splits['train'][key]:,}", f"{splits['val'][key]:,}", f"{meta['total'][key]:,}"
        )
    table.add_row(
        "unique tokens",
        f"{splits['train']['unique_tokens']:,}",
        f"{splits['val']['unique_tokens']:,}",
        f"{meta['total']['unique_tokens']:,}",
    )
    table.add_row(
        f"samples (block {block_size} → next {block_size})",
        f"{splits['train']['samples']:,}",
        f"{splits['val']['samples']:,}",
        "",
    )
    return table


def print_report(meta: dict, out: str | Path, console: Console) -> None:
    """What `smallgpt prepare` says when done: the statistics table, anything done to the text or the
    split that the user did not ask for, and where the files are."""
    console.print(statistics_table(meta))
    if meta["val_carved_tokens"]:
        console.print(
            f"validation: {meta['total']['documents']:,} document(s) are too few to split by document; "
            f"held out the last {meta['val_carved_tokens']:,} tokens of the stream instead",
            highlight=False,
            soft_wrap=True,
        )
    if meta["replaced_characters"]:
        console.print(f"{meta['replaced_characters']:,} invalid UTF-8 sequences replaced with U+FFFD")
    console.print(f"wrote {out}/train.bin, {out}/val.bin and {out}/meta.json in {meta['seconds']} s")
