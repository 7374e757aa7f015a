"""`cantobot replay` end to end: the real CLI in a subprocess, the loopback cantonese.ai fake.

Speech is tone-coded Cantonese (bot/sim/tonecode.py) that the fake decodes back to text, so the
lines printed prove the audio travelled the whole path intact: file decoding, resampling,
chunking, base64 over Socket.IO, reconnects.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track

KEY = "replay-key"
ALICE = [(0.3, "開會"), (4.0, "好")]
BOB = [(1.5, "預算")]  # overlaps alice's first line


def write_track(path: Path, lines: list[tuple[float, str]], rate: int, channels: int,
                duration: float = 7.0) -> Path:
    mono = (speech_track(lines, rate, duration=duration) * 16000).astype(np.int16)
    data = mono if channels == 1 else np.stack([mono] * channels, axis=1)
    sf.write(path, data, rate)
    return path


@pytest.fixture
def tracks(tmp_path: Path) -> dict[str, Path]:
    return {
        "alice": write_track(tmp_path / "alice.wav", ALICE, 16000, 1),
        "bob": write_track(tmp_path / "bob.flac", BOB, 44100, 2),
    }


#: Bound on one CLI run (s).
CLI_TIMEOUT = 60.0


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTONESE_AI")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    async with asyncio.timeout(CLI_TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def speaker_args(tracks: dict[str, Path]) -> list[str]:
    args = []
    for name, path in tracks.items():
        args += ["--speaker", f"{name}={path}"]
    return args


async def test_two_overlapping_speakers_print_every_line_once_as_json(
    tracks: dict[str, Path], tmp_path: Path
) -> None:
    async with FakeSttServer(api_key=KEY) as stt:
        code, out, err = await run_cli(
            "replay", *speaker_args(tracks), "--stt-url", stt.url, "--api-key", KEY,
            "--speed", "0", "--jsonl", "--minutes", str(tmp_path / "minutes"))
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert all(set(r) == {"speaker", "text", "start", "end"} for r in records)
    said = sorted((r["speaker"], r["text"]) for r in records)
    assert said == [("alice", "好"), ("alice", "開會"), ("bob", "預算")]
    starts = {r["text"]: r["start"] for r in records}
    assert starts["開會"] == pytest.approx(0.3, abs=0.1)
    assert starts["預算"] == pytest.approx(1.5, abs=0.1)
    assert starts["好"] == pytest.approx(4.0, abs=0.1)
    written = sorted(p.name for p in (tmp_path / "minutes").iterdir())
    assert written == ["minutes.json", "minutes.md", "minutes.srt", "minutes.vtt"]
    markdown = (tmp_path / "minutes" / "minutes.md").read_text(encoding="utf-8")
    assert markdown.index("開會") < markdown.index("預算") < markdown.index("好")
    minutes_json = json.loads((tmp_path / "minutes" / "minutes.json").read_text("utf-8"))
    assert any(seg["words"] for seg in minutes_json["segments"])


async def test_human_output_is_timestamped_lines(tracks: dict[str, Path]) -> None:
    async with FakeSttServer(api_key=KEY) as stt:
        code, out, err = await run_cli(
            "replay", *speaker_args(tracks), "--stt-url", stt.url, "--api-key", KEY,
            "--speed", "0")
    assert code == 0, err
    assert sorted(out.splitlines()) == ["[00:00] alice: 開會", "[00:01] bob: 預算",
                                        "[00:04] alice: 好"]


async def test_paced_replay_at_double_speed_streams_in_real_time_ratio(
    tracks: dict[str, Path]
) -> None:
    async with FakeSttServer(api_key=KEY) as stt:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        code, out, err = await run_cli(
            "replay", "--speaker", f"alice={tracks['alice']}", "--stt-url", stt.url,
            "--api-key", KEY, "--speed", "2")
        elapsed = loop.time() - begin
    assert code == 0, err
    assert out.splitlines() == ["[00:00] alice: 開會", "[00:04] alice: 好"]
    # 7 s of audio at 2x cannot finish in much less than 3.5 s (pacing is not skipped).
    assert elapsed > 3.0


async def test_a_craig_zip_names_speakers_after_its_files(tmp_path: Path) -> None:
    alice = write_track(tmp_path / "a.flac", ALICE, 48000, 1)
    bob = write_track(tmp_path / "b.ogg", BOB, 48000, 1)
    archive = tmp_path / "craig.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(alice, "1-alice_0.flac")
        zf.write(bob, "2-bob.ogg")
        zf.writestr("info.txt", "Recording of a meeting")
    async with FakeSttServer(api_key=KEY) as stt:
        code, out, err = await run_cli(
            "replay", "--tracks", str(archive), "--stt-url", stt.url, "--api-key", KEY,
            "--speed", "0", "--jsonl")
    assert code == 0, err
    assert sorted((r["speaker"], r["text"]) for r in map(json.loads, out.splitlines())) == [
        ("alice", "好"), ("alice", "開會"), ("bob", "預算")]


async def test_a_server_that_drops_mid_utterance_loses_and_doubles_nothing(
    tracks: dict[str, Path]
) -> None:
    async with FakeSttServer(api_key=KEY) as stt:
        stt.drop_after_chunks = 12  # about 1.2 s in: inside alice's and bob's first lines
        code, out, err = await run_cli(
            "replay", *speaker_args(tracks), "--stt-url", stt.url, "--api-key", KEY,
            "--speed", "0", "--jsonl")
        attempts = stt.connection_attempts
    assert code == 0, err
    said = sorted((r["speaker"], r["text"]) for r in map(json.loads, out.splitlines()))
    assert said == [("alice", "好"), ("alice", "開會"), ("bob", "預算")]
    assert attempts >= 3  # two speakers, at least one reconnect


async def test_a_rejected_key_is_one_clear_line_and_a_failure_exit(
    tracks: dict[str, Path]
) -> None:
    async with FakeSttServer(api_key=KEY) as stt:
        code, out, err = await run_cli(
            "replay", *speaker_args(tracks), "--stt-url", stt.url, "--api-key", "wrong",
            "--speed", "0")
        attempts = stt.connection_attempts
    assert code == 1
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith("cantobot:")]
    assert len(lines) == 1 and "rejected the API key" in lines[0]
    assert "Traceback" not in err
    assert "wrong" not in err  # the key itself is never printed
    assert attempts == 2  # one per speaker, no retry loop


@pytest.mark.parametrize(
    ("make_args", "fragment", "code"),
    [
        (lambda d: ["--speaker", f"alice={d / 'missing.wav'}"], "not found", 1),
        (lambda d: ["--speaker", f"alice={d / 'text.wav'}"], "not a supported audio file", 1),
        (lambda d: [], "nothing to replay", 1),
    ],
)
async def test_bad_input_files_fail_before_connecting(
    tmp_path: Path, make_args: object, fragment: str, code: int
) -> None:
    (tmp_path / "text.wav").write_text("this is not audio")
    async with FakeSttServer(api_key=KEY) as stt:
        args = make_args(tmp_path)  # type: ignore[operator]
        rc, out, err = await run_cli("replay", *args, "--stt-url", stt.url, "--api-key", KEY)
        assert stt.connection_attempts == 0
    assert rc == code
    assert fragment in err and "Traceback" not in err


async def test_an_unreachable_server_and_a_missing_key_are_one_line_each(
    tracks: dict[str, Path]
) -> None:
    code, _, err = await run_cli(
        "replay", *speaker_args(tracks), "--stt-url", "http://127.0.0.1:9", "--api-key", KEY)
    assert code == 1 and "cannot connect" in err and "Traceback" not in err
    code, _, err = await run_cli("replay", *speaker_args(tracks))
    assert code == 2 and "CANTONESE_AI_API_KEY" in err and "Traceback" not in err
