"""Text from outside (STT errors, display and channel names) reaches Discord inert and cut to
its budget (issue 11, item 12): unit rules for bot/transcript/escape.py, then a hostile speech
service and a hostile channel name against the loopback Discord."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.transcript.escape import ERROR_BUDGET, NAME_BUDGET, inert, outside
from bot.transcript.format import ELLIPSIS, ZWSP
from tests.test_transcribe import harness

PHISH = "[Verify your account](https://phish.example/login)"
HOSTILE = (f"{PHISH} @everyone <@123> <@&456> <#789> </transcribe optout:1> **URGENT** "
           "discord.gg/scam \u202eevil\u202c\nsecond line")

#: What a rendered Discord message must never contain for each danger.
MASKED_LINK = re.compile(r"\]\s*\(")
MENTION = re.compile(r"@(everyone|here)|<@&?\d+>|<#\d+>|</[^>]+:\d+>")
CLICKABLE = re.compile(r"https?://|discord\.gg/")


def assert_inert(text: str) -> None:
    assert not MASKED_LINK.search(text), text
    assert not MENTION.search(text), text
    assert not CLICKABLE.search(text), text
    assert "\u202e" not in text


def test_an_outside_value_is_one_line_escaped_and_cut_to_its_budget() -> None:
    shown = outside(HOSTILE, ERROR_BUDGET)
    assert_inert(shown)
    assert "\n" not in shown
    assert "\\*\\*URGENT\\*\\*" in shown, "markdown is shown, not rendered"
    long = outside("阿" * 500, NAME_BUDGET)
    assert long == "阿" * (NAME_BUDGET - 1) + ELLIPSIS
    assert outside("alice") == "alice"
    # Cut before escaping: the budget counts what members see, no escape is torn in half.
    cut = outside("*" * 200, 10)
    assert cut == "\\*" * 9 + ELLIPSIS


@pytest.mark.parametrize("text", [HOSTILE, PHISH, "@here hi", "see <#1> and <@2>"])
def test_a_whole_notice_is_made_inert_but_keeps_our_formatting(text: str) -> None:
    notice = f"\N{WARNING SIGN} **Speech-to-text** said: {text} `code`"
    shown = inert(notice)
    assert_inert(shown)
    assert shown.startswith("\N{WARNING SIGN} **Speech-to-text** said: ")
    assert shown.endswith(" `code`")
    assert inert(shown) == shown, "idempotent"


async def test_a_hostile_speech_service_and_channel_name_cannot_post_links_or_pings(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        h.discord.world.voice_channel.name = "Room @everyone [x](https://phish.example/a)"
        async with h.running(h.config()):
            await h.discord.member_join_voice(h.ids["alice"])
            await h.start()
            h.stt.start_session_error = HOSTILE + " " + "x" * 600
            await h.speak({"alice": [(0.2, "你好")]})
            await h.wait_for(lambda: any("\N{WARNING SIGN}" in m.content for m in h.posted()),
                             "the trouble notice")
            status = await h.invoke("transcribe status")
            await h.invoke("transcribe stop")
        for message in h.posted():
            if message.author.startswith("Cantobot"):  # every notice the bot wrote itself
                assert_inert(message.content)
        warning = next(m.content for m in h.posted() if "\N{WARNING SIGN}" in m.content)
        assert "Verify your account" in warning and ZWSP in warning
        # The server's 600-odd characters are cut to their budget before they reach Discord.
        assert "x" * 50 in warning and "x" * (ERROR_BUDGET + 1) not in warning
        assert len(warning) < ERROR_BUDGET + 200, len(warning)
        assert_inert(h.answer(status))
        assert "Room @" + ZWSP + "everyone \\[x\\]" in h.answer(status)
