"""`smallgpt prepare`: every source format, the split, the statistics, and every kind of bad input.

Token counts are checked against direct tiktoken calls (`encode_ordinary` per document + EOT).
"""

import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import no_space, smallgpt

from smallgpt import prepare, sources
from smallgpt.errors import SmallGPTError
from smallgpt.prepare import default_data_dir, prepare_corpus
from smallgpt.tokenizer import EOT_ID, get_tokenizer

DOCS = [
    f"Document {i}: the quick brown fox jumps over {i * 7} lazy dogs.\nNaïve café — ünïcödé ✓ 日本語 {i}.\n"
    + "A literal <|endoftext|> inside text stays ordinary text. " * (i % 4)
    for i in range(40)
]


def expected_tokens(docs: list[str]) -> np.ndarray:
    encoding = get_tokenizer()
    return np.array([t for doc in docs for t in [*encoding.encode_ordinary(doc), EOT_ID]], dtype=np.uint16)


def read_bin(path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def documents_in(ids: np.ndarray) -> list[str]:
    """Cut a split at its EOTs and decode each document."""
    pieces = np.split(ids, np.flatnonzero(ids == EOT_ID) + 1)[:-1]
    return [get_tokenizer().decode(piece[:-1].tolist()) for piece in pieces]


def leftovers(out_dir) -> list[str]:
    return sorted(os.listdir(out_dir)) if out_dir.exists() else []


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")


def write_txt_dir(path, docs):
    path.mkdir()
    for i, doc in enumerate(docs):
        (path / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")


def make_source(kind: str, root):
    """Write DOCS in format `kind` under `root`; return the SOURCE argument and extra options."""
    if kind == "jsonl":
        write_jsonl(root / "docs.jsonl", DOCS)
        return str(root / "docs.jsonl"), {}
    if kind == "jsonl.gz":
        write_jsonl(root / "docs.jsonl.gz", DOCS, opener=gzip.open)
        return str(root / "docs.jsonl.gz"), {}
    if kind == "parquet":
        table = pa.table({"body": DOCS, "n": list(range(len(DOCS)))})
        pq.write_table(table, root / "docs.parquet", row_group_size=7)
        return str(root / "docs.parquet"), {"text_field": "body"}
    if kind == "txt directory":
        write_txt_dir(root / "texts", DOCS)
        return str(root / "texts"), {}
    if kind == "txt glob":
        write_txt_dir(root / "texts", DOCS)
        return str(root / "texts" / "doc*.txt"), {}
    if kind == "jsonl glob over two files":
        write_jsonl(root / "part-0.jsonl", DOCS[:25])
        write_jsonl(root / "part-1.jsonl", DOCS[25:])
        return str(root / "part-*.jsonl"), {}
    if kind == "txt with separator":
        (root / "a.txt").write_text("\n=====\n".join(DOCS[:30]), encoding="utf-8")
        (root / "b.txt").write_text("\n=====\n".join(DOCS[30:]) + "\n=====\n", encoding="utf-8")
        return str(root / "*.txt"), {"doc_separator": "\n=====\n"}
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "jsonl",
        "jsonl.gz",
        "parquet",
        "txt directory",
        "txt glob",
        "jsonl glob over two files",
        "txt with separator",
    ],
)
def test_every_local_format_gives_tiktoken_ids_with_eot_after_each_document(tmp_path, kind):
    source, options = make_source(kind, tmp_path)
    meta = prepare_corpus(source, tmp_path / "out", val_fraction=0, show_progress=False, **options)
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(DOCS))
    assert read_bin(tmp_path / "out" / "val.bin").size == 0
    assert meta["splits"]["train"]["documents"] == len(DOCS)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert leftovers(tmp_path / "out") == ["meta.json", "train.bin", "val.bin"]


def test_split_is_by_document_deterministic_by_seed(tmp_path):
    docs = [f"doc {i} " * (1 + i % 5) for i in range(300)]
    write_jsonl(tmp_path / "d.jsonl", docs)

    def split_docs(seed, out):
        prepare_corpus(str(tmp_path / "d.jsonl"), out, val_fraction=0.2, seed=seed, show_progress=False)
        return {name: documents_in(read_bin(out / f"{name}.bin")) for name in ("train", "val")}

    first = split_docs(1, tmp_path / "a")
    # Every document lands in exactly one split, whole, in its original order.
    assert sorted(first["train"] + first["val"]) == sorted(docs)
    for part in first.values():
        assert [docs.index(d) for d in part] == sorted(docs.index(d) for d in part)
    assert 30 <= len(first["val"]) <= 90
    assert split_docs(1, tmp_path / "b") == first
    assert split_docs(2, tmp_path / "c")["val"] != first["val"]


def test_separator_may_span_lines_and_read_batches(tmp_path, monkeypatch):
    source, options = make_source("txt with separator", tmp_path)
    monkeypatch.setattr(sources, "LINES_PER_BATCH", 1)  # "\n=====\n" now always spans two batches
    prepare_corpus(source, tmp_path / "out", val_fraction=0, show_progress=False, **options)
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(DOCS))


def test_hub_dataset_path_honours_subset_split_and_text_field(tmp_path, monkeypatch):
    """The named-dataset path (as for openwebtext), pointed at a local dataset repository."""
    repo = tmp_path / "hub-dataset"
    for subset, docs in (("small", DOCS[:20]), ("large", DOCS[20:])):
        (repo / subset).mkdir(parents=True)
        pq.write_table(pa.table({"content": docs[:-5]}), repo / subset / "train-00000-of-00001.parquet")
        pq.write_table(pa.table({"content": docs[-5:]}), repo / subset / "validation-00000-of-00001.parquet")
    configs = "".join(
        f"- config_name: {subset}\n  data_files:\n"
        f"  - {{split: train, path: {subset}/train-*}}\n"
        f"  - {{split: validation, path: {subset}/validation-*}}\n"
        for subset in ("small", "large")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    monkeypatch.setitem(sources.HF_ALIASES, "tiny-hub", str(repo))
    monkeypatch.setattr(sources, "_check_hub_dataset", lambda name: None)
    options = {"val_fraction": 0, "text_field": "content", "show_progress": False}
    meta = prepare_corpus("tiny-hub", tmp_path / "out", subset="large", split="validation", **options)
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(DOCS[-5:]))
    assert meta["source"] == "tiny-hub" and meta["arguments"]["subset"] == "large"
    prepare_corpus("tiny-hub", tmp_path / "small", subset="small", **options)
    assert np.array_equal(read_bin(tmp_path / "small" / "train.bin"), expected_tokens(DOCS[:15]))


def test_a_hub_dataset_with_a_loading_script_is_read_from_its_parquet_export(tmp_path, monkeypatch):
    """`datasets` >= 4 refuses openwebtext's loading script; prepare retries the Hub's Parquet export
    (a fake Hub here: the first call fails as datasets does, the retry streams a local file)."""
    import datasets

    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    real_load, calls = datasets.load_dataset, []

    def fake_hub(path, **kwargs):
        calls.append((path, kwargs.get("revision")))
        if kwargs.get("revision") != "refs/convert/parquet":
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        del kwargs["revision"], kwargs["name"]
        return real_load("json", data_files=str(tmp_path / "docs.jsonl"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.setattr(sources, "_check_hub_dataset", lambda name: None)
    prepare_corpus("openwebtext", tmp_path / "out", val_fraction=0, show_progress=False)
    assert calls == [("Skylion007/openwebtext", None), ("Skylion007/openwebtext", "refs/convert/parquet")]
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(DOCS))

    def no_export_either(path, **kwargs):  # other failures, and a failed retry, are one line, once
        calls.append(kwargs.get("revision"))
        raise RuntimeError("Dataset scripts are no longer supported, but found x.py\nmore detail")

    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset", no_export_either)
    with pytest.raises(
        SmallGPTError, match=r"^cannot load openwebtext: Dataset scripts are no longer supported, .*x.py$"
    ):
        prepare_corpus("openwebtext", tmp_path / "none", show_progress=False)
    assert calls == [None, "refs/convert/parquet"] and not (tmp_path / "none").exists()


def test_statistics_match_an_independent_count(tmp_path):
    source, _ = make_source("jsonl", tmp_path)
    meta = prepare_corpus(
        source, tmp_path / "out", val_fraction=0.25, seed=3, block_size=32, show_progress=False
    )
    everything = expected_tokens(DOCS)
    for name in ("train", "val"):
        ids = read_bin(tmp_path / "out" / f"{name}.bin")
        stats = meta["splits"][name]
        assert stats["documents"] == int((ids == EOT_ID).sum()) > 0
        assert stats["tokens"] == len(ids)
        assert stats["unique_tokens"] == len(np.unique(ids))
        assert stats["samples"] == (len(ids) - 1) // 32
        assert stats["max_token_id"] == int(ids.max())  # lets training check ids without a scan
    assert meta["total"] == {
        "documents": len(DOCS),
        "tokens": len(everything),
        "unique_tokens": len(np.unique(everything)),
    }
    assert meta["tokenizer"]["name"] == "gpt2" and len(meta["tokenizer"]["hash"]) == 64
    assert meta["arguments"]["block_size"] == 32 and meta["source"] == source


def test_max_docs_caps_the_stream(tmp_path):
    source, _ = make_source("jsonl", tmp_path)
    meta = prepare_corpus(source, tmp_path / "out", val_fraction=0, max_docs=7, show_progress=False)
    assert meta["total"]["documents"] == 7
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(DOCS[:7]))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    raw = [b"caf\xe9 au lait", b"ok \xff\xfe twice", b"clean"]
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, data in enumerate(raw):
        (texts / f"{i}.txt").write_bytes(data)
    (tmp_path / "bad.jsonl").write_bytes(b"".join(b'{"text": "' + data + b'"}\n' for data in raw))
    decoded = [data.decode("utf-8", errors="replace") for data in raw]
    for source in (texts, tmp_path / "bad.jsonl"):
        out = tmp_path / f"out-{source.name}"
        meta = prepare_corpus(str(source), out, val_fraction=0, show_progress=False)
        assert meta["replaced_characters"] == 3
        assert np.array_equal(read_bin(out / "train.bin"), expected_tokens(decoded))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["one", "", "  \n", "two"])
    meta = prepare_corpus(str(tmp_path / "d.jsonl"), tmp_path / "out", val_fraction=0, show_progress=False)
    assert meta["empty_documents_skipped"] == 2
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(["one", "two"]))


def write_bad_input(kind: str, root) -> tuple[str, dict, str]:
    """(source, options, expected message) for each kind of bad input."""
    if kind == "missing path":
        return str(root / "nope.jsonl"), {}, "no such file or directory"
    if kind == "zero documents":
        (root / "empty.jsonl").write_text("")
        return str(root / "empty.jsonl"), {}, "no documents"
    if kind == "only whitespace":
        (root / "blank.txt").write_text("  \n\n")
        return str(root / "blank.txt"), {}, "no documents"
    if kind == "missing text field":
        write_jsonl(root / "d.jsonl", ["fine"])
        return str(root / "d.jsonl"), {"text_field": "content"}, "no field 'content'"
    if kind == "a line without the text field":
        lines = [json.dumps({"text": f"doc {i}"}) for i in range(5)] + [json.dumps({"title": "no text"})]
        (root / "d.jsonl").write_text("\n".join(lines) + "\n")
        return str(root / "d.jsonl"), {}, "has no text in field 'text'"
    if kind == "malformed json":
        (root / "d.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
        return str(root / "d.jsonl"), {}, "cannot read"
    if kind == "unsupported extension":
        (root / "d.csv").write_text("text\nhello\n")
        return str(root / "d.csv"), {}, "unsupported file type"
    if kind == "no usable files in directory":
        (root / "dir").mkdir()
        (root / "dir" / "notes.md").write_text("# hi")
        return str(root / "dir"), {}, "no .txt, .jsonl"
    if kind == "glob matching nothing":
        return str(root / "*.jsonl"), {}, "no files match"
    if kind == "mixed formats":
        write_jsonl(root / "a.jsonl", ["x"])
        (root / "b.txt").write_text("y")
        return str(root), {}, "mixes file types"
    if kind == "too little text":
        write_jsonl(root / "d.jsonl", ["Hi"])  # "Hi" + <|endoftext|>: nothing left after validation
        return str(root / "d.jsonl"), {}, "holds 2 tokens: too little text"
    if kind == "subset of local files":
        write_jsonl(root / "d.jsonl", ["fine"])
        return str(root / "d.jsonl"), {"subset": "en"}, "--subset applies to Hugging Face datasets only"
    if kind == "unknown dataset offline":
        return "someone/no-such-dataset", {}, "cannot reach dataset 'someone/no-such-dataset'"
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing path",
    "zero documents",
    "only whitespace",
    "missing text field",
    "a line without the text field",
    "malformed json",
    "unsupported extension",
    "no usable files in directory",
    "glob matching nothing",
    "mixed formats",
    "too little text",
    "subset of local files",
    "unknown dataset offline",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_raises_one_clear_error_and_writes_nothing(tmp_path, kind):
    source, options, message = write_bad_input(kind, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SmallGPTError, match=message) as error:
        prepare_corpus(source, out, show_progress=False, **options)
    assert "\n" not in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing path", "unknown dataset offline", "a line without the text field"])
def test_cli_bad_input_is_one_line_and_exit_status_1(tmp_path, kind):
    source, options, message = write_bad_input(kind, tmp_path)
    assert not options
    result = smallgpt("prepare", source, "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_cli_prints_statistics_and_refuses_to_overwrite_without_force(tmp_path):
    source, _ = make_source("jsonl", tmp_path)
    out = str(tmp_path / "out")
    first = smallgpt("prepare", source, "--out", out, "--val-fraction", "0", "--max-docs", "10")
    assert first.returncode == 0, first.stderr
    tokens = f"{len(expected_tokens(DOCS[:10])):,}"
    assert "Dataset statistics" in first.stdout and tokens in first.stdout
    before = (tmp_path / "out" / "train.bin").read_bytes()
    again = smallgpt("prepare", source, "--out", out)
    assert again.returncode == 1 and "--force" in again.stderr
    assert (tmp_path / "out" / "train.bin").read_bytes() == before
    forced = smallgpt("prepare", source, "--out", out, "--val-fraction", "0", "--force", "--quiet")
    assert forced.returncode == 0, forced.stderr
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(DOCS))


def test_interrupted_run_leaves_nothing_and_keeps_the_last_good_output(tmp_path, monkeypatch):
    source, _ = make_source("jsonl", tmp_path)
    out = tmp_path / "out"
    prepare_corpus(source, out, val_fraction=0, max_docs=5, show_progress=False)
    good = {name: (out / name).read_bytes() for name in leftovers(out)}
    real_encode, calls = prepare.encode_documents, []

    def encode_then_interrupt(texts):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_encode(texts)

    monkeypatch.setattr(sources, "DOCS_PER_BATCH", 4)
    monkeypatch.setattr(prepare, "encode_documents", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(source, out, val_fraction=0, force=True, show_progress=False)
    assert {name: (out / name).read_bytes() for name in leftovers(out)} == good
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(source, fresh, val_fraction=0, show_progress=False)
    assert not fresh.exists()


@pytest.mark.parametrize("stage", ["append", "close"])
def test_a_full_disk_keeps_the_last_good_output_and_leaves_no_temporary(tmp_path, monkeypatch, stage):
    """Tokens refused while the corpus is read, or at the flush before the renames: the data
    prepared before (replaced with --force) stays whole, and no temporary is left."""
    source, _ = make_source("jsonl", tmp_path)
    out = tmp_path / "out"
    prepare_corpus(source, out, val_fraction=0.5, max_docs=5, show_progress=False)
    good = {name: (out / name).read_bytes() for name in leftovers(out)}
    real = getattr(prepare.SplitWriter, stage)

    def write_then_refuse(writer, *args):
        real(writer, *args)  # part of it may reach the disk
        if writer.final_path.name == "val.bin":  # train.bin went through: it must not replace the old
            no_space()

    monkeypatch.setattr(prepare.SplitWriter, stage, write_then_refuse)
    with pytest.raises(SmallGPTError, match=f"^cannot write to {out}: No space left on device$"):
        prepare_corpus(source, out, force=True, show_progress=False)
    assert {name: (out / name).read_bytes() for name in leftovers(out)} == good


def test_default_corpus_is_prepared_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLGPT_CACHE", str(tmp_path / "cache"))
    real_prepare, calls = prepare.prepare_corpus, []
    monkeypatch.setattr(prepare, "prepare_corpus", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))
    with ThreadPoolExecutor(2) as pool:  # two ranks asking at once: one prepares, the other waits
        data_dir, same_dir = pool.map(lambda _: default_data_dir(), range(2))
    assert calls == [1] and data_dir == same_dir == tmp_path / "cache" / "data" / "default"
    meta = json.loads((data_dir / "meta.json").read_text())
    # 413 documents, 2,260,531 GPT-2 tokens plus one EOT each (shared/data/README.md).
    assert meta["total"]["documents"] == 413
    assert meta["total"]["tokens"] == 2_260_531 + 413
    # One default split: the bundled corpus's own 5%, whoever prepares it (`--data default` names it).
    assert meta["arguments"]["val_fraction"] == prepare.DEFAULT_CORPUS_VAL_FRACTION == 0.05
    assert meta["splits"]["val"]["documents"] == 24 and meta["val_carved_tokens"] == 0
    assert prepare.data_dir_for("default") == prepare.data_dir_for(None) == data_dir
    stamp = (data_dir / "train.bin").stat().st_mtime_ns
    assert default_data_dir() == data_dir
    assert (data_dir / "train.bin").stat().st_mtime_ns == stamp


def test_mixcorpus_val_figures(shared_data, tmp_path):
    source = str(shared_data / "mixcorpus" / "val.jsonl.gz")
    meta = prepare_corpus(source, tmp_path / "out", val_fraction=0, show_progress=False)
    assert meta["splits"]["train"]["documents"] == 486
    assert meta["splits"]["train"]["tokens"] == 481_448
    with gzip.open(source, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert np.array_equal(read_bin(tmp_path / "out" / "train.bin"), expected_tokens(docs))
