"""The error tree in bot/errors.py lists every CantobotError, each under its real parent."""

from __future__ import annotations

import importlib
import pkgutil
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

import bot
from bot import errors
from bot.errors import CantobotError, Fault, LocalError, RemoteError
from bot.storage import common, open_storage_at
from bot.transcript.model import TranscriptError


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def _documented_parents() -> dict[str, str]:
    """Class name -> parent name, read from the tree drawing in the module docstring."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*(?:[│ ]   )*)([├└]── )?([A-Z]\w+)(?=\s{2,}|$)", line)
        if not m or not line.startswith("    "):
            continue
        depth = len(m.group(1)) // 4 + (1 if m.group(2) else 0)
        name = m.group(3)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def test_every_error_class_is_in_the_tree_under_its_parent() -> None:
    for info in pkgutil.walk_packages(bot.__path__, "bot."):
        if not info.name.startswith("bot.sim") and info.name != "bot.__main__":
            importlib.import_module(info.name)
    documented = _documented_parents()
    classes = {c for c in _all_subclasses(CantobotError) if c.__module__.startswith("bot.")
               and not c.__module__.startswith("bot.sim")}
    assert {c.__name__ for c in classes} == set(documented), "the tree and the code differ"
    for cls in classes:
        parent = next(b for b in cls.__mro__[1:] if issubclass(b, CantobotError))
        assert documented[cls.__name__] == parent.__name__, cls


def test_fault_follows_the_branch() -> None:
    assert errors.SttAuthError("x").fault is Fault.REMOTE
    assert errors.ConfigError("f", "k", "p").fault is Fault.LOCAL
    assert issubclass(errors.VoiceError, RemoteError)
    assert issubclass(errors.ConfigError, LocalError)
    assert not issubclass(errors.StreamClosed, CantobotError)


def test_storage_and_transcript_errors_say_whose_fault() -> None:
    assert common.StorageError("database connection lost").fault is Fault.REMOTE
    assert common.MeetingNotFound("no meeting with id 9").fault is Fault.REMOTE
    assert common.MeetingForgotten("meeting 9 was forgotten").fault is Fault.REMOTE
    assert common.LineNotFound("no line with id 9").fault is Fault.REMOTE
    assert common.StorageClosed("storage is closed").fault is Fault.LOCAL
    assert common.StorageMisuse("unknown storage dialect").fault is Fault.LOCAL
    assert TranscriptError("x").fault is Fault.LOCAL and issubclass(TranscriptError, LocalError)


def test_nothing_reports_an_unknown_fault() -> None:
    for info in pkgutil.walk_packages(bot.__path__, "bot."):
        if not info.name.startswith("bot.sim") and info.name != "bot.__main__":
            importlib.import_module(info.name)
    unknown = [c.__name__ for c in _all_subclasses(CantobotError)
               if c.__module__.startswith("bot.") and not c.__module__.startswith("bot.sim")
               and c.fault is Fault.UNKNOWN]
    assert unknown == []


async def test_storage_raises_say_whose_fault(tmp_path: Path) -> None:
    with pytest.raises(common.StorageError) as caught:
        await open_storage_at(str(tmp_path / "missing-dir" / "db.sqlite3"))
    assert caught.value.fault is Fault.REMOTE  # the file system refused it
    with pytest.raises(common.StorageError) as caught:
        await open_storage_at("mysql://db/x")
    assert caught.value.fault is Fault.LOCAL  # our configuration
    storage = await open_storage_at(str(tmp_path / "db.sqlite3"))
    with pytest.raises(common.MeetingNotFound) as not_found:
        await storage.minutes(999)
    assert not_found.value.fault is Fault.REMOTE
    with pytest.raises(common.StorageError) as caught:
        await storage.purge_older_than(-1, datetime(2026, 1, 1, tzinfo=UTC))
    assert caught.value.fault is Fault.LOCAL
    await storage.close()
    with pytest.raises(common.StorageClosed) as closed:
        await storage.minutes(1)
    assert closed.value.fault is Fault.LOCAL
