"""The code base stays clean under the linters configured in pyproject.toml.

``ruff check`` (E, F, I, B, UP, ASYNC, RUF006; line length 100) covers bot/, cogs/, bench/ and
tests/; ``mypy`` (strict) covers bot/, cogs/ and bench/. Both run as subprocesses from the
repository root, exactly as a developer would, so CI fails with the tools' own report. Their
versions are pinned in pyproject's ``test`` extra: a new release may add checks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
#: A bound against a hung tool, not a speed target (mypy from a cold cache takes ~10 s here).
TOOL_TIMEOUT_S: Final = 170


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


def test_ruff_finds_nothing_in_bot_cogs_bench_and_tests() -> None:
    result = run_tool("ruff", "check", "--no-fix", "bot", "cogs", "bench", "tests")
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"


def test_mypy_strict_finds_nothing_in_bot_cogs_and_bench() -> None:
    result = run_tool("mypy", "bot", "cogs", "bench")
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
    # A run that checked nothing (wrong directory, config not found) must not pass as clean.
    assert "Success: no issues found" in result.stdout, result.stdout
