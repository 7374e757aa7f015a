"""Readability of posted speech: script choice (OpenCC) and a Jyutping line (PyCantonese).

Boundary: pure functions of text (plus two lazily loaded, read-only dictionaries). Nothing here
changes what is stored as said: callers keep the STT's original text and convert only what they
show. Character conversion is OpenCC's, with its Hong Kong configurations (``s2hk``, ``t2hk``,
``hk2s``), never a table of our own; Jyutping and word segmentation are PyCantonese's
(``characters_to_jyutping``).

Cost: OpenCC's dictionaries load in milliseconds, PyCantonese's in about two seconds. The bot
calls :func:`warm_up` once at start-up, which loads both in a worker thread, so neither the
event loop nor the first caption waits for them; after that a line costs well under a
millisecond (see ``bench`` ``script``). Results are memoised per line, so a line posted to the
channel, to its speaker's thread and into the minutes is converted once.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from bot.errors import LocalError

log = logging.getLogger(__name__)


class Script(enum.StrEnum):
    """Which characters posts and minutes use."""

    HK = "hk"  # Hong Kong Traditional (OpenCC's HK standard forms)
    SIMPLIFIED = "simplified"
    AS_IS = "as-is"  # what the speech-to-text service wrote


class JyutpingMode(enum.StrEnum):
    """Whether each posted sentence gets a Jyutping line under it."""

    OFF = "off"
    LINE = "line"


SCRIPT_NAMES = {
    Script.HK: "Hong Kong Traditional",
    Script.SIMPLIFIED: "Simplified",
    Script.AS_IS: "as transcribed",
}


class ReadabilityError(LocalError, ValueError):
    """An unknown script or Jyutping choice (a user's or a config's typo)."""

    permanent = True


def parse_script(value: str) -> Script:
    try:
        return Script(value.strip().lower())
    except ValueError:
        known = ", ".join(s.value for s in Script)
        raise ReadabilityError(f"unknown script {value!r} (choose {known})") from None


def parse_jyutping(value: str) -> JyutpingMode:
    try:
        return JyutpingMode(value.strip().lower())
    except ValueError:
        known = ", ".join(j.value for j in JyutpingMode)
        raise ReadabilityError(f"unknown jyutping mode {value!r} (choose {known})") from None


@dataclass(frozen=True, slots=True)
class Readability:
    """How speech is shown: in which script, and with or without a Jyutping line."""

    script: Script = Script.AS_IS
    jyutping: JyutpingMode = JyutpingMode.OFF

    @classmethod
    def parse(cls, script: str, jyutping: str) -> Readability:
        return cls(parse_script(script), parse_jyutping(jyutping))

    @property
    def plain(self) -> bool:
        """True when shown text is the transcribed text, untouched (today's behaviour)."""
        return self.script is Script.AS_IS and self.jyutping is JyutpingMode.OFF

    @property
    def with_jyutping(self) -> bool:
        return self.jyutping is JyutpingMode.LINE

    def describe(self) -> str:
        """``Simplified, with Jyutping``: for /transcribe status and settings replies."""
        jp = "with Jyutping" if self.with_jyutping else "no Jyutping"
        return f"{SCRIPT_NAMES[self.script]}, {jp}"


#: The default: posts look exactly as transcribed.
PLAIN = Readability()


@dataclass(frozen=True, slots=True)
class ReadabilityChoice:
    """A partial choice (a guild's stored settings, a meeting's options): ``None`` = not set."""

    script: Script | None = None
    jyutping: JyutpingMode | None = None


def resolve_readability(
    meeting: ReadabilityChoice | None,
    guild: ReadabilityChoice | None,
    default: Readability,
) -> Readability:
    """The effective choice, field by field: the meeting's option, else the guild's setting,
    else the config default (``transcribe.script`` / ``transcribe.jyutping``)."""
    script, jyutping = default.script, default.jyutping
    for choice in (guild, meeting):  # later wins
        if choice is None:
            continue
        if choice.script is not None:
            script = choice.script
        if choice.jyutping is not None:
            jyutping = choice.jyutping
    return Readability(script, jyutping)


# -- the libraries, loaded once ------------------------------------------------------------

_lock = threading.Lock()
_converters: dict[str, Any] = {}
_jyutping_ready = False
#: The thread that loaded PyCantonese's dictionary (the tests check it is not the loop's).
loaded_on: str | None = None
_warm_task: asyncio.Future[None] | None = None


def _converter(config: str) -> Any:
    cc = _converters.get(config)
    if cc is None:
        import opencc  # a few ms: its dictionaries are small

        with _lock:
            cc = _converters.get(config)
            if cc is None:
                cc = opencc.OpenCC(config)
                _converters[config] = cc
    return cc


def _load_all() -> None:
    """Load OpenCC's three configurations and PyCantonese's dictionary (blocking, ~2 s)."""
    global _jyutping_ready, loaded_on
    for config in ("s2hk", "t2hk", "hk2s"):
        _converter(config)
    with _lock:
        if _jyutping_ready:
            return
        import pycantonese

        pycantonese.characters_to_jyutping("大家好")  # the first call loads the dictionary
        loaded_on = threading.current_thread().name
        _jyutping_ready = True


def is_warm() -> bool:
    return _jyutping_ready


async def warm_up() -> None:
    """Load the dictionaries in a worker thread, once per process (later calls share it).

    Awaited in the bot's start-up, so the first caption never pays for the load.
    """
    global _warm_task
    if _jyutping_ready:
        return
    if _warm_task is None or _warm_task.get_loop() is not asyncio.get_running_loop():
        _warm_task = asyncio.ensure_future(asyncio.to_thread(_load_all))
    await asyncio.shield(_warm_task)


# -- script --------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _looks_simplified(text: str) -> bool:
    # Text that simplification leaves unchanged has no Traditional-only characters.
    return bool(_converter("hk2s").convert(text) == text)


def to_hk(text: str) -> str:
    """Hong Kong Traditional. Text already Traditional goes through ``t2hk`` (variants only:
    ``s2hk`` would re-guess characters such as 晒 or 里 that are already right); text with no
    Traditional-only characters is converted from Simplified with ``s2hk``."""
    config = "s2hk" if _looks_simplified(text) else "t2hk"
    return str(_converter(config).convert(text))


def to_simplified(text: str) -> str:
    """Simplified, from Hong Kong (or any) Traditional, with ``hk2s``."""
    return str(_converter("hk2s").convert(text))


def convert(text: str, script: Script) -> str:
    """``text`` in ``script`` (``as-is`` returns it unchanged)."""
    if script is Script.HK:
        return to_hk(text)
    if script is Script.SIMPLIFIED:
        return to_simplified(text)
    return text


# -- Jyutping ------------------------------------------------------------------------------

_HAN = "\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_RUNS = re.compile(f"[{_HAN}]+|[^{_HAN}\\s]+")
_IS_HAN = re.compile(f"[{_HAN}]")


@dataclass(frozen=True, slots=True)
class JyutpingWord:
    """One segmented word (or a passed-through Latin word / punctuation) and its Jyutping.

    ``text`` is in Hong Kong characters, as PyCantonese read it; ``jyutping`` is
    space-separated syllables (``ngo5 dei6``), or ``None`` for what passes through.
    ``glue`` says the word follows the previous one with no space in the source.
    """

    text: str
    jyutping: str | None
    glue: bool = False


@lru_cache(maxsize=4096)
def _syllables(word: str) -> str | None:
    """One word's Jyutping from PyCantonese, character by character if the word is unknown."""
    import pycantonese

    found: list[tuple[str, str | None]] = pycantonese.characters_to_jyutping(word)
    if len(found) == 1 and found[0][1] is not None:
        return found[0][1]
    out = []
    for piece, jp in found:
        if jp is not None:
            out.append(jp)
            continue
        for ch in piece:  # an unknown word: its characters one by one
            if not _IS_HAN.match(ch):
                return None
            single: list[tuple[str, str | None]] = pycantonese.characters_to_jyutping(ch)
            if not single or single[0][1] is None:
                return None
            out.append(single[0][1])
    return " ".join(out) if out else None


def _segment(hk: str) -> list[tuple[int, int, str | None]]:
    """PyCantonese's words of the whole line, as ``(start, end, jyutping)`` spans of ``hk``.

    One call per line (PyCantonese's per-call cost dominates short runs). It drops
    whitespace and keeps every other character in order, so each word is found where the
    previous one ended.
    """
    import pycantonese

    if not _jyutping_ready:
        log.warning("PyCantonese used before warm_up(): loading it now, on this thread")
        _load_all()
    spans = []
    at = 0
    for word, jp in pycantonese.characters_to_jyutping(hk):
        start = hk.find(word, at)
        if start < 0:  # not a substring (never seen): skip it rather than misplace it
            continue
        at = start + len(word)
        spans.append((start, at, jp))
    return spans


def _han_words(run: str, start: int, spans: list[tuple[int, int, str | None]], first: int,
               ) -> tuple[list[tuple[str, str | None]], int]:
    """The words of one Han run at ``start``, from the line's spans (looked at from index
    ``first`` on); returns them and where the next run's look starts.

    A word PyCantonese read whole keeps its reading; a word with no reading, or one glued to
    a neighbouring non-Han character, falls back to per-character readings.
    """
    end = start + len(run)
    words: list[tuple[str, str | None]] = []
    covered = start
    while first < len(spans) and spans[first][1] <= start:
        first += 1
    for a, b, jp in itertools.islice(spans, first, None):
        if a >= end:
            break
        lo, hi = max(a, start), min(b, end)
        if lo > covered:  # characters no word covered
            words.extend((ch, _syllables(ch)) for ch in run[covered - start:lo - start])
        piece = run[lo - start:hi - start]
        if jp is not None and (lo, hi) == (a, b):
            words.append((piece, jp))
        else:
            reading = _syllables(piece)
            if reading is None and len(piece) > 1:
                words.extend((ch, _syllables(ch)) for ch in piece)
            else:
                words.append((piece, reading))
        covered = hi
    if covered < end:
        words.extend((ch, _syllables(ch)) for ch in run[covered - start:])
    return words, first


@lru_cache(maxsize=4096)
def jyutping_words(text: str) -> tuple[JyutpingWord, ...]:
    """``text``'s words in order, each with its Jyutping (Han words) or passed through.

    PyCantonese reads Traditional characters, so the text is read in its Hong Kong form.
    Latin words, numbers, emoji and punctuation pass through unchanged.
    """
    hk = to_hk(text)
    spans = _segment(hk) if _IS_HAN.search(hk) else []
    out: list[JyutpingWord] = []
    prev_end = -1
    first = 0
    for match in _RUNS.finditer(hk):
        glue = match.start() == prev_end
        prev_end = match.end()
        run = match.group()
        if _IS_HAN.match(run):
            words, first = _han_words(run, match.start(), spans, first)
            for i, (word, jp) in enumerate(words):
                out.append(JyutpingWord(word, jp, glue if i == 0 else True))
        else:
            out.append(JyutpingWord(run, None, glue))
    return tuple(out)


def _opens(ch: str) -> bool:
    return unicodedata.category(ch) in ("Ps", "Pi")


def _punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def _wide_punct(ch: str) -> bool:
    # Full-width punctuation (，。？) carries its own space.
    return _punct(ch) and unicodedata.east_asian_width(ch) in ("F", "W")


def jyutping_line(text: str) -> str:
    """One group per word (``ngo5dei6 gam1jat6 hoi1wui2``), in the sentence's order.

    What passes through keeps its place; punctuation sits against its word as in the text
    (``hou2，m4hou2``, ``「Jyutping」``), other neighbours are separated by one space.
    """
    parts: list[str] = []
    for w in jyutping_words(text):
        shown = w.text if w.jyutping is None else w.jyutping.replace(" ", "")
        if parts and not (w.glue and (_opens(parts[-1][-1]) or _wide_punct(parts[-1][-1])
                                      or _punct(shown[0]) and not _opens(shown[0]))):
            parts.append(" ")
        parts.append(shown)
    return "".join(parts)


def clear_caches() -> None:
    """Forget memoised lines (the bench measures first conversions, not cache hits)."""
    for cached in (_looks_simplified, jyutping_words):
        cached.cache_clear()


# -- a line as read --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """A committed line as shown: its original text, converted text and Jyutping (when on)."""

    original: str
    text: str
    words: tuple[JyutpingWord, ...] = ()
    jyutping: str | None = None

    def words_json(self) -> list[dict[str, str | None]]:
        """Per-word Jyutping for the minutes JSON (``word`` in Hong Kong characters)."""
        return [{"word": w.text, "jyutping": w.jyutping} for w in self.words]


def read_line(text: str, readability: Readability) -> Reading:
    """Convert ``text`` once for showing; the original stays alongside it."""
    shown = convert(text, readability.script)
    if not readability.with_jyutping:
        return Reading(text, shown)
    return Reading(text, shown, jyutping_words(text), jyutping_line(text) or None)
