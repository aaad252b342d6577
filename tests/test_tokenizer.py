import hashlib
import shutil

import pytest
import tiktoken
import tiktoken.load

from smallgpt import tokenizer
from smallgpt.errors import SmallGPTError
from smallgpt.tokenizer import EOT_ID, decode, encode, get_tokenizer, token_pieces

SAMPLES = [
    "The future of artificial intelligence is",
    "unbelievable",
    "Hello, world! It's 2026 — naïve café, 東京, emoji 🙂 and\ttabs\n\nnew lines   spaces",
    "def f(x):\n    return x ** 2  # comment",
    "",
]


def test_seed_example_ids():
    assert encode("The future of artificial intelligence is") == [464, 2003, 286, 11666, 4430, 318]


def test_vocabulary_size_and_end_of_text():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]


def test_unbelievable_splits_into_subwords():
    ids = encode("unbelievable")
    assert len(ids) > 1
    assert "".join(token_pieces(ids)) == "unbelievable"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_matches_tiktoken_reference_construction():
    """Our offline build equals tiktoken's own r50k/gpt2 construction from the same ranks file."""
    ranks = tiktoken.load.load_tiktoken_bpe(
        str(tokenizer.asset_path("gpt2.tiktoken")), tokenizer.GPT2_FILES["gpt2.tiktoken"]
    )
    reference = tiktoken.Encoding(
        name="reference",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    for text in SAMPLES:
        assert encode(text) == reference.encode_ordinary(text)


def test_matches_hf_gpt2_tokenizer_from_packaged_files(tmp_path):
    """An independent BPE implementation (HF's GPT2Tokenizer) built from encoder.json + vocab.bpe agrees."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(tokenizer.asset_path("encoder.json"), tmp_path / "vocab.json")
    shutil.copy(tokenizer.asset_path("vocab.bpe"), tmp_path / "merges.txt")
    hf = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    assert len(hf) == 50257
    for text in SAMPLES:
        assert encode(text) == hf.encode(text)


def test_packaged_files_match_pinned_hashes():
    for name, digest in tokenizer.GPT2_FILES.items():
        assert hashlib.sha256(tokenizer.asset_path(name).read_bytes()).hexdigest() == digest


def test_corrupt_file_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"not the ranks")
    monkeypatch.setattr(tokenizer, "asset_path", lambda name: tmp_path / name)
    with pytest.raises(SmallGPTError, match="corrupt"):
        tokenizer.verified_bytes("gpt2.tiktoken")


def test_non_string_is_refused():
    with pytest.raises(SmallGPTError, match="must be a string"):
        encode(123)  # type: ignore[arg-type]
