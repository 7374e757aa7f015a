"""Spec for bot/transcript/script.py: script choice with OpenCC, Jyutping with PyCantonese.

Expected values come from the libraries themselves (OpenCC's Hong Kong configurations,
PyCantonese's ``characters_to_jyutping``), never from a table of ours; each test also checks
that something actually changed, so a converter that returned its input would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import opencc
import pycantonese
import pytest

from bot.transcript.script import (
    PLAIN,
    JyutpingMode,
    Readability,
    ReadabilityChoice,
    ReadabilityError,
    Script,
    convert,
    jyutping_line,
    jyutping_words,
    read_line,
    resolve_readability,
    to_hk,
    to_simplified,
)

#: Sentences with the Hong Kong-specific characters 嘅 咗 唔 冇 哋 喺 畀.
HK_SENTENCES = (
    "我哋今日喺會議室開會，佢畀咗份文件我。",
    "你講嘅嘢我唔明白，冇問題嘅話就開始啦。",
    "佢哋喺邊度？我冇見過佢哋，唔好意思。",
    "呢個計劃係畀大家睇嘅，唔該晒。",
)
HK_ONLY = "嘅咗唔冇哋喺畀"


@pytest.mark.parametrize("sentence", HK_SENTENCES)
def test_hong_kong_traditional_to_simplified_is_what_opencc_hk2s_gives(sentence: str) -> None:
    expected = opencc.OpenCC("hk2s").convert(sentence)
    assert to_simplified(sentence) == expected
    assert convert(sentence, Script.SIMPLIFIED) == expected
    assert expected != sentence  # 會/開/講/邊/個... really change
    for ch in HK_ONLY:  # Cantonese characters are the same in both scripts: kept
        assert sentence.count(ch) == expected.count(ch)


@pytest.mark.parametrize("sentence", HK_SENTENCES)
def test_simplified_to_hong_kong_is_what_opencc_s2hk_gives(sentence: str) -> None:
    simplified = opencc.OpenCC("hk2s").convert(sentence)
    expected = opencc.OpenCC("s2hk").convert(simplified)
    assert to_hk(simplified) == expected
    assert convert(simplified, Script.HK) == expected
    assert expected != simplified
    for ch in HK_ONLY:
        assert simplified.count(ch) == expected.count(ch)


def test_traditional_text_stays_right_in_hk_it_is_not_re_guessed_from_simplified() -> None:
    # s2hk on text that is already Traditional turns 唔該晒 into 唔該曬 and 鄰里 into 鄰裏;
    # Traditional input goes through t2hk (variant forms only).
    for sentence in ("唔該晒", "鄰里之間互相幫助", *HK_SENTENCES):
        assert to_hk(sentence) == opencc.OpenCC("t2hk").convert(sentence)
    assert to_hk("唔該晒") == "唔該晒"
    assert opencc.OpenCC("s2hk").convert("唔該晒") != "唔該晒"  # why the choice matters


def test_as_is_returns_the_text_untouched() -> None:
    text = "我们今日開會 mixed 简繁"
    assert convert(text, Script.AS_IS) == text
    assert read_line(text, PLAIN).text == text


@pytest.mark.parametrize("word", ["我哋", "今日", "開會", "大家", "唔該", "問題", "喺度"])
def test_jyutping_of_common_words_is_pycantonese_own(word: str) -> None:
    ((expected_word, expected),) = pycantonese.characters_to_jyutping(word)
    assert expected_word == word and expected is not None
    assert [(w.text, w.jyutping) for w in jyutping_words(word)] == [(word, expected)]
    assert jyutping_line(word) == expected.replace(" ", "")


def test_we_is_ngo5_dei6_one_group_per_segmented_word_in_order() -> None:
    assert jyutping_words("我哋")[0].jyutping == "ngo5 dei6"
    sentence = "我哋今日開會"
    segmented = pycantonese.characters_to_jyutping(sentence)
    assert len(segmented) > 1
    assert jyutping_line(sentence) == " ".join(jp.replace(" ", "") for _, jp in segmented)
    assert jyutping_line(sentence) == "ngo5dei6 gam1jat6 hoi1wui2"


def test_simplified_text_is_read_in_its_hong_kong_form() -> None:
    # PyCantonese knows Traditional characters: 我们 gets its reading through s2hk.
    assert pycantonese.characters_to_jyutping("开会") == [("开会", None)]
    assert jyutping_line("我们今日开会") == jyutping_line("我們今日開會") == (
        "ngo5mun4 gam1jat6 hoi1wui2")


def test_mixed_cantonese_and_english_latin_words_and_punctuation_pass_through() -> None:
    line = "我哋3點喺Starbucks見，OK? 佢話don't worry啦！"
    words = jyutping_words(line)
    passed = [w.text for w in words if w.jyutping is None]
    assert passed == ["3", "Starbucks", "，OK?", "don't", "worry", "！"]
    assert jyutping_line(line) == (
        "ngo5dei6 3 dim2 hai2 Starbucks gin3，OK? keoi5 waa6 don't worry laa1！")
    assert jyutping_line("乜嘢係「Jyutping」？") == "mat1je5 hai6 「Jyutping」？"
    assert jyutping_line("「你好」") == "「nei5 hou2」"
    assert jyutping_line("我哋今日開會，好唔好？") == "ngo5dei6 gam1jat6 hoi1wui2，hou2 m4hou2？"
    assert jyutping_line("Zoom meeting 開始咗未？") == "Zoom meeting hoi1ci2 zo2 mei6？"
    # Emoji, CJK Extension B (𠵱) and Latin code-switching together.
    assert jyutping_line("😀 𠵱家 OK") == "😀 ji1gaa1 OK"


def test_a_line_read_keeps_the_original_next_to_the_converted_text() -> None:
    original = "我哋今日開會"
    reading = read_line(original, Readability(Script.SIMPLIFIED, JyutpingMode.LINE))
    assert reading.original == original
    assert reading.text == opencc.OpenCC("hk2s").convert(original) == "我哋今日开会"
    assert reading.jyutping == "ngo5dei6 gam1jat6 hoi1wui2"
    assert reading.words_json()[0] == {"word": "我哋", "jyutping": "ngo5 dei6"}
    off = read_line(original, Readability(Script.SIMPLIFIED, JyutpingMode.OFF))
    assert off.jyutping is None and off.words == ()


def test_effective_choice_is_meeting_option_then_guild_setting_then_config_default() -> None:
    default = Readability(Script.HK, JyutpingMode.OFF)
    assert resolve_readability(None, None, default) == default
    guild = ReadabilityChoice(script=Script.SIMPLIFIED)
    assert resolve_readability(None, guild, default) == Readability(Script.SIMPLIFIED,
                                                                   JyutpingMode.OFF)
    meeting = ReadabilityChoice(jyutping=JyutpingMode.LINE)
    assert resolve_readability(meeting, guild, default) == Readability(Script.SIMPLIFIED,
                                                                      JyutpingMode.LINE)
    both = ReadabilityChoice(Script.AS_IS, JyutpingMode.OFF)
    full_guild = ReadabilityChoice(Script.SIMPLIFIED, JyutpingMode.LINE)
    assert resolve_readability(both, full_guild, default) == PLAIN


def test_choices_parse_and_a_typo_says_what_is_allowed() -> None:
    assert Readability.parse("Simplified", "line") == Readability(Script.SIMPLIFIED,
                                                                 JyutpingMode.LINE)
    assert Readability.parse("as-is", "off").plain
    with pytest.raises(ReadabilityError, match="hk, simplified, as-is"):
        Readability.parse("traditional", "off")
    with pytest.raises(ReadabilityError, match="off, line"):
        Readability.parse("hk", "yes")
    assert Readability(Script.SIMPLIFIED, JyutpingMode.LINE).describe() == (
        "Simplified, with Jyutping")


def test_warm_up_loads_pycantonese_in_a_worker_thread_not_on_the_event_loop() -> None:
    # A fresh interpreter, so nothing loaded it before.
    code = (
        "import asyncio, json, threading\n"
        "from bot.transcript import script\n"
        "assert not script.is_warm()\n"
        "asyncio.run(script.warm_up())\n"
        "asyncio.run(script.warm_up())\n"  # a second call is a no-op
        "print(json.dumps([script.is_warm(), script.loaded_on,"
        " threading.main_thread().name, script.jyutping_line('大家好')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    warm, loaded_on, main, line = json.loads(out.stdout)
    assert warm and loaded_on and loaded_on != main
    assert line == "daai6gaa1 hou2"
