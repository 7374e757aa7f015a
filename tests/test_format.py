"""Discord formatting: escaping, message splitting, caption lines and names."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.transcript.format import (
    JYUTPING_PREFIX,
    MAX_MESSAGE_CHARS,
    MAX_NICKNAME_CHARS,
    MAX_THREAD_NAME_CHARS,
    MAX_WEBHOOK_NAME_CHARS,
    ZWSP,
    escape,
    format_line,
    format_timestamp,
    line_messages,
    message_length,
    nickname_with_notice,
    split_message,
    thread_name,
    webhook_username,
)
from bot.transcript.model import Segment, TranscriptError
from bot.transcript.script import (
    PLAIN,
    JyutpingMode,
    Readability,
    Script,
    jyutping_line,
    to_simplified,
)

# --- a small model of how Discord reads message content ---------------------------------

_MENTION = re.compile(r"@(everyone|here)|<@[!&]?\d+>|<#\d+>|<(id|t|a?:\w+):[^>]*>|</[^>]+>")
_MARKDOWN = set("*_~`|>#[]()<-:\\")


def _render(text: str) -> tuple[str, list[str], list[str]]:
    """Walk the content as Discord does: a backslash before ASCII punctuation makes it literal.

    Returns (visible text, mentions that would resolve, markdown characters left active).
    """
    visible, mentions, active = [], [], []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in string.punctuation:
            visible.append(text[i + 1])
            i += 2
            continue
        match = _MENTION.match(text, i)
        if match:
            mentions.append(match[0])
        if ch in _MARKDOWN:
            active.append(ch)
        visible.append(ch)
        i += 1
    return "".join(visible), mentions, active


MENTION_ALPHABET = "<@&!#>:/0123456789everyonhrtid \\*_~`|[]()-\n今日"


@given(st.text(alphabet=MENTION_ALPHABET, max_size=60))
def test_escaped_text_never_contains_a_working_mention(text: str) -> None:
    _, mentions, _ = _render(escape(text))
    assert mentions == []


@given(st.text(max_size=80))
def test_escaped_text_renders_as_the_original_with_no_active_markdown(text: str) -> None:
    visible, _, active = _render(escape(text))
    assert active == []
    assert visible.replace("@" + ZWSP, "@") == text


def test_the_render_model_does_see_raw_mentions_so_the_property_tests_can_fail() -> None:
    _, mentions, active = _render("@everyone hi <@123> <@&45> <#6> **bold**")
    assert mentions == ["@everyone", "<@123>", "<@&45>", "<#6>"]
    assert "*" in active


def test_cantonese_text_is_untouched_by_escaping() -> None:
    assert escape("今日開會，大家好。") == "今日開會，大家好。"


# --- splitting ----------------------------------------------------------------------------


def _assert_parts_are_slices(text: str, parts: list[str]) -> None:
    """Parts appear in order in ``text`` with only whitespace between and around them."""
    pos = 0
    for p in parts:
        at = text.find(p, pos)
        assert at >= 0, f"part {p!r} not found in order"
        assert text[pos:at].strip() == "", f"non-whitespace dropped: {text[pos:at]!r}"
        pos = at + len(p)
    assert text[pos:].strip() == ""


SPLIT_ALPHABET = st.sampled_from(
    list("ab cd\n\t今日開會。，") + ["😀", "👍🏽", "👨\u200d👩\u200d👧", "e\u0301", "𠵱", "🇭🇰"]
)


@settings(max_examples=300)
@given(st.lists(SPLIT_ALPHABET, max_size=200).map("".join), st.integers(2, 40))
def test_split_parts_are_non_empty_within_the_limit_and_join_back(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(p and p.strip() for p in parts)
    assert all(message_length(p) <= limit for p in parts)
    _assert_parts_are_slices(text, parts)
    assert "".join(text.split()) == "".join("".join(parts).split())


def test_short_text_is_one_part_and_blank_text_is_none() -> None:
    assert split_message("今日開會") == ["今日開會"]
    assert split_message("  \n ") == []
    assert split_message("") == []


def test_split_prefers_whitespace() -> None:
    assert split_message("aaaa bbbb cccc", 10) == ["aaaa bbbb", "cccc"]


def test_split_prefers_line_breaks_over_spaces() -> None:
    assert split_message("aaa bbb\nccc ddd eee", 14) == ["aaa bbb", "ccc ddd eee"]


def test_cantonese_without_spaces_splits_after_sentence_punctuation() -> None:
    text = "今日開會，討論預算。" * 400
    parts = split_message(text)
    assert len(parts) > 1
    assert all(len(p) <= MAX_MESSAGE_CHARS for p in parts)
    assert all(p.endswith("。") for p in parts)
    assert "".join(parts) == text


def test_a_run_with_no_break_at_all_is_hard_split_at_the_limit() -> None:
    parts = split_message("開" * 4500)
    assert [len(p) for p in parts] == [2000, 2000, 500]


def test_astral_characters_count_twice_so_parts_fit_however_discord_counts() -> None:
    parts = split_message("𠵱" * 1500)
    assert [len(p) for p in parts] == [1000, 500]


def test_a_hard_split_does_not_tear_emoji_sequences_apart() -> None:
    family = "👨\u200d👩\u200d👧"
    parts = split_message(family * 10, 20)  # 8 UTF-16 units each
    assert all(p.startswith("👨") and p.endswith("👧") for p in parts)
    assert "".join(parts) == family * 10
    toned = "👍🏽" * 10  # 4 UTF-16 units each
    assert all(p.startswith("👍") and p.endswith("🏽") for p in split_message(toned, 6))
    accents = "e\u0301" * 10
    assert all(p.startswith("e") for p in split_message(accents, 3))


def test_a_limit_below_two_is_refused() -> None:
    with pytest.raises(TranscriptError):
        split_message("abc", 1)


# --- timestamps and lines -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "00:00"), (83.9, "01:23"), (599.99, "09:59"), (3599.999, "59:59"), (3600, "1:00:00"),
     (3725, "1:02:05"), (36000, "10:00:00")],
)
def test_timestamps_are_mm_ss_under_an_hour_and_h_mm_ss_after(
    seconds: float, expected: str
) -> None:
    assert format_timestamp(seconds) == expected


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_impossible_timestamps_are_refused(bad: float) -> None:
    with pytest.raises(TranscriptError):
        format_timestamp(bad)


def test_webhook_mode_line_has_only_time_and_text() -> None:
    s = Segment("alice", "今日開會", 83.0, 85.0)
    assert format_line(s, with_speaker=False) == "`[01:23]` 今日開會"


def test_fallback_mode_line_names_the_speaker_in_bold() -> None:
    s = Segment("alice", "今日開會", 83.0, 85.0)
    assert format_line(s, with_speaker=True) == "**alice** `[01:23]` 今日開會"


def test_lines_escape_speech_and_names_and_stay_on_one_line() -> None:
    s = Segment("**evil**", "@everyone\n\nlook", 0.0, 1.0)
    line = format_line(s, with_speaker=True)
    assert "\n" not in line
    _, mentions, _ = _render(line)
    assert mentions == []
    assert line.startswith("**\\*\\*evil\\*\\*** ")


# --- names --------------------------------------------------------------------------------


def test_thread_names_read_captions_and_the_speaker() -> None:
    assert thread_name("alice") == "Captions · alice"
    assert thread_name("  ") == "Captions · speaker"


@given(st.text(max_size=300))
def test_thread_names_always_fit_discords_limit(name: str) -> None:
    result = thread_name(name)
    assert 1 <= len(result) <= MAX_THREAD_NAME_CHARS
    assert "\n" not in result


@pytest.mark.parametrize(
    ("name", "expected"),
    [("alice", "alice"), ("Discord Dan", "Disc-ord Dan"), ("CLYDE", "CL-YDE"),
     ("mydiscordclyde", "mydisc-ordcl-yde"), ("", "speaker"), ("   ", "speaker"),
     ("a@b#c:d", "a＠b＃c：d"), ("everyone", "everyone (speaker)"), ("阿明", "阿明")],
)
def test_webhook_usernames_avoid_names_discord_rejects(name: str, expected: str) -> None:
    assert webhook_username(name) == expected


@given(st.text(max_size=200))
def test_webhook_usernames_are_always_acceptable(name: str) -> None:
    result = webhook_username(name)
    assert 1 <= len(result) <= MAX_WEBHOOK_NAME_CHARS
    low = result.lower()
    assert "discord" not in low and "clyde" not in low
    assert not set("@#:") & set(result) and "```" not in result
    assert low not in ("everyone", "here")


def test_nickname_carries_the_transcribing_notice_within_32_chars() -> None:
    assert nickname_with_notice("cantobot") == "cantobot [transcribing]"
    long = nickname_with_notice("a very long bot nickname indeed")
    assert len(long) <= MAX_NICKNAME_CHARS
    assert long.endswith(" [transcribing]")
    assert nickname_with_notice("") == "cantobot [transcribing]"


# --- readability: converted lines with their Jyutping line ------------------------------

SIMPLIFIED_JP = Readability(Script.SIMPLIFIED, JyutpingMode.LINE)
_HAN_CHAR = re.compile("[\u4e00-\u9fff\U00020000-\U0003134f]")
_SYLLABLE = re.compile(r"[a-z]+[1-6]")


def test_plain_readability_posts_exactly_what_format_line_gives() -> None:
    seg = Segment("alice", "我哋今日開會 *bold* @everyone", 61.0, 62.0)
    for with_speaker in (True, False):
        assert line_messages(seg, with_speaker=with_speaker, readability=PLAIN) == split_message(
            format_line(seg, with_speaker=with_speaker))


def test_a_converted_line_has_its_jyutping_as_discord_small_text_under_it() -> None:
    seg = Segment("alice", "我哋今日開會，好唔好？ Zoom *link*", 61.0, 62.0)
    (msg,) = line_messages(seg, with_speaker=True, readability=SIMPLIFIED_JP)
    first, second = msg.split("\n")
    assert first == "**alice** `[01:01]` " + escape(to_simplified(seg.text))
    assert "开会" in first and "開會" not in first
    assert second == JYUTPING_PREFIX + escape(jyutping_line(seg.text))
    assert second.startswith("-# ngo5dei6 gam1jat6 hoi1wui2")
    _, _, active = _render(second[len(JYUTPING_PREFIX):])
    assert active == []  # speech in the Jyutping line cannot render markdown either
    # Script only: no Jyutping line.
    (hk,) = line_messages(Segment("bob", "我们开会", 0, 1), with_speaker=False,
                          readability=Readability(Script.HK, JyutpingMode.OFF))
    assert hk == "`[00:00]` 我們開會"


def test_a_1990_character_line_is_split_under_the_limit_each_part_with_its_own_jyutping() -> None:
    sentence = "我哋今日喺會議室開會，佢畀咗份文件我，冇問題嘅話就唔使再傾。"
    text = (sentence * 100)[:1990]
    assert len(text) == 1990
    seg = Segment("alice", text, 5.0, 9.0)
    parts = line_messages(seg, with_speaker=True, readability=SIMPLIFIED_JP)
    assert len(parts) > 1
    total_han = 0
    for i, part in enumerate(parts):
        assert message_length(part) <= MAX_MESSAGE_CHARS
        body, jp = part.split("\n" + JYUTPING_PREFIX)
        assert "\n" not in body and "\n" not in jp
        assert body.startswith("**alice** `[00:05]` ") == (i == 0)
        han = len(_HAN_CHAR.findall(body))
        # Every character of this part, and no other, is read in this part's Jyutping line.
        assert han > 0 and len(_SYLLABLE.findall(jp)) == han
        total_han += han
    assert total_han == len(_HAN_CHAR.findall(text))
    shown = "".join(p.split("\n")[0] for p in parts).replace("**alice** `[00:05]` ", "")
    assert shown == to_simplified(text)


def test_a_long_line_of_astral_characters_and_latin_words_still_fits() -> None:
    text = " ".join(["𠵱家 Zoom_meeting 😀"] * 300)
    parts = line_messages(Segment("bob", text, 0, 1), with_speaker=False,
                          readability=Readability(Script.HK, JyutpingMode.LINE))
    assert all(message_length(p) <= MAX_MESSAGE_CHARS for p in parts)
    assert all(p.count("\n" + JYUTPING_PREFIX) == 1 for p in parts)
    assert sum(p.count("ji1gaa1") for p in parts) == 300
