"""`cantobot replay` end to end: the real CLI in a subprocess, the loopback cantonese.ai fake.

Speech is tone-coded Cantonese (bot/sim/tonecode.py) that the fake decodes back to text, so the
lines printed prove the audio travelled the whole path intact: file decoding, resampling,
chunking, base64 over Socket.IO, reconnects.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bot.audio import files
from bot.audio.files import find_tracks
from bot.errors import AudioInputError
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


# -- issue 12, item 8: SIGTERM stops a replay exactly like SIGINT ---------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_every_session_and_keeps_committed_lines(
    tracks: dict[str, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTONESE_AI")}
    async with FakeSttServer(api_key=KEY) as stt:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "replay", *speaker_args(tracks), "--stt-url", stt.url,
            "--api-key", KEY, "--speed", "1", "--jsonl", "--minutes", str(tmp_path / "m"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(CLI_TIMEOUT):
            first = json.loads(await proc.stdout.readline())  # alice's line at 0.3 s
            proc.send_signal(sig)  # ~1.5 s in: long before alice's line at 4 s
            rest, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
            code = await proc.wait()
        sessions = list(stt.records.values())
    assert code == 128 + sig.value, err.decode()
    assert "Traceback" not in err.decode()
    assert first["text"] == "開會"
    later = [json.loads(line)["text"] for line in rest.decode().splitlines()]
    assert "好" not in later  # it really stopped early
    # Every session was told stop-session (not just dropped) ...
    assert len(sessions) == 2 and all(r.session_stops == 1 for r in sessions)
    # ... and what was committed is kept in the minutes.
    minutes = json.loads((tmp_path / "m" / "minutes.json").read_text("utf-8"))
    assert "開會" in [s["text"] for s in minutes["segments"]]


# -- issue 12, item 9: archive members are streamed, implausible ones refused -----------------


def test_a_member_with_a_bomb_like_compression_ratio_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_BZIP2) as zf:
        write_track(tmp_path / "a.flac", ALICE, 16000, 1)
        zf.write(tmp_path / "a.flac", "1-alice.flac")
        with zf.open("2-bob.wav", "w") as member:  # 64 MiB of zeros: bzip2 makes it tiny
            header = io.BytesIO()
            sf.write(header, np.zeros(16, np.int16), 16000, format="WAV")
            member.write(header.getvalue())
            for _ in range(64):
                member.write(bytes(1024 * 1024))
    with pytest.raises(AudioInputError) as info:
        find_tracks(str(archive))
    message = str(info.value)
    assert "\n" not in message and f"{archive}:2-bob.wav: refused" in message
    assert "compressed" in message


def test_a_member_too_large_for_audio_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_track(tmp_path / "a.wav", ALICE, 16000, 1)  # 224 kB
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, "1-alice.wav")
    monkeypatch.setattr(files, "MAX_MEMBER_BYTES", 100_000)
    with pytest.raises(AudioInputError, match=r"1-alice\.wav: refused: .* uncompressed"):
        find_tracks(str(archive))


def test_zip_tracks_stream_the_same_samples_as_the_files(tmp_path: Path) -> None:
    path = write_track(tmp_path / "a.flac", ALICE, 48000, 2)
    archive = tmp_path / "t.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(path, "1-alice.flac")
    [track] = find_tracks(str(archive))
    assert (track.name, track.sample_rate, track.channels) == ("alice", 48000, 2)
    streamed = np.concatenate(list(track.blocks(4801)))
    assert np.array_equal(streamed, sf.read(path, dtype="int16", always_2d=True)[0])


def _long_flac(path: Path, hours: float, rate: int) -> Path:
    """A long mostly-silent mono FLAC with one tone-coded line at the start, written in blocks
    (a few seconds and ~600 kB for 3 hours)."""
    head = (speech_track([(0.3, "開會")], rate, duration=3.0) * 16000).astype(np.int16)
    silence = np.zeros(rate * 60, np.int16)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16", format="FLAC") as f:
        f.write(head)
        left = round(hours * 3600 * rate) - len(head)
        while left > 0:
            f.write(silence[:min(left, len(silence))])
            left -= len(silence)
    return path


def _rss_kb(pid: int, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


#: Six speakers, three hours each: the old reader decoded all of it up front (over 1 GB here).
LONG_SPEAKERS = ["alice", "bob", "carol", "dan", "erin", "fay"]
LONG_HOURS = 3.0
LONG_RATE = 8000


@pytest.mark.xdist_group("cpu_heavy")  # one CPU-heavy test at a time in parallel runs (pyproject)
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
async def test_a_three_hour_six_track_zip_streams_with_flat_memory(tmp_path: Path) -> None:
    flac = _long_flac(tmp_path / "long.flac", LONG_HOURS, LONG_RATE)
    archive = tmp_path / "craig.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, name in enumerate(LONG_SPEAKERS, start=1):
            zf.write(flac, f"{i}-{name}.flac")
    config = tmp_path / "config.yaml"  # 8 kHz, 1 s chunks: hours of audio in few messages
    # silence_tail_ms 0: every sample is streamed (no silence gating), so the memory of
    # streaming hours of audio is what is measured here.
    config.write_text("stt:\n  sample_rate: 8000\n  chunk_ms: 1000\n  silence_tail_ms: 0\n")
    total = len(LONG_SPEAKERS) * round(LONG_HOURS * 3600 * LONG_RATE) * 2  # bytes of PCM
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTONESE_AI")}
    async with FakeSttServer(api_key=KEY) as stt:
        stt.decode_seconds = 10.0  # a fast fake: decode the opening line, count the rest
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "replay", "--config", str(config),
            "--tracks", str(archive), "--stt-url", stt.url, "--api-key", KEY,
            "--speed", "0", "--jsonl",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        communicate = asyncio.ensure_future(proc.communicate())
        samples: list[tuple[float, int]] = []  # (share of the audio received, VmRSS kB)
        peak = 0
        while not communicate.done():
            rss, hwm = _rss_kb(proc.pid, "VmRSS"), _rss_kb(proc.pid, "VmHWM")
            if rss is not None and hwm is not None:
                samples.append((stt.total_audio_bytes / total, rss))
                peak = max(peak, hwm)
                assert peak < 400_000, "replay memory grows with the recording"
            await asyncio.wait({communicate}, timeout=0.2)
        out, err = communicate.result()
        received = stt.total_audio_bytes
    assert proc.returncode == 0, err.decode()
    said = sorted((r["speaker"], r["text"]) for r in map(json.loads, out.decode().splitlines()))
    assert said == sorted((name, "開會") for name in LONG_SPEAKERS)
    assert received == total  # every track was streamed to its end
    early = [rss for share, rss in samples if 0.1 <= share <= 0.2]
    late = [rss for share, rss in samples if share >= 0.8]
    assert early and late
    # Flat: what the last hour holds is what the first did (a few MB of allocator slack).
    assert max(late) - min(early) < 20_000, (min(early), max(late))
    assert peak < 250_000, peak


@pytest.mark.xdist_group("cpu_heavy")
async def test_a_full_speed_replay_reads_the_server_while_it_streams(tmp_path: Path) -> None:
    # At --speed 0 over a fast link the socket takes every chunk as it comes. The replay must
    # still read what the server says meanwhile: the line as soon as it is committed (placed
    # where it was said, not where the sending had got to), and the server's heartbeat. This
    # server pings every second and drops a client that has not answered a second later; three
    # hours of audio take seconds to send, and the one connection lasts through all of them.
    flac = _long_flac(tmp_path / "long.flac", LONG_HOURS, LONG_RATE)
    config = tmp_path / "config.yaml"
    config.write_text("stt:\n  sample_rate: 8000\n  chunk_ms: 1000\n  silence_tail_ms: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTONESE_AI")}
    async with FakeSttServer(api_key=KEY, ping_interval=1.0, ping_timeout=1.0) as stt:
        stt.decode_seconds = 10.0
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "replay", "--config", str(config),
            "--speaker", f"alice={flac}", "--stt-url", stt.url, "--api-key", KEY,
            "--speed", "0", "--jsonl",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert len(stt.records) == 1, f"{len(stt.records)} connections: the server dropped it"
    (record,) = stt.records.values()
    assert record.chunks == LONG_HOURS * 3600  # 1 s chunks, each sent once
    (line,) = map(json.loads, out.decode().splitlines())
    assert line["text"] == "開會"
    assert 0.2 <= line["start"] <= 0.4 and line["end"] < 3.0, line
