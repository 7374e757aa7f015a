"""The README's first lines, its command table and its invite link say what the code does."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bot.cli import build_parser
from bot.invite import permission_integer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> tuple[str, str]:
    first, second = [line.strip() for line in README.splitlines()[2:4]]
    return first, second


def test_the_two_readme_commands_use_one_virtual_environment_after_apt_get_update() -> None:
    install, test = readme_commands()
    steps = [s.strip() for s in install.split("&&")]
    assert steps[0] == "apt-get update"
    assert steps[1].startswith("apt-get install -y ") and "python3-venv" in steps[1]
    assert steps[2] == "python3 -m venv .venv"
    assert all(s.startswith(".venv/bin/") for s in steps[3:]), steps
    assert test == ".venv/bin/python -m pytest -q"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test


def test_the_command_table_lists_every_subcommand() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f"| `cantobot {name}" in README, name


def test_the_readme_invite_link_has_the_computed_permissions() -> None:
    (link,) = re.findall(r"https://discord\.com/oauth2/authorize\?[^`\s]*", README)
    assert link == ("https://discord.com/oauth2/authorize?client_id=APPLICATION_ID"
                    f"&scope=bot+applications.commands&permissions={permission_integer()}")
