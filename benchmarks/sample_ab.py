"""`smallgpt sample` against another checkout of SmallGPT, alternated in one run, on this machine.

    .venv/bin/python benchmarks/sample_ab.py --baseline /path/to/other/checkout/src

Writes random-weight checkpoints of the given presets, then runs `python -m smallgpt sample` on each,
once with this checkout's code and once with the baseline's (PYTHONPATH), A/B/A/B for --repeats
rounds, and reads the tokens/s that sample prints to stderr (generation only, not start-up). One
prompt, one sample, --max-new-tokens tokens at the default temperature with a fixed seed, so both
sides generate the same number of tokens (checked). Prints best and median tokens/s per side and
the ratio of the bests.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
SUMMARY = re.compile(r"\[(\d+) tokens, (\d+) tokens/s")


def random_checkpoint(preset: str, directory: Path) -> Path:
    import torch

    from smallgpt.checkpoint import save_weights
    from smallgpt.config import get_preset
    from smallgpt.model import GPT

    torch.manual_seed(0)
    path = directory / f"{preset}.safetensors"
    save_weights(GPT(get_preset(preset)), path)
    return path


def sample_rate(src: Path, checkpoint: Path, tokens: int, threads: int) -> tuple[int, float]:
    """(tokens generated, tokens/s) of one `smallgpt sample` run with the code in `src`."""
    command = [sys.executable, "-m", "smallgpt", "sample", str(checkpoint), "--prompt", "Once upon a time"]
    command += ["--max-new-tokens", str(tokens), "--seed", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    match = SUMMARY.search(result.stderr)
    if result.returncode != 0 or match is None:
        sys.exit(f"sample failed ({src}):\n{result.stderr[-2000:]}")
    return int(match[1]), float(match[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the other checkout's src directory")
    parser.add_argument("--presets", nargs="+", default=["tiny", "smallgpt-10m"])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sides = {"this checkout": HERE, "baseline": Path(args.baseline).resolve()}
    print(f"smallgpt sample, 1 prompt, {args.max_new_tokens} new tokens, {args.threads} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            checkpoint = random_checkpoint(preset, Path(tmp))
            rates, counts = {side: [] for side in sides}, set()
            for _ in range(args.repeats):
                for side, src in sides.items():
                    count, rate = sample_rate(src, checkpoint, args.max_new_tokens, args.threads)
                    rates[side].append(rate)
                    counts.add(count)
            if len(counts) != 1:
                sys.exit(f"{preset}: the sides generated different numbers of tokens: {sorted(counts)}")
            for side, values in rates.items():
                best, median = max(values), statistics.median(values)
                print(f"{preset:14s} {side:14s} best {best:5.0f} tokens/s, median {median:5.0f} ({values})")
            ratio = max(rates["this checkout"]) / max(rates["baseline"])
            tokens = counts.pop()
            print(f"{preset:14s} new / baseline {ratio:.2f}x (best of {args.repeats}, {tokens} tokens)")


if __name__ == "__main__":
    main()
