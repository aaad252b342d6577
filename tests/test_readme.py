"""The README's cheap console examples, rerun: a change of output fails here until the README follows.

A ```console block preceded by `<!-- checked -->` is a script: each `$ ` line (with its `\\`
continuation lines) runs in bash, in a fresh directory, with `smallgpt` on the PATH, and what it prints
(stdout and stderr together) must equal the lines that follow it; `…` in an expected line stands for
any text (timings, temporary paths). Blocks without the marker (training, serving) are not rerun.

`python tests/test_readme.py` prints what the checked commands print now, to paste into the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- checked -->"
# Fixed width for rich's tables, and no colour, so the output is the same in any terminal or CI.
ENV = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1"}


def checked_blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each checked block as a list of (command, expected output lines)."""
    blocks = re.findall(re.escape(MARKER) + r"\s*```console\n(.*?)```", text, flags=re.S)
    parsed = []
    for block in blocks:
        steps: list[tuple[str, list[str]]] = []
        lines = iter(block.splitlines())
        for line in lines:
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith("\\"):
                    command = command[:-1] + next(lines).strip()
                steps.append((command, []))
            else:
                steps[-1][1].append(line)
        parsed.append(steps)
    return parsed


def run(command: str, cwd: Path) -> list[str]:
    """`command` in bash, with a `smallgpt` that is this interpreter's module, in `cwd`."""
    shim = cwd / ".bin" / "smallgpt"
    if not shim.exists():
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m smallgpt "$@"\n')
        shim.chmod(0o755)
    env = {**ENV, "PATH": f"{shim.parent}{os.pathsep}{ENV['PATH']}", "SMALLGPT_CACHE": str(cwd / ".cache")}
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    return [line.rstrip() for line in output.splitlines()]


def matches(expected: str, actual: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.rstrip().split("…"))
    return re.fullmatch(pattern, actual) is not None


BLOCKS = checked_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_checked_examples():
    assert len(BLOCKS) >= 3 and all(BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[steps[0][0][:40] for steps in BLOCKS])
def test_checked_example_prints_what_the_readme_shows(block, tmp_path):
    for command, expected in block:
        actual = run(command, tmp_path)
        assert len(actual) == len(expected) and all(map(matches, expected, actual)), (
            f"README drifted for `$ {command}`; it prints now:\n" + "\n".join(actual)
        )


if __name__ == "__main__":
    import tempfile

    for block in BLOCKS:
        with tempfile.TemporaryDirectory() as directory:
            for command, _ in block:
                print(f"$ {command}")
                print("\n".join(run(command, Path(directory))))
        print("-" * 100)
