"""GPT-2 byte-pair encoding, built offline from the BPE files shipped inside the package.

`tiktoken.get_encoding("gpt2")` would download its ranks on first use; we build the same encoding from
package data instead, and check each file's sha256 first, so a corrupted install fails loudly rather
than silently producing different token ids.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources
from pathlib import Path

import tiktoken

from smallgpt.errors import SmallGPTError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256

# The hashes tiktoken itself pins for these files.
GPT2_FILES = {
    "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs, whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def asset_path(name: str) -> Path:
    """Path of a GPT-2 BPE file inside the installed package."""
    return Path(str(resources.files("smallgpt") / "assets" / "gpt2" / name))


def verified_bytes(name: str) -> bytes:
    """Read a packaged GPT-2 file and check it against its pinned sha256."""
    path = asset_path(name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SmallGPTError(f"GPT-2 tokenizer file missing from the package: {path} ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_FILES[name]:
        raise SmallGPTError(f"GPT-2 tokenizer file {path} is corrupt: sha256 {digest} != {GPT2_FILES[name]}")
    return data


def tokenizer_hash() -> str:
    """The sha256 of the ranks file: recorded with prepared data so a mismatch can be detected."""
    return GPT2_FILES["gpt2.tiktoken"]


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The 50,257-token GPT-2 encoding, identical to `tiktoken.get_encoding("gpt2")`."""
    ranks = {}
    for line in verified_bytes("gpt2.tiktoken").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=EOT_ID + 1,
    )


def encode(text: str) -> list[int]:
    """Token ids of ordinary text; `<|endoftext|>` written in the text is treated as plain text."""
    if not isinstance(text, str):
        raise SmallGPTError(f"text to tokenize must be a string, not {type(text).__name__}")
    return get_tokenizer().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids)


def token_pieces(ids: list[int]) -> list[str]:
    """What each id stands for, as text (bytes that are not valid UTF-8 alone are shown escaped)."""
    enc = get_tokenizer()
    pieces = []
    for token_id in ids:
        raw = enc.decode_single_token_bytes(token_id)
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append(repr(raw)[2:-1])
    return pieces
