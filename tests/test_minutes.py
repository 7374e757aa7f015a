"""Minutes writers: Markdown, SRT, WebVTT and JSON, checked by strict validators."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import srt
import webvtt
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.storage import open_storage_at
from bot.transcript.format import MAX_MESSAGE_CHARS
from bot.transcript.minutes import (
    BAR_WIDTH,
    MAX_RENDER_SECONDS,
    from_json,
    meeting_title,
    minutes_files,
    summary_text,
    talk_bar,
    to_json,
    to_markdown,
    to_srt,
    to_vtt,
    write_minutes,
)
from bot.transcript.model import Minutes, Segment, TranscriptError, Word
from bot.transcript.script import PLAIN, JyutpingMode, Readability, Script, to_simplified

T0 = datetime(2026, 3, 4, 9, 30, tzinfo=UTC)

# --- strict validators --------------------------------------------------------------------

_SRT_TIME = re.compile(
    r"^(\d{2}):([0-5]\d):([0-5]\d),(\d{3}) --> (\d{2}):([0-5]\d):([0-5]\d),(\d{3})$"
)
_VTT_TIME = re.compile(
    r"^(\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3}) --> (\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3})$"
)


def _ms(groups: tuple[str, ...]) -> int:
    h, m, s, ms = (int(g) for g in groups)
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def validate_srt(text: str) -> list[tuple[int, int, list[str]]]:
    """Strict SubRip: sequential indices, timing lines, one blank line between cues.

    Returns the cues as (start ms, end ms, text lines); raises AssertionError otherwise.
    """
    assert "\r" not in text
    if text == "":
        return []
    assert text.endswith("\n") and not text.endswith("\n\n"), "file must end with one newline"
    cues = []
    previous_start = -1
    for n, block in enumerate(text[:-1].split("\n\n"), start=1):
        lines = block.split("\n")
        assert len(lines) >= 3, f"cue {n} needs index, timing and text: {block!r}"
        assert lines[0] == str(n), f"cue index {lines[0]!r}, expected {n}"
        match = _SRT_TIME.match(lines[1])
        assert match, f"bad timing line {lines[1]!r}"
        start, end = _ms(match.groups()[:4]), _ms(match.groups()[4:])
        assert start <= end, f"cue {n} ends before it starts"
        assert start >= previous_start, f"cue {n} is numbered out of start order"
        previous_start = start
        for line in lines[2:]:
            assert line.strip(), f"cue {n} has a blank text line"
            assert "-->" not in line, f"cue {n} text contains the timing arrow"
        cues.append((start, end, lines[2:]))
    return cues


def validate_vtt(text: str) -> list[tuple[int, int, str, str]]:
    """Strict WebVTT: header, cues ordered by start, voice-tagged payloads with escaped text.

    Returns (start ms, end ms, voice, text) per cue.
    """
    assert "\r" not in text and "\0" not in text
    assert text.startswith("WEBVTT\n\n") or text == "WEBVTT\n", "missing WEBVTT header"
    cues = []
    previous_start = -1
    for block in text.split("\n\n")[1:]:
        if not block.strip():
            continue
        lines = block.strip("\n").split("\n")
        if "-->" not in lines[0]:  # an optional cue identifier
            lines = lines[1:]
        match = _VTT_TIME.match(lines[0])
        assert match, f"bad timing line {lines[0]!r}"
        start, end = _ms(match.groups()[:4]), _ms(match.groups()[4:])
        assert start <= end, "cue ends before it starts"
        assert start >= previous_start, "cues must be ordered by start time"
        previous_start = start
        payload = lines[1:]
        assert payload and all(line.strip() for line in payload), "empty cue payload line"
        assert all("-->" not in line for line in payload)
        voice = re.match(r"^<v ([^<>&]|&(amp|lt|gt);)+>", payload[0])
        assert voice, f"cue payload lacks a voice tag: {payload[0]!r}"
        body = "\n".join(payload)[voice.end() :]
        assert "<" not in body and ">" not in body, f"unescaped markup in {body!r}"
        assert not re.search(r"&(?!(amp|lt|gt);)", body), f"bare ampersand in {body!r}"
        cues.append((start, end, voice[0][3:-1], body))
    return cues


def test_the_srt_validator_rejects_broken_files() -> None:
    good = "1\n00:00:01,000 --> 00:00:02,000\nalice: hi\n"
    validate_srt(good)
    for bad in (
        good.replace("1\n", "2\n", 1),
        good.replace("00:00:02,000", "00:00:00,500"),
        good.replace("alice: hi", "a --> b"),
        good.replace(",000 -->", ".000 -->"),
        good + "\n2\n00:00:03,000 --> 00:00:04,000\n\nb\n",
        good + "\n2\n00:00:00,000 --> 00:00:04,000\nb\n",
    ):
        with pytest.raises(AssertionError):
            validate_srt(bad)


def test_the_vtt_validator_rejects_broken_files() -> None:
    good = "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\n<v alice>hi\n"
    validate_vtt(good)
    for bad in (
        good.replace("WEBVTT", "WEBVT"),
        good.replace("<v alice>", ""),
        good.replace("hi", "a <b> c"),
        good.replace("hi", "fish & chips"),
        good.replace("00:00:02.000", "00:00:00.000"),
        good + "\n00:00:00.500 --> 00:00:04.000\n<v bob>early\n",
    ):
        with pytest.raises(AssertionError):
            validate_vtt(bad)


# --- meetings to write --------------------------------------------------------------------


def meeting(*segments: Segment, ended_after: float | None = None) -> Minutes:
    ended = T0 + timedelta(seconds=ended_after) if ended_after is not None else None
    return Minutes("週會 weekly", T0, ended, segments)


TRICKY = meeting(
    Segment("阿明", "今日開會，討論預算。", 1.0, 4.25,
            (Word("今日", 1.0, 1.5), Word("開會", 1.5, 2.0))),
    Segment("bob", "I think a --> b\n\nand then\n\n\nmore", 3.0, 6.0),  # overlaps 阿明
    Segment("carol <3", "fish & chips <b>bold</b>", 2.0, 2.0),  # zero-length, starts earliest
    Segment("阿明", "好。", 3725.5, 3727.125),  # past an hour
    ended_after=3800,
)


def test_srt_of_a_tricky_meeting_is_valid_and_numbered_by_start() -> None:
    cues = validate_srt(to_srt(TRICKY))
    assert [c[0] for c in cues] == [1000, 2000, 3000, 3725500]
    assert cues[1][2] == ["carol <3: fish & chips <b>bold</b>"]
    assert cues[2][2] == ["bob: I think a → b and then more"]
    assert cues[3][:2] == (3725500, 3727125)
    assert cues[0][2] == ["阿明: 今日開會，討論預算。"]


def test_vtt_of_a_tricky_meeting_is_valid_with_voice_tags() -> None:
    text = to_vtt(TRICKY)
    cues = validate_vtt(text)
    assert [(c[2], c[3]) for c in cues] == [
        ("阿明", "今日開會，討論預算。"),
        ("carol &lt;3", "fish &amp; chips &lt;b&gt;bold&lt;/b&gt;"),
        ("bob", "I think a → b and then more"),
        ("阿明", "好。"),
    ]
    assert "01:02:05.500 --> 01:02:07.125" in text
    # Overlapping cues are allowed in WebVTT: bob starts before 阿明's first cue ends.
    assert cues[2][0] < cues[0][1]


def test_an_empty_meeting_gives_valid_empty_subtitles() -> None:
    assert validate_srt(to_srt(meeting())) == []
    assert validate_vtt(to_vtt(meeting())) == []


segment_text = st.lists(
    st.sampled_from(list("ab -><&\n今日開會。") + ["-->", "\r\n", "\t", "\n\n"]), max_size=30
).map("".join)
segments = st.builds(
    lambda speaker, text, start, length: Segment(speaker, text, start, start + length),
    st.sampled_from(["alice", "阿明", "<v x>", "a-->b", ""]),
    segment_text,
    st.floats(0, 20000, allow_nan=False),
    st.floats(0, 60, allow_nan=False),
)


@settings(max_examples=150)
@given(st.lists(segments, max_size=12))
def test_any_meeting_gives_valid_srt_and_vtt(segs: list[Segment]) -> None:
    m = meeting(*segs)
    assert len(validate_srt(to_srt(m))) == len(segs)
    assert len(validate_vtt(to_vtt(m))) == len(segs)


# --- markdown, json, summary --------------------------------------------------------------


def test_markdown_lists_the_meeting_then_one_line_per_segment() -> None:
    m = meeting(
        Segment("bob", "係呀", 83.0, 84.0),
        Segment("alice", "今日開會 *重要*", 5.0, 9.0),
        ended_after=600,
    )
    assert to_markdown(m) == (
        "# 週會 weekly\n"
        "\n"
        "- **Date:** 2026-03-04 09:30 UTC\n"
        "- **Duration:** 10:00\n"
        "- **Participants:** alice, bob\n"
        "\n"
        "**[00:05] alice:** 今日開會 \\*重要\\*\n"
        "\n"
        "**[01:23] bob:** 係呀\n"
    )


def test_markdown_switches_to_hh_mm_ss_for_meetings_past_an_hour() -> None:
    md = to_markdown(TRICKY)
    assert "**[00:00:01] 阿明:**" in md
    assert "**[01:02:05] 阿明:** 好。" in md
    assert "- **Duration:** 1:03:20" in md
    assert "\n\n\n" not in md  # blank lines in speech do not leak into the file


def test_json_carries_the_meeting_and_word_timestamps_and_round_trips() -> None:
    text = to_json(TRICKY)
    doc = json.loads(text)
    assert "阿明" in text  # UTF-8, not \u escapes
    assert doc["title"] == "週會 weekly"
    assert doc["started_at"] == "2026-03-04T09:30:00+00:00"
    assert doc["duration"] == 3800.0
    assert doc["participants"] == ["阿明", "carol <3", "bob"]
    assert doc["segments"][0]["words"] == [
        {"text": "今日", "start": 1.0, "end": 1.5},
        {"text": "開會", "start": 1.5, "end": 2.0},
    ]
    assert from_json(text) == TRICKY.sorted()


def test_reading_something_that_is_not_minutes_json_is_a_transcript_error() -> None:
    with pytest.raises(TranscriptError):
        from_json('{"title": "x"}')


def test_write_minutes_writes_four_files_atomically(tmp_path: Path) -> None:
    out = tmp_path / "meeting-1"
    paths = write_minutes(TRICKY, out)
    assert [p.name for p in paths] == ["minutes.md", "minutes.srt", "minutes.vtt", "minutes.json"]
    assert (out / "minutes.srt").read_text(encoding="utf-8") == to_srt(TRICKY)
    assert from_json((out / "minutes.json").read_text(encoding="utf-8")) == TRICKY.sorted()
    first_inode = (out / "minutes.md").stat().st_ino
    shorter = meeting(Segment("bob", "短", 0.0, 1.0))
    write_minutes(shorter, out)
    # Replaced by rename (a new file), not rewritten in place; no temp files left behind.
    assert (out / "minutes.md").stat().st_ino != first_inode
    assert (out / "minutes.md").read_text(encoding="utf-8") == to_markdown(shorter)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)


def test_summary_names_participants_lines_and_talk_time() -> None:
    text = summary_text(TRICKY)
    assert text.splitlines() == [
        "**Minutes: 週會 weekly**",
        "1:03:20 · 3 participants · 4 lines",
        "`███████▍░░░░` 62% 阿明: 2 lines, 00:04 talking",
        "`████▋░░░░░░░` 38% bob: 1 line, 00:03 talking",
        "`░░░░░░░░░░░░` 0% carol \\<3: 1 line, 00:00 talking",
    ]


def test_summary_escapes_names_and_fits_one_message_with_many_speakers() -> None:
    segs = [Segment(f"@everyone{'x' * 60}{i}", "hi", i, i + 1) for i in range(500)]
    text = summary_text(meeting(*segs))
    assert len(text) <= MAX_MESSAGE_CHARS
    assert "@everyone" not in text
    assert "500 participants" in text


# --- readability and minutes at a glance (issue 14) ---------------------------------------

SIMPLIFIED_JP = Readability(Script.SIMPLIFIED, JyutpingMode.LINE)
SPOKEN = meeting(
    Segment("阿明", "我哋今日開會，討論預算。", 1.0, 4.0,
            (Word("我哋", 1.0, 1.5), Word("今日", 1.5, 2.0))),
    Segment("bob", "OK 我哋 Zoom 見", 5.0, 6.0),
    ended_after=60,
)


def test_markdown_follows_the_script_with_the_jyutping_under_each_sentence() -> None:
    md = to_markdown(SPOKEN, SIMPLIFIED_JP)
    assert "**[00:01] 阿明:** 我哋今日开会，讨论预算。\\\n*ngo5dei6 gam1jat6 hoi1wui2，" in md
    assert "**[00:05] bob:** OK 我哋 Zoom 见\\\n*OK ngo5dei6 Zoom gin3*" in md
    assert "開會" not in md
    assert to_markdown(SPOKEN, PLAIN) == to_markdown(SPOKEN)
    assert "開會" in to_markdown(SPOKEN) and "ngo5" not in to_markdown(SPOKEN)


def test_srt_and_vtt_carry_the_jyutping_as_a_second_cue_line() -> None:
    cues = validate_srt(to_srt(SPOKEN, SIMPLIFIED_JP))
    assert cues[0][2] == ["阿明: 我哋今日开会，讨论预算。",
                          "ngo5dei6 gam1jat6 hoi1wui2，tou2leon6 jyu6syun3。"]
    assert cues[1][2] == ["bob: OK 我哋 Zoom 见", "OK ngo5dei6 Zoom gin3"]
    vtt = validate_vtt(to_vtt(SPOKEN, SIMPLIFIED_JP))
    assert vtt[1][2:] == ("bob", "OK 我哋 Zoom 见\nOK ngo5dei6 Zoom gin3")
    # Jyutping off: one text line per cue, as before.
    assert [c[2] for c in validate_srt(to_srt(SPOKEN, Readability(Script.SIMPLIFIED)))][1] == [
        "bob: OK 我哋 Zoom 见"]


def test_json_keeps_the_original_the_converted_text_and_per_word_jyutping() -> None:
    doc = json.loads(to_json(SPOKEN, SIMPLIFIED_JP))
    first = doc["segments"][0]
    assert first["text"] == "我哋今日開會，討論預算。"  # what was said, as stored
    assert first["shown_text"] == to_simplified(first["text"]) == "我哋今日开会，讨论预算。"
    assert first["jyutping"][:3] == [
        {"word": "我哋", "jyutping": "ngo5 dei6"},
        {"word": "今日", "jyutping": "gam1 jat6"},
        {"word": "開會", "jyutping": "hoi1 wui2"},
    ]
    assert doc["segments"][1]["jyutping"][0] == {"word": "OK", "jyutping": None}
    assert doc["readability"] == {"script": "simplified", "jyutping": "line"}
    assert from_json(to_json(SPOKEN, SIMPLIFIED_JP)) == SPOKEN.sorted()  # original kept
    assert "shown_text" not in to_json(SPOKEN)  # PLAIN: the file is as before


def test_minutes_files_render_every_file_for_the_choice() -> None:
    files = minutes_files(SPOKEN, SIMPLIFIED_JP)
    assert list(files) == ["minutes.md", "minutes.srt", "minutes.vtt", "minutes.json"]
    assert all("ngo5dei6" in body or "ngo5 dei6" in body for body in files.values())


def test_talk_time_bars_are_block_characters_of_one_width_longest_first() -> None:
    assert talk_bar(1.0) == "█" * BAR_WIDTH
    assert talk_bar(0.0) == "░" * BAR_WIDTH
    assert talk_bar(0.5) == "█" * 6 + "░" * 6
    assert talk_bar(1 / 96) == "▏" + "░" * 11  # one eighth of one cell
    assert all(len(talk_bar(i / 37)) == BAR_WIDTH for i in range(38))
    assert talk_bar(float("nan")) == talk_bar(-1) == "░" * BAR_WIDTH


def test_summary_bars_for_cjk_and_emoji_names_line_up_longest_first() -> None:
    m = meeting(
        Segment("🎤 Ka-ming 🇭🇰", "一", 0.0, 1.0),
        Segment("陳大文", "二", 1.0, 7.0),
        Segment("👩‍👩‍👧 family", "三", 7.0, 10.0),
        Segment("陳大文", "四", 10.0, 12.0),
        ended_after=754,
    )
    lines = summary_text(m).splitlines()
    assert lines[:2] == ["**Minutes: 週會 weekly**", "12:34 · 3 participants · 4 lines"]
    assert lines[2:] == [
        "`████████░░░░` 67% 陳大文: 2 lines, 00:08 talking",
        "`███░░░░░░░░░` 25% 👩‍👩‍👧 family: 1 line, 00:03 talking",
        "`█░░░░░░░░░░░` 8% 🎤 Ka\\-ming 🇭🇰: 1 line, 00:01 talking",
    ]
    # Every bar is the same width and starts the line, whatever the name.
    assert {line.index("` ") for line in lines[2:]} == {BAR_WIDTH + 1}


def test_titles_read_channel_and_date_or_the_title_given() -> None:
    at = datetime(2026, 12, 1, 13, 50, 42, tzinfo=UTC)
    assert meeting_title("Meeting Room", at) == "Meeting Room · 2026-12-01 13:50 UTC"
    assert meeting_title("meeting", at) == "meeting · 2026-12-01 13:50 UTC"  # not "meeting meeting"
    assert meeting_title("x", at, "  Budget\n review ") == "Budget review"
    assert meeting_title("x", at, "   ") == "x · 2026-12-01 13:50 UTC"
    assert len(meeting_title("x" * 300, at)) <= 100 and len(meeting_title("", at, "y" * 300)) == 100
    hk = datetime(2026, 12, 1, 21, 50, tzinfo=timezone(timedelta(hours=8)))
    assert meeting_title("會議室", hk) == "會議室 · 2026-12-01 13:50 UTC"
# --- rendering never raises for anything storage can hold (issue 12, item 5) ----------------

#: Text storage can hold: any Unicode except lone surrogates (not encodable as UTF-8).
_stored_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_any_time = st.floats(0, 1.7e308, allow_nan=False, allow_infinity=False)


@st.composite
def _stored_segment(draw: st.DrawFn) -> Segment:
    start = draw(_any_time)
    end = max(start, draw(st.one_of(_any_time, st.just(start))))
    words = draw(st.lists(st.builds(lambda t, a, b: Word(t, min(a, b), max(a, b)),
                                    _stored_text, _any_time, _any_time), max_size=3))
    return Segment(draw(_stored_text), draw(_stored_text), start, end, tuple(words))


def _store_and_load(title: str, segs: list[Segment], path: Path) -> Minutes:
    async def run() -> Minutes:
        storage = await open_storage_at(str(path))
        try:
            mid = await storage.start_meeting(guild_id=1, text_channel_id=2, voice_channel_id=3,
                                              title=title, started_at=T0)
            for s in segs:
                await storage.add_line(mid, s)
            await storage.end_meeting(mid, T0 + timedelta(seconds=5))
            return await storage.minutes(mid)
        finally:
            await storage.close()

    return asyncio.run(run())


def _shown_ms(seconds: float) -> int:
    return round(min(seconds, MAX_RENDER_SECONDS) * 1000)


@settings(max_examples=60, deadline=None)
@given(title=_stored_text, segs=st.lists(_stored_segment(), max_size=6))
def test_every_format_renders_and_parses_back_for_anything_storage_holds(
    title: str, segs: list[Segment], tmp_path_factory: pytest.TempPathFactory
) -> None:
    m = _store_and_load(title, segs, tmp_path_factory.mktemp("db") / "m.sqlite3")
    ordered = m.sorted().segments
    to_markdown(m)
    summary_text(m)
    assert from_json(to_json(m)) == m.sorted()
    subs = list(srt.parse(to_srt(m)))
    assert [(round(x.start.total_seconds() * 1000), round(x.end.total_seconds() * 1000))
            for x in subs] == [(_shown_ms(s.start), _shown_ms(s.end)) for s in ordered]
    assert all(x.content.strip() for x in subs)
    cues = webvtt.from_string(to_vtt(m)).captions
    assert [(_vtt_ms(c.start), _vtt_ms(c.end)) for c in cues] == [
        (_shown_ms(s.start), _shown_ms(s.end)) for s in ordered
    ]
    assert all(c.voice is not None and c.text for c in cues)


def _vtt_ms(stamp: str) -> int:
    h, m, rest = stamp.split(":")
    s, ms = rest.split(".")
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(ms)


def test_a_word_time_of_1e306_renders_every_format_at_the_cap() -> None:
    m = meeting(Segment("bob", "hi", 1e306, 1e306, (Word("hi", 1e306, 1e306),)))
    assert "999999:00:00,000 --> 999999:00:00,000" in to_srt(m)
    assert "999999:00:00.000 --> 999999:00:00.000" in to_vtt(m)
    assert "999999:00:00" in to_markdown(m)
