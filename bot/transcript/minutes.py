"""Minutes writers: a meeting's :class:`~bot.transcript.model.Minutes` as Markdown, SRT,
WebVTT and JSON, plus a short summary for a Discord message.

Boundary: the ``to_*`` functions and :func:`summary_text` are pure (``Minutes`` in, ``str``
out). :func:`write_minutes` is the one function touching the filesystem; it writes each file
atomically (temp file in the same directory, ``fsync``, ``os.replace``) so a crash never
leaves half a file where a complete one used to be.

Speech is free text, so each format sanitises it: newlines and blank lines collapse to one
space (a blank line ends an SRT/VTT cue), ``-->`` cannot appear in cue text (it is the
timing separator), and WebVTT text escapes ``&``, ``<`` and ``>``. Overlapping speakers give
overlapping cues, which both formats allow; SRT cues are numbered in order of start time.

Readability: each renderer takes a :class:`~bot.transcript.script.Readability`. The Markdown,
SRT and VTT show speech in the chosen script with the Jyutping under each sentence when it is
on; the JSON keeps the original text (``text``, what was said and stored) next to the shown
text and per-word Jyutping. The default, ``PLAIN``, writes exactly what was transcribed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.transcript.format import MAX_MESSAGE_CHARS, escape, format_timestamp
from bot.transcript.model import Minutes, Segment, TranscriptError, Word
from bot.transcript.script import PLAIN, Readability, Reading, read_line

#: JSON layout version, bumped when a field changes meaning.
JSON_FORMAT_VERSION = 1
#: Meeting titles are stored and shown whole up to this length (a thread name's limit).
MAX_TITLE_CHARS = 100
#: Speakers listed by name in :func:`summary_text` before "and N more".
SUMMARY_MAX_SPEAKERS = 25
#: WebVTT voice names cannot contain these (they end the ``<v ...>`` tag).
_VTT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _one_line(text: str) -> str:
    """Collapse every run of whitespace (newlines, blank lines) to one space."""
    return " ".join(text.split())


def _cue_text(text: str) -> str:
    """Text safe inside an SRT cue: one line, and no ``-->`` (the timing separator)."""
    line = _one_line(text)
    while "-->" in line:
        line = line.replace("-->", "\u2192")
    return line


#: Latest time a subtitle cue shows (999 999 h). Storage holds any finite time >= 0 and
#: rendering minutes must never raise (``round(1e306 * 1000)`` overflows); no real meeting
#: comes near this, and WebVTT readers take at most 10 hour digits.
MAX_RENDER_SECONDS = 999_999 * 3600.0


def _renderable(seconds: float) -> float:
    """``seconds`` within [0, MAX_RENDER_SECONDS] (NaN -> 0): what every writer prints."""
    return min(max(seconds, 0.0), MAX_RENDER_SECONDS) if seconds == seconds else 0.0


def _clock(seconds: float, sep: str) -> str:
    """``HH:MM:SS<sep>mmm`` as used by SRT (``,``) and WebVTT (``.``)."""
    ms = round(_renderable(seconds) * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def _hms(seconds: float) -> str:
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


#: Inline Markdown that speech could trigger mid-line (CommonMark); every line of the file
#: starts with our own ``**[`` so block syntax (``#``, ``-``, ``>``) cannot trigger.
_MD_INLINE = str.maketrans({c: "\\" + c for c in "\\`*_~[]<>|"})


def _markdown_text(text: str) -> str:
    """One line with inline markdown escaped; lighter than Discord escaping, so it stays
    readable in a plain editor."""
    return _one_line(text).translate(_MD_INLINE)


def _date(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def to_markdown(m: Minutes, readability: Readability = PLAIN) -> str:
    """Title, date, duration, participants, then ``**[mm:ss] alice:** text`` per segment.

    Timestamps switch to ``hh:mm:ss`` for every line once the meeting passes an hour, so
    the column stays aligned. With Jyutping on, a hard line break and the sentence's Jyutping
    in italics follow each line.
    """
    m = m.labelled().sorted()
    long_meeting = m.duration >= 3600
    stamp: Callable[[float], str] = _hms if long_meeting else format_timestamp
    lines = [f"# {_markdown_text(m.title) or 'Meeting'}", ""]
    lines.append(f"- **Date:** {_date(m.started_at)}")
    lines.append(f"- **Duration:** {format_timestamp(_renderable(m.duration))}")
    names = ", ".join(_markdown_text(p) for p in m.participants) or "nobody spoke"
    lines.append(f"- **Participants:** {names}")
    lines.append("")
    for s in m.segments:
        reading = read_line(_one_line(s.text), readability)
        speaker, text = _markdown_text(s.speaker), _markdown_text(reading.text)
        lines.append(f"**[{stamp(_renderable(s.start))}] {speaker}:** {text}")
        if reading.jyutping:
            lines[-1] += "\\"  # CommonMark hard line break
            lines.append(f"*{_markdown_text(reading.jyutping)}*")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _cue_lines(s: Segment, readability: Readability) -> tuple[str, str | None]:
    """A cue's text line and, with Jyutping on, its second line."""
    reading = read_line(_one_line(s.text), readability)
    jp = _cue_text(reading.jyutping) if reading.jyutping else None
    return _cue_text(reading.text), jp or None


def to_srt(m: Minutes, readability: Readability = PLAIN) -> str:
    """SubRip: one cue per segment, numbered from 1 in order of start time; the Jyutping, when
    on, is the cue's second line."""
    blocks = []
    for index, s in enumerate(m.labelled().sorted().segments, start=1):
        timing = f"{_clock(s.start, ',')} --> {_clock(s.end, ',')}"
        text, jp = _cue_lines(s, readability)
        second = f"{jp}\n" if jp else ""
        blocks.append(f"{index}\n{timing}\n{_cue_text(s.speaker)}: {text or '…'}\n{second}")
    return "\n".join(blocks)


def to_vtt(m: Minutes, readability: Readability = PLAIN) -> str:
    """WebVTT: ``WEBVTT`` header, then one cue per segment with a ``<v speaker>`` voice tag
    (and the Jyutping, when on, as the cue's second line)."""
    out = ["WEBVTT", ""]
    for s in m.labelled().sorted().segments:
        voice = _cue_text(s.speaker).translate(_VTT_ESCAPES) or "speaker"
        shown, jp = _cue_lines(s, readability)
        text = shown.translate(_VTT_ESCAPES) or "…"
        out.append(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}")
        out.append(f"<v {voice}>{text}")
        if jp:
            out.append(jp.translate(_VTT_ESCAPES))
        out.append("")
    return "\n".join(out)


def _segment_json(s: Segment, readability: Readability = PLAIN) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "speaker": s.speaker,
        "speaker_id": s.speaker_id,
        "text": s.text,
        "start": s.start,
        "end": s.end,
        "words": [{"text": w.text, "start": w.start, "end": w.end} for w in s.words],
    }
    if not readability.plain:
        reading: Reading = read_line(_one_line(s.text), readability)
        doc["shown_text"] = reading.text
        if readability.with_jyutping:
            doc["jyutping"] = reading.words_json()
    return doc


def to_json(m: Minutes, readability: Readability = PLAIN) -> str:
    """The meeting's fields and every segment with its word timestamps (UTF-8, not ASCII).

    ``text`` is always what was said (as stored); with a script or Jyutping chosen, each
    segment also has ``shown_text`` (in the chosen script) and ``jyutping`` (per word:
    ``{"word": "我哋", "jyutping": "ngo5 dei6"}``, ``null`` for what passes through).
    """
    doc: dict[str, Any] = {
        "format_version": JSON_FORMAT_VERSION,
        "title": m.title,
        "started_at": m.started_at.isoformat(),
        "ended_at": m.ended_at.isoformat() if m.ended_at is not None else None,
        "duration": m.duration,
        "participants": list(m.participants),
        "segments": [_segment_json(s, readability) for s in m.labelled().sorted().segments],
    }
    if not readability.plain:
        doc["readability"] = {"script": readability.script.value,
                              "jyutping": readability.jyutping.value}
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def from_json(text: str) -> Minutes:
    """Read back what :func:`to_json` wrote (for replays and tests)."""
    try:
        doc = json.loads(text)
        ended = doc["ended_at"]
        return Minutes(
            title=doc["title"],
            started_at=datetime.fromisoformat(doc["started_at"]),
            ended_at=datetime.fromisoformat(ended) if ended is not None else None,
            segments=tuple(
                Segment(
                    speaker=s["speaker"],
                    text=s["text"],
                    start=s["start"],
                    end=s["end"],
                    words=tuple(Word(w["text"], w["start"], w["end"]) for w in s["words"]),
                    speaker_id=s["speaker_id"],
                )
                for s in doc["segments"]
            ),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise TranscriptError(f"not a cantobot minutes JSON document: {exc}") from exc


#: The files :func:`write_minutes` produces, and the writer of each.
MINUTES_FILES: dict[str, Callable[[Minutes, Readability], str]] = {
    "minutes.md": to_markdown,
    "minutes.srt": to_srt,
    "minutes.vtt": to_vtt,
    "minutes.json": to_json,
}


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def minutes_files(m: Minutes, readability: Readability = PLAIN) -> dict[str, str]:
    """Every minutes file's name and text, rendered for ``readability``."""
    return {name: render(m, readability) for name, render in MINUTES_FILES.items()}


def write_minutes(
    m: Minutes, directory: str | os.PathLike[str], readability: Readability = PLAIN
) -> list[Path]:
    """Write ``minutes.md/.srt/.vtt/.json`` into ``directory`` (created if missing)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in minutes_files(m, readability).items():
        path = out / name
        _write_atomic(path, text)
        paths.append(path)
    return paths


#: Width of a talk-time bar in character cells; each cell shows eighths.
BAR_WIDTH = 12
_FULL, _EMPTY = "\u2588", "\u2591"  # FULL BLOCK, LIGHT SHADE
_EIGHTHS = ("", "\u258f", "\u258e", "\u258d", "\u258c", "\u258b", "\u258a", "\u2589")


def talk_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``█████▍░░░░░░``: ``fraction`` of ``width`` cells in block characters, which every
    Discord client renders (no images, no emoji), always exactly ``width`` characters."""
    if not math.isfinite(fraction):
        fraction = 0.0
    eighths = round(min(1.0, max(0.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    bar = _FULL * full + _EIGHTHS[part]
    return bar + _EMPTY * (width - len(bar))


def talk_time_lines(m: Minutes) -> list[str]:
    """One line per speaker, longest talker first: bar, share, name, lines and talk time.

    ``███████▌░░░░ 63% 阿明: 2 lines, 00:04 talking``, the bar in inline code before the
    name, so bars line up whatever the names are (CJK, emoji, long); names are escaped.
    """
    lines_by = m.lines_per_speaker
    talk_by = m.talk_time_per_speaker
    total = sum(talk_by.values())
    order = sorted(lines_by, key=lambda name: -talk_by[name])  # stable: ties keep first speech
    out = []
    for name in order:
        share = talk_by[name] / total if 0 < total < math.inf else 0.0
        n = lines_by[name]
        out.append(
            f"`{talk_bar(share)}` {round(share * 100):d}% {escape(_one_line(name))}:"
            f" {n} line{'s' if n != 1 else ''},"
            f" {format_timestamp(_renderable(talk_by[name]))} talking"
        )
    return out


def meeting_title(channel_name: str, started_at: datetime, given: str | None = None) -> str:
    """A title that reads naturally: the one given to ``/transcribe start title:``, else
    ``Meeting Room · 2026-12-01 13:50 UTC`` (the voice channel and when it started)."""
    if given is not None and _one_line(given):
        return _one_line(given)[:MAX_TITLE_CHARS]
    channel = _one_line(channel_name) or "Meeting"
    return f"{channel[:MAX_TITLE_CHARS - 24]} \u00b7 {_date(started_at.astimezone(UTC))}"


def summary_text(m: Minutes) -> str:
    """A short Discord message: duration, participants, lines, then each speaker's share of
    the talking time as a bar (longest first) with their line count and talk time.

    Names are escaped (no markdown, no pings); long speaker lists end with "and N more" so
    the message always fits in one Discord message.
    """
    lines_by = m.lines_per_speaker
    count = len(lines_by)
    length = format_timestamp(_renderable(m.duration))
    head = [
        f"**Minutes: {escape(_one_line(m.title)) or 'Meeting'}**",
        f"{length} · {count} participant{'s' if count != 1 else ''}"
        f" · {sum(lines_by.values())} lines",
    ]
    body = talk_time_lines(m)[:SUMMARY_MAX_SPEAKERS]
    if count > SUMMARY_MAX_SPEAKERS:
        body.append(f"… and {count - SUMMARY_MAX_SPEAKERS} more")
    text = "\n".join(head + body)
    while len(text) > MAX_MESSAGE_CHARS and body:  # pathological names: drop whole lines
        body.pop()
        text = "\n".join([*head, *body, "…"])
    return text[:MAX_MESSAGE_CHARS]
