"""A state machine's one rule, shared by the STT session and the meeting (pure).

:func:`change` checks a change against a transition table (a change the table does not list is
a bug: :class:`AssertionError`) and logs each real change once at INFO, so that every life cycle
in the bot reads the same in the log: ``<label> <old> -> <new> (<why>)``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import TypeVar

S = TypeVar("S", bound=enum.Enum)


def change(table: Mapping[S, frozenset[S]], old: S, new: S, *, label: str,
           log: logging.Logger, why: object = None) -> bool:
    """True if ``old`` -> ``new`` is a change (logged); False if ``new is old``."""
    if new is old:
        return False
    if new not in table[old]:
        raise AssertionError(f"illegal {label} state change {old.value} -> {new.value}")
    if why is None or why == "":
        log.info("%s %s -> %s", label, old.value, new.value)
    else:
        log.info("%s %s -> %s (%s)", label, old.value, new.value, why)
    return True
