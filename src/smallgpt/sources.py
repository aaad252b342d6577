"""Where documents come from: every corpus as a stream of text batches, via Hugging Face `datasets`.

A source is the bundled corpus (`default`), a dataset on the Hugging Face Hub (`openwebtext` or any
name), or local files: `.txt`, `.jsonl`, `.jsonl.gz`, `.parquet`, a directory or a glob. All of them are
read by the same `datasets.load_dataset(..., streaming=True)` readers, so a local test exercises the code
an OpenWebText run uses, and memory stays flat however big the corpus is. Invalid UTF-8 is decoded
with replacement characters, and counted.
"""

from __future__ import annotations

import codecs
import glob
import os
from importlib import resources
from pathlib import Path

from smallgpt.errors import SmallGPTError, first_line

HF_ALIASES = {"openwebtext": "Skylion007/openwebtext"}
# File suffix → the `datasets` builder that reads it.
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
DOCS_PER_BATCH = 512  # documents per read and per tokenizer job: big enough to amortise overheads
LINES_PER_BATCH = 16_384  # lines per read of .txt files cut at --doc-separator
# `datasets` >= 4 refuses Hub repositories that still carry a loading script (openwebtext does), but the
# Hub keeps an automatic Parquet export of every public dataset under this revision.
SCRIPT_REFUSED = "Dataset scripts are no longer supported"
PARQUET_REVISION = "refs/convert/parquet"


class _ReplacementCounter:
    """A codecs error handler: like errors="replace" (one U+FFFD per invalid byte run), but counting."""

    name = "smallgpt-count-replace"

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: UnicodeDecodeError) -> tuple[str, int]:
        self.count += 1
        return "\ufffd", error.end


REPLACEMENTS = _ReplacementCounter()
codecs.register_error(REPLACEMENTS.name, REPLACEMENTS)


def _local_format(path: Path) -> str | None:
    suffix = next((s for s in LOCAL_FORMATS if path.name.lower().endswith(s)), None)
    return suffix and LOCAL_FORMATS[suffix]


def _local_files(source: str) -> list[Path] | None:
    """The files a local source names, or None when `source` is not a local path (a dataset name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _local_format(p) and not hidden(p))
        if not files:
            raise SmallGPTError(f"no .txt, .jsonl, .jsonl.gz or .parquet files in directory {source}")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise SmallGPTError(f"no files match {source}")
        return files
    # A path-like name, or one with a file extension, was meant as a file (dataset names have neither).
    if source.startswith((".", "/", "~")) or Path(source).suffix[1:].isalpha():
        raise SmallGPTError(f"no such file or directory: {source}")
    return None


def _open_local(source: str, files: list[Path], text_field: str, doc_separator: str | None):
    formats = {_local_format(p) for p in files}
    if None in formats:
        bad = next(p for p in files if _local_format(p) is None)
        raise SmallGPTError(f"unsupported file type: {bad} (expected .txt, .jsonl, .jsonl.gz or .parquet)")
    if len(formats) > 1:
        raise SmallGPTError(f"the source mixes file types ({', '.join(sorted(formats))}): use one kind")
    builder = formats.pop()
    if doc_separator is not None and builder != "text":
        raise SmallGPTError("--doc-separator applies to .txt files only")
    options: dict = {}
    if builder == "text":
        # A whole file per record, or its lines (line ends kept) to cut at the separator while
        # streaming; bad UTF-8 is counted. The text reader always names its column "text".
        sample_by = "document" if doc_separator is None else "line"
        options = {"sample_by": sample_by, "keep_linebreaks": True, "encoding_errors": REPLACEMENTS.name}
        text_field = "text"
    elif builder == "json":
        # Spelled "utf8" rather than "utf-8" on purpose: only then does the JSON reader decode the bytes
        # itself (honouring our counting error handler) instead of handing raw bytes to pyarrow, which
        # rejects invalid UTF-8 outright.
        options = {"encoding": "utf8", "encoding_errors": REPLACEMENTS.name}
    data_files = [str(p) for p in files]
    return _load_dataset(source, builder, data_files=data_files, split="train", **options), text_field


def _load_dataset(source: str, path: str, **kwargs):
    """`datasets.load_dataset(path, ..., streaming=True)` with its failures turned into one-line errors."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(path, streaming=True, **kwargs)
    except StopIteration:  # the JSON reader found no record to infer columns from
        raise SmallGPTError(f"{source} holds no documents") from None
    except (ConnectionError, FileNotFoundError, ValueError, RuntimeError) as exc:
        if SCRIPT_REFUSED in str(exc) and "revision" not in kwargs:
            return _load_dataset(source, path, revision=PARQUET_REVISION, **kwargs)
        raise SmallGPTError(f"cannot load {source}: {first_line(exc)}") from None


def open_source(
    source: str, text_field: str, split: str, doc_separator: str | None, subset: str | None = None
):
    """(streaming dataset, name of its text column) for any source `prepare_corpus` accepts.

    `split` and `subset` (the dataset's configuration, e.g. "en" for allenai/c4) choose what a Hub
    dataset streams; local files are always the whole of them.
    """
    if source == "default":
        files = [Path(str(resources.files("smallgpt") / "assets" / "default-corpus.jsonl.gz"))]
        text_field = "text"
    else:
        files = _local_files(source)
    if files is not None:
        if subset is not None:
            raise SmallGPTError("--subset applies to Hugging Face datasets only, not to local files")
        return _open_local(source, files, text_field, doc_separator)
    if doc_separator is not None:
        raise SmallGPTError("--doc-separator applies to local .txt files only")
    name = HF_ALIASES.get(source, source)
    _check_hub_dataset(name)
    return _load_dataset(source, name, name=subset, split=split), text_field


def _check_hub_dataset(name: str) -> None:
    """Ask the Hub about `name` first: one quick request instead of `datasets`' minute of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        raise SmallGPTError(
            f"dataset {name!r} is gated: accept its terms on huggingface.co and log in"
        ) from None
    except RepositoryNotFoundError:
        raise SmallGPTError(
            f"no dataset {name!r} on the Hugging Face Hub, and no local file of that name"
        ) from None
    except Exception as exc:  # offline mode, DNS failure, timeout: whatever the HTTP library raises
        raise SmallGPTError(
            f"cannot reach dataset {name!r} on the Hugging Face Hub: it can't be streamed offline "
            f"({type(exc).__name__}); for local files give a path"
        ) from None


def document_batches(dataset, text_field: str, doc_separator: str | None, source: str):
    """Lists of document texts, in stream order; raises on records without the text field."""
    if dataset.column_names is not None:
        if text_field not in dataset.column_names:
            fields = ", ".join(dataset.column_names)
            raise SmallGPTError(f"{source} has no field {text_field!r} (fields: {fields}); use --text-field")
        dataset = dataset.select_columns([text_field])
    try:
        if doc_separator is None:
            yield from _texts(dataset, text_field, source, DOCS_PER_BATCH)
            return
        # The text reader gives one shard per file, so each file's end also ends a document.
        for shard in range(dataset.num_shards):
            lines = _texts(dataset.shard(dataset.num_shards, shard), text_field, source, LINES_PER_BATCH)
            yield from _split_at(doc_separator, lines)
    except (UnicodeDecodeError, ValueError, OSError) as exc:  # pyarrow / json parse errors
        raise SmallGPTError(f"cannot read {source}: {first_line(exc)}") from None


def _texts(dataset, text_field: str, source: str, batch_size: int):
    for batch in dataset.iter(batch_size=batch_size):
        if text_field not in batch:
            raise SmallGPTError(f"{source} has no field {text_field!r}; use --text-field")
        texts = batch[text_field]
        if any(not isinstance(text, str) for text in texts):
            raise SmallGPTError(f"a record of {source} has no text in field {text_field!r}")
        yield texts


def _split_at(separator: str, line_batches):
    """Documents of a stream of lines, cut at `separator` (which may span lines and batches)."""
    rest = ""
    for lines in line_batches:
        *documents, rest = (rest + "".join(lines)).split(separator)
        yield documents
    yield [rest]
