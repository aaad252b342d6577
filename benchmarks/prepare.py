"""End-to-end speed and memory of `smallgpt prepare` on the whole mixcorpus train split.

    .venv/bin/python benchmarks/prepare.py            (about 30 s on 2 cores)

Runs `smallgpt prepare ../shared/data/mixcorpus/train.jsonl.gz --val-fraction 0` in a child process,
as a user would (start-up included), and reports wall time, tokens/s and the child's peak RSS. For
scale it then times tiktoken alone on the same texts with all cores (no reading, no writing): the ratio
of the two rates says how much the pipeline costs beyond tokenizing, whatever the machine.
Targets (issue 3): ≤ 20 s, < 1 GB peak RSS, exactly 22,730 documents and 23,476,245 tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "mixcorpus" / "train.jsonl.gz"


def run_prepare(out_dir: Path) -> tuple[float, float, float, dict]:
    """(wall seconds, CPU seconds, peak RSS in MiB, meta) of one `smallgpt prepare` child process."""
    command = [sys.executable, "-m", "smallgpt", "prepare", str(TRAIN), "--out", str(out_dir)]
    started = time.perf_counter()
    subprocess.run([*command, "--val-fraction", "0", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mib = usage.ru_maxrss / 1024  # Linux reports KiB
    return wall, usage.ru_utime + usage.ru_stime, peak_mib, json.loads((out_dir / "meta.json").read_text())


def tiktoken_alone_rate() -> float:
    """Tokens per second of tiktoken's own batch encoder over the same texts, all cores."""
    from smallgpt.tokenizer import get_tokenizer

    with gzip.open(TRAIN, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    encoding = get_tokenizer()
    started = time.perf_counter()
    tokens = sum(map(len, encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    if not TRAIN.is_file():
        sys.exit(f"benchmark corpus not found: {TRAIN}")
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, peak_mib, meta = run_prepare(Path(tmp) / "data")
    train = meta["splits"]["train"]
    rate = train["tokens"] / wall
    print(f"corpus:            {TRAIN} ({os.cpu_count()} cores)")
    print(f"documents, tokens: {train['documents']:,}, {train['tokens']:,} (EOT included)")
    print(f"wall time:         {wall:.1f} s end to end (in-process {meta['seconds']} s)")
    print(f"CPU time:          {cpu:.1f} s (user + system; on a quiet machine wall ≥ CPU / cores)")
    print(f"throughput:        {rate / 1e6:.2f}M tokens/s")
    print(f"peak RSS:          {peak_mib:,.0f} MiB")
    reference = tiktoken_alone_rate()
    print(f"tiktoken alone:    {reference / 1e6:.2f}M tokens/s → pipeline at {rate / reference:.0%} of it")
    if (train["documents"], train["tokens"]) != (22_730, 23_476_245):
        sys.exit("token counts differ from the expected 22,730 documents / 23,476,245 tokens")


if __name__ == "__main__":
    main()
