"""Every text cut for Discord is cut by UTF-16 units (issue 12 item 7).

Astral characters (emoji, CJK Extension B characters used in Cantonese such as 𠵱) are one code
point but two UTF-16 units; a cut by code points (``text[:2000]``) sends up to 4000 units.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.meeting.ledger import MESSAGE_LIMIT, MinutesPost
from bot.transcript.format import ELLIPSIS, MAX_MESSAGE_CHARS, cut_message, message_length
from bot.transcript.minutes import summary_text
from bot.transcript.model import Minutes, Segment

EMOJI = "\N{GRINNING FACE}"  # U+1F600: two UTF-16 units
EXT_B = "\U00020D71"  # 𠵱 (CJK Extension B): two UTF-16 units


def utf16_units(text: str) -> int:
    """What Discord's JavaScript clients count: the UTF-16 encoding's length (independent of
    :func:`message_length`, so the helper is checked against the encoding itself)."""
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize("astral", [EMOJI, EXT_B], ids=["emoji", "cjk-ext-b"])
@pytest.mark.parametrize("before", [1997, 1998, 1999])
def test_an_astral_character_at_the_boundary_is_kept_whole_or_left_out(
    astral: str, before: int
) -> None:
    text = "a" * before + astral + "b" * 10
    cut = cut_message(text)
    assert utf16_units(cut) <= MAX_MESSAGE_CHARS
    assert cut.endswith(ELLIPSIS)
    kept = cut[: -len(ELLIPSIS)]
    assert text.startswith(kept)
    # The astral character is whole (it fits) or absent (it does not): never half of it.
    fits = before + 2 + len(ELLIPSIS) <= MAX_MESSAGE_CHARS
    assert (astral in kept) is fits
    cut.encode("utf-16-le", errors="strict")  # no lone surrogate


def test_text_within_the_limit_is_unchanged() -> None:
    text = EXT_B * 1000  # exactly 2000 units
    assert cut_message(text) == text
    assert cut_message(text + "a") == EXT_B * 999 + ELLIPSIS


def test_an_emoji_sequence_is_not_torn_at_the_cut() -> None:
    family = "\N{MAN}\u200d\N{WOMAN}\u200d\N{GIRL}"  # one glyph, 8 units
    text = "a" * 1995 + family + "tail"
    cut = cut_message(text)
    assert cut == "a" * 1995 + ELLIPSIS


@given(st.text(alphabet=st.sampled_from(["a", " ", "粵", EMOJI, EXT_B, "\u0301", "\u200d"]),
               min_size=0, max_size=3000),
       st.integers(min_value=2, max_value=2100))
def test_every_cut_fits_in_utf16_units_and_is_a_prefix(text: str, limit: int) -> None:
    cut = cut_message(text, limit)
    assert utf16_units(cut) <= limit
    assert message_length(cut) == utf16_units(cut)
    if utf16_units(text) <= limit:
        assert cut == text
    else:
        assert text.startswith(cut[: -len(ELLIPSIS)]) and cut.endswith(ELLIPSIS)


async def test_minutes_post_is_cut_by_utf16_units() -> None:
    # The crash-recovery post and /transcribe minutes both send through MinutesPost.send.
    sent: list[tuple[str, dict[str, Any]]] = []

    async def send(content: str, **kwargs: Any) -> None:
        sent.append((content, kwargs))

    await MinutesPost(EXT_B * 1500, {}).send(send)
    (content, _), = sent
    assert utf16_units(content) <= MESSAGE_LIMIT
    assert content == EXT_B * 999 + ELLIPSIS


def test_minutes_summary_with_astral_names_fits_in_one_message() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    segments = tuple(
        Segment(speaker=f"{EMOJI * 30}{i}", text="好", start=float(i), end=float(i) + 0.5,
                speaker_id=i + 1)
        for i in range(40)
    )
    minutes = Minutes(EXT_B * 100, start, start + timedelta(minutes=5), segments)
    text = summary_text(minutes)
    assert utf16_units(text) <= MAX_MESSAGE_CHARS
    post = MinutesPost.of(minutes, preface="\N{WARNING SIGN} restarted " + EMOJI * 900 + "\n")
    assert utf16_units(cut_message(post.text)) <= MAX_MESSAGE_CHARS
