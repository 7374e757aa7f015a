"""Configuration: every mistake is one clear line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import Config, load_config, with_overrides
from bot.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.yaml.example"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_the_example_file_loads_and_equals_the_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config == Config()
    assert config.stt.sample_rate == 16000
    assert config.stt.url == "https://cantonese.ai"
    assert config.stt.chunk_ms == 100


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "stt:\n  url: http://file.example\n  sample_rate: 8000\n")
    config = load_config(
        p,
        environ={
            "CANTONESE_AI_URL": "http://127.0.0.1:9",
            "CANTONESE_AI_API_KEY": "k-123",
            "DISCORD_TOKEN": "tok",
            "CANTOBOT_SAMPLE_RATE": "24000",
        },
    )
    assert config.stt.url == "http://127.0.0.1:9"
    assert config.stt.api_key.reveal() == "k-123"
    assert config.discord.token.reveal() == "tok"
    assert config.stt.sample_rate == 24000


def test_secrets_never_appear_in_repr_or_format() -> None:
    config = load_config(None, environ={"CANTONESE_AI_API_KEY": "hunter2", "DISCORD_TOKEN": "t0k"})
    text = repr(config) + str(config) + f"{config.stt.api_key}" + f"{config.discord.token!r}"
    assert "hunter2" not in text
    assert "t0k" not in text


@pytest.mark.parametrize(
    ("yaml_text", "key", "fragment"),
    [
        ("stt:\n  smaple_rate: 16000\n", "stt.smaple_rate", "unknown key"),
        ("sttt:\n  url: x\n", "sttt", "unknown key"),
        ("stt:\n  sample_rate: fast\n", "stt.sample_rate", "expected an integer"),
        ("stt:\n  sample_rate: 4000\n", "stt.sample_rate", "between 8000 and 48000"),
        ("stt:\n  sample_rate: 96000\n", "stt.sample_rate", "between 8000 and 48000"),
        ("stt:\n  chunk_ms: 0\n", "stt.chunk_ms", "between 10 and 1000"),
        ("stt:\n  url: cantonese.ai\n", "stt.url", "http(s) URL"),
        ("stt: 5\n", "stt", "expected a mapping"),
        ("stt:\n  api_key: 12345\n", "stt.api_key", "value not shown"),
        ("transcribe:\n  threads: maybe\n", "transcribe.threads", "true or false"),
        ("discord:\n  guilds: 123\n", "discord.guilds", "expected a list"),
        ("discord:\n  guilds: [abc]\n", "discord.guilds", "expected an integer"),
        ("discord:\n  gateway_url: http://x\n", "discord.gateway_url", "ws(s) URL"),
        ("discord:\n  ca_file: /nope.pem\n", "discord.ca_file", "no such file"),
        ("logging:\n  level: LOUD\n", "logging.level", "must be one of"),
        ("voice:\n  idle_timeout: -1\n", "voice.idle_timeout", "between"),
        ("storage:\n  retention_days: 1.5\n", "storage.retention_days", "expected an integer"),
    ],
)
def test_each_mistake_names_the_file_and_the_key(
    tmp_path: Path, yaml_text: str, key: str, fragment: str
) -> None:
    p = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    message = info.value.user_message
    assert str(p) in message
    assert key in message
    assert fragment in message
    assert "\n" not in message


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CANTOBOT_SAMPLE_RATE": "sixteen"})
    assert "CANTOBOT_SAMPLE_RATE" in info.value.user_message
    assert "stt.sample_rate" in info.value.user_message


def test_invalid_yaml_and_missing_file_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML at line [0-9]+"):
        load_config(write(tmp_path, "stt:\n  url: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_a_missing_api_key_is_reported_when_it_is_needed() -> None:
    config = load_config(None, environ={})
    with pytest.raises(ConfigError, match="CANTONESE_AI_API_KEY"):
        config.require_stt_key()


def test_command_line_overrides_are_validated_too() -> None:
    config = with_overrides(Config(), stt={"sample_rate": 44100, "url": None})
    assert config.stt.sample_rate == 44100
    with pytest.raises(ConfigError, match="command line: stt.sample_rate"):
        with_overrides(Config(), stt={"sample_rate": 100})


# -- check-config: key, value and where it came from (issue 16) -----------------------------------


def test_check_config_lines_say_value_and_origin_and_never_a_secret(tmp_path: Path) -> None:
    from bot.config import describe_config

    p = write(tmp_path, "stt:\n  sample_rate: 8000\n  api_key: in-file-key\n"
                        "storage:\n  url: postgresql://bot:pw-secret@db:5432/cantobot\n")
    env = {"DISCORD_TOKEN": "t0k-secret", "CANTONESE_AI_URL": "http://127.0.0.1:9"}
    lines = describe_config(load_config(p, environ=env), environ=env)
    by_key = {line.split(": ", 1)[0]: line for line in lines}
    assert by_key["stt.sample_rate"] == f"stt.sample_rate: 8000  (file {p})"
    assert by_key["stt.url"] == "stt.url: http://127.0.0.1:9  (environment CANTONESE_AI_URL)"
    assert by_key["stt.chunk_ms"] == "stt.chunk_ms: 100  (default)"
    assert by_key["discord.token"] == "discord.token: set  (environment DISCORD_TOKEN)"
    assert by_key["stt.api_key"] == f"stt.api_key: set  (file {p})"
    assert by_key["discord.guilds"] == "discord.guilds: []  (default)"
    assert by_key["discord.ca_file"] == "discord.ca_file: null  (default)"
    assert by_key["transcribe.threads"] == "transcribe.threads: false  (default)"
    assert by_key["storage.url"].startswith("storage.url: postgresql://bot:***@db:5432/cantobot")
    text = "\n".join(lines)
    assert "t0k-secret" not in text and "in-file-key" not in text and "pw-secret" not in text
    # Every key of every section, one line each.
    assert len(lines) == len(set(by_key)) and "logging.level" in by_key

    none = describe_config(load_config(None, environ={}), environ={})
    assert "discord.token: not set  (default)" in none


def test_cantobot_check_config_prints_one_key_a_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    p = write(tmp_path, "voice:\n  jitter_ms: 80\n")
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env["CANTONESE_AI_API_KEY"] = "hunter2"
    done = subprocess.run([sys.executable, "-m", "bot", "check-config", "--config", str(p)],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert f"voice.jitter_ms: 80  (file {p})" in lines
    assert "stt.api_key: set  (environment CANTONESE_AI_API_KEY)" in lines
    assert "discord.token: not set  (default)" in lines
    assert "hunter2" not in done.stdout + done.stderr
    assert all(": " in line and line.endswith(")") for line in lines), lines
def test_readability_defaults_come_from_the_file_and_typos_name_the_key(tmp_path: Path) -> None:
    from bot.transcript.script import PLAIN, JyutpingMode, Readability, Script

    assert load_config(None, environ={}).transcribe.readability == PLAIN
    p = write(tmp_path, "transcribe:\n  script: Simplified\n  jyutping: line\n")
    assert load_config(p, environ={}).transcribe.readability == Readability(
        Script.SIMPLIFIED, JyutpingMode.LINE)
    bare = write(tmp_path, "transcribe:\n  jyutping: off\n")  # YAML 1.1 reads it as false
    assert load_config(bare, environ={}).transcribe.jyutping == "off"
    for text, key in (("transcribe:\n  script: traditional\n", "transcribe.script"),
                      ("transcribe:\n  jyutping: sometimes\n", "transcribe.jyutping")):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text), environ={})
        assert str(tmp_path) in info.value.user_message and key in info.value.user_message
    with pytest.raises(ConfigError, match="command line: transcribe.script"):
        with_overrides(Config(), transcribe={"script": "trad"})
