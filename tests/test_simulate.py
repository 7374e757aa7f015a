"""End to end: the real bot (``CantoBot``) against the loopback Discord and the loopback STT.

Every test here runs the whole product path over real sockets on 127.0.0.1: slash command over
the gateway, voice gateway handshake, Opus in RTP with transport encryption (both modes) and, with
DAVE on, an MLS group the bot shares with the simulated members; the bot decrypts, decodes,
streams each speaker to the STT fake (which decodes tone-coded Cantonese back to text) and posts
the committed lines through the captions webhook as the speaker. The tests assert what a person
reading the channel would see: the text, who said it (the webhook's name), each speaker's order,
and the ``[mm:ss]`` time against when the member really spoke.

Speech is tone code, about 0.72 s per Cantonese character, so lines are one or two characters and
each meeting lasts a few seconds of real time. Any failure prints :meth:`Simulation.report`:
the bot's posts, the voice server's journal (every op to and from the bot, joins, leaves, DAVE
commits, injected faults) and each member's packet timeline, so it says which step went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile

from bot.cli import build_parser
from bot.config import ENV_OVERRIDES, Config, load_config, with_overrides
from bot.errors import CantobotError
from bot.sim.dave_group import LibdaveMember
from bot.sim.discord.state import PostedMessage
from bot.sim.simulate import DEMO_SCRIPT, SAMPLE_RATE, Simulation, tone_pcm
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import utterance_duration
from bot.voice.receiver import VoiceReceiver

API_KEY = "e2e-key"
AES = "aead_aes256_gcm_rtpsize"
XCHACHA = "aead_xchacha20_poly1305_rtpsize"
#: One simulated meeting, start to minutes, must finish within this (s); they take 5-15 s.
MEETING_TIMEOUT = 60.0
#: The CLI runs (simulate and the demo, concurrently) must finish within this (s).
CLI_TIMEOUT = 120.0
#: How far a posted ``[mm:ss]`` may be from when the member spoke (s): the stamp is floored to
#: the second, and the STT's segment start can be a little before or after the tone's start.
STAMP_EARLY, STAMP_LATE = 1.6, 1.0
#: Voice gateway ops the tests look for (Discord's numbers).
OP_MLS_KEY_PACKAGE = 26
OP_MLS_COMMIT_WELCOME = 28
OP_MLS_ANNOUNCE_COMMIT = 29
OP_MLS_WELCOME = 30
OP_MLS_INVALID_COMMIT_WELCOME = 31
OP_DAVE_TRANSITION_READY = 23
#: The documented ``--jsonl`` record.
JSONL_KEYS = {"channel", "thread", "author", "content", "edit", "attachments"}
#: ``cantobot simulate``'s interface as issue 5 states it.
SIMULATE_USAGE = (
    "--speaker NAME=FILE [--speaker ...] [--stt-url URL] [--api-key KEY] [--sample-rate HZ] "
    "[--threads] [--mode MODE] [--dave | --no-dave] [--loss PCT] [--jsonl]"
)
LINE_RE = re.compile(r"^`\[(\d+):(\d\d)\]` (.*)$", re.S)


@dataclass(frozen=True)
class Line:
    """One transcript line as the channel shows it (or as a test expects it)."""

    author: str
    text: str
    seconds: float  # meeting time: exact when expected, floored to the second when posted


@pytest.fixture
async def stt() -> AsyncIterator[FakeSttServer]:
    async with FakeSttServer(api_key=API_KEY) as server:
        yield server


@pytest.fixture
def config(stt: FakeSttServer) -> Config:
    return with_overrides(load_config(None, environ={}), stt={"url": stt.url, "api_key": API_KEY})


@contextlib.asynccontextmanager
async def meeting(config: Config, **kwargs: object) -> AsyncIterator[Simulation]:
    """A running simulation, bounded in time start to finish (its shutdown included), whose
    failures (asserts, timeouts, steps that did not finish) carry its report."""
    sim = Simulation(config, **kwargs)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(MEETING_TIMEOUT), sim:
            yield sim
    except (AssertionError, TimeoutError, CantobotError) as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n\n{sim.report()}") from exc


def posted_lines(messages: list[PostedMessage]) -> list[Line]:
    """The transcript lines in the channel, in posting order (notices and minutes left out)."""
    out = []
    for m in messages:
        match = LINE_RE.match(m.content)
        if match and not m.edit:
            minutes, seconds, text = match.groups()
            out.append(Line(m.author, text, int(minutes) * 60 + int(seconds)))
    return out


def said(sim: Simulation, name: str, lines: list[tuple[float, str]], nth: int = 0) -> list[Line]:
    """What ``name`` said in their ``nth`` speak(), at meeting times from when it really began."""
    spoken = [s for s in sim.spoken if s.name == name][nth]
    assert sim.meeting_started_at is not None
    base = (spoken.started_at - sim.meeting_started_at).total_seconds()
    return [Line(name, text, base + start) for start, text in lines]


def said_all(sim: Simulation, scripts: dict[str, list[tuple[float, str]]]) -> list[Line]:
    """What every member said in their first speak()."""
    return [line for name, lines in scripts.items() for line in said(sim, name, lines)]


def assert_transcript(sim: Simulation, expected: list[Line]) -> None:
    """Exactly the expected lines: same authors, each author's lines in order, times close."""
    posted = posted_lines(sim.messages)
    authors = sorted({line.author for line in expected})
    assert sorted({line.author for line in posted}) == authors
    for author in authors:
        got = [line for line in posted if line.author == author]
        want = sorted((line for line in expected if line.author == author), key=lambda x: x.seconds)
        assert [g.text for g in got] == [w.text for w in want], f"{author}'s lines"
        for g, w in zip(got, want, strict=True):
            assert w.seconds - STAMP_EARLY <= g.seconds <= w.seconds + STAMP_LATE, (
                f"{author} said {w.text!r} at {w.seconds:.2f} s; posted as [{g.seconds:.0f} s]"
            )


def assert_every_frame_decoded(sim: Simulation, receiver: VoiceReceiver) -> None:
    """Frames the bot decoded per member equal the media packets the loopback Discord sent
    them (a lossy receiver fails here even where the tone code would survive the loss)."""
    sent: Counter[int] = Counter(who for kind, who in sim.discord.voice.timeline if kind == "media")
    assert sent, "members spoke"
    decoded = {uid: receiver.decoded_by_member[uid] for uid in sent}
    assert decoded == dict(sent), f"decoded {decoded}, sent {dict(sent)}: {receiver.counters()}"


def minutes_message(sim: Simulation) -> PostedMessage:
    found = [m for m in sim.messages if "minutes.md" in m.attachments]
    assert len(found) == 1, "one minutes message with its files"
    return found[0]


def ops_to_bot(sim: Simulation) -> list[int]:
    conn = sim.discord.voice.connection
    assert conn is not None, "the bot has a voice connection"
    return [op for _, op, _ in conn.binary_sent]


def ops_from_bot(sim: Simulation) -> list[int]:
    conn = sim.discord.voice.connection
    assert conn is not None, "the bot has a voice connection"
    return list(conn.ops_in)


# -- meetings -------------------------------------------------------------------------------------


async def test_three_members_talking_at_once_over_aes_gcm_with_dave_are_posted_as_themselves(
    config: Config,
) -> None:
    # The members form their MLS group before the bot arrives: the bot is welcomed into it.
    scripts = {
        "alice": [(0.2, "你好"), (2.6, "多謝")],
        "bob": [(0.8, "早晨")],
        "carol": [(1.4, "食飯")],
    }
    async with meeting(config, members=tuple(scripts), modes=(AES,), dave=True, seed=1) as sim:
        await sim.join(sim.host, *scripts)
        group = sim.discord.voice.group
        assert group.epoch is not None and group.epoch >= 1
        assert sim.discord.bot_user_id not in group.members
        await sim.start()
        conn = sim.discord.voice.connection
        assert conn is not None and conn.mode == AES
        # Welcome path: the bot's key package, the welcome (op 30, no commit of its own), ready.
        assert OP_MLS_KEY_PACKAGE in ops_from_bot(sim)
        assert OP_MLS_COMMIT_WELCOME not in ops_from_bot(sim)
        assert ops_to_bot(sim).count(OP_MLS_WELCOME) == 1
        assert OP_DAVE_TRANSITION_READY in ops_from_bot(sim)
        meeting_now = sim.meeting
        assert meeting_now is not None and meeting_now.status().e2ee
        # The voice socket is read on the event loop, not through discord.py's reader thread.
        assert meeting_now.intake.listener.inbox.reading
        await sim.speak_together({name: tone_pcm(lines) for name, lines in scripts.items()})
        await sim.stop()

        assert_every_frame_decoded(sim, meeting_now.receiver)
        assert_transcript(sim, said_all(sim, scripts))
        summary = minutes_message(sim).content
        assert "3 participants" in summary and "4 lines" in summary
        assert "alice: 2 lines" in summary


async def test_xchacha_without_dave_sends_plain_opus_and_the_same_lines_arrive(
    config: Config,
) -> None:
    scripts = {"alice": [(0.2, "你好")], "bob": [(0.6, "早晨")]}
    async with meeting(config, members=tuple(scripts), modes=(XCHACHA,), dave=False) as sim:
        await sim.join(sim.host, *scripts)
        await sim.start()
        conn = sim.discord.voice.connection
        assert conn is not None and conn.mode == XCHACHA
        meeting_now = sim.meeting
        assert meeting_now is not None and not meeting_now.status().e2ee
        await sim.speak_together({name: tone_pcm(lines) for name, lines in scripts.items()})
        assert ops_to_bot(sim) == []  # no MLS at all on a call without DAVE
        await sim.stop()

        assert_every_frame_decoded(sim, meeting_now.receiver)
        assert_transcript(sim, said_all(sim, scripts))


async def test_five_percent_packet_loss_is_concealed_and_every_line_still_arrives(
    config: Config,
) -> None:
    scripts = {"alice": [(0.2, "你好"), (2.5, "再見")], "bob": [(0.7, "早晨"), (3.0, "好")]}
    async with meeting(config, members=tuple(scripts), dave=True, loss=5.0, seed=5) as sim:
        await sim.join(sim.host, *scripts)
        await sim.start()
        receiver = sim.meeting.receiver if sim.meeting is not None else None
        await sim.speak_together({name: tone_pcm(lines) for name, lines in scripts.items()})
        await sim.stop()

        assert receiver is not None
        assert_every_frame_decoded(sim, receiver)  # the lost ones were never sent
        for name in scripts:
            uid = sim.member_id(name)
            kinds = [kind for kind, who in sim.discord.voice.timeline if who == uid]
            lost, sent = kinds.count("lost"), kinds.count("media")
            assert 0.01 <= lost / (lost + sent) <= 0.12, f"{name}: {lost} of {lost + sent} lost"
        assert_transcript(sim, said_all(sim, scripts))


async def test_a_member_who_leaves_and_rejoins_is_still_transcribed_as_one_speaker(
    config: Config,
) -> None:
    first, second, bobs = [(0.2, "你好")], [(0.2, "返嚟")], [(0.6, "歡迎")]
    async with meeting(config, members=("alice", "bob"), modes=(XCHACHA,), dave=True) as sim:
        await sim.join(sim.host, "alice", "bob")
        await sim.start()
        await sim.speak("alice", tone_pcm(first))
        ssrc_before = sim.ssrc_of("alice")
        group = sim.discord.voice.group
        epoch_joined = group.epoch
        commits_to_bot = ops_to_bot(sim).count(OP_MLS_ANNOUNCE_COMMIT)

        await sim.leave("alice")  # MLS Remove: the bot commits it
        assert sim.ssrc_of("alice") is None
        assert sim.member_id("alice") not in group.members
        epoch_left = group.epoch
        await sim.join("alice")  # MLS Add: the bot commits it, alice is welcomed
        assert sim.member_id("alice") in group.members
        assert epoch_joined is not None and epoch_left is not None and group.epoch is not None
        assert epoch_joined < epoch_left < group.epoch
        assert ops_to_bot(sim).count(OP_MLS_ANNOUNCE_COMMIT) == commits_to_bot + 2
        assert ops_from_bot(sim).count(OP_MLS_COMMIT_WELCOME) == 2  # the bot committed both

        await sim.speak_together({"alice": tone_pcm(second), "bob": tone_pcm(bobs)})
        assert sim.ssrc_of("alice") not in (None, ssrc_before)  # a new connection, a new SSRC
        receiver = sim.meeting.receiver if sim.meeting is not None else None
        await sim.stop()

        assert receiver is not None
        assert_every_frame_decoded(sim, receiver)  # before the leave and after the re-key

        assert_transcript(
            sim,
            said(sim, "alice", first) + said(sim, "alice", second, nth=1) + said(sim, "bob", bobs),
        )
        summary = minutes_message(sim).content
        assert "2 participants" in summary and "alice: 2 lines" in summary


async def test_a_corrupt_commit_makes_the_bot_rejoin_the_group_and_transcription_continues(
    config: Config,
) -> None:
    before, after = [(0.2, "你好")], {"alice": [(0.2, "再見")], "carol": [(0.6, "食飯")]}
    members = ("alice", "bob", "carol")
    async with meeting(config, members=members, modes=(AES,), dave=True, seed=3) as sim:
        await sim.join(sim.host, "alice", "bob")
        await sim.start()
        await sim.speak("alice", tone_pcm(before))
        group = sim.discord.voice.group
        sim.discord.corrupt_next_commit()

        await sim.join("carol")  # the bot's commit adding carol comes back damaged (op 29)

        # op 31, a fresh key package; the members remove the bot's old leaf and re-add it (op 30).
        from_bot = ops_from_bot(sim)
        assert OP_MLS_INVALID_COMMIT_WELCOME in from_bot
        assert OP_MLS_KEY_PACKAGE in from_bot[from_bot.index(OP_MLS_INVALID_COMMIT_WELCOME) :]
        to_bot = ops_to_bot(sim)
        assert to_bot[-1] == OP_MLS_WELCOME
        bot = sim.discord.bot_user_id
        # The bot committed carol's Add; members committed its removal and its return.
        assert [who == bot for who, _, _ in group.history[-3:]] == [True, False, False]
        everyone = [sim.member_id(n) for n in (sim.host, *members)] + [bot]
        assert sorted(group.members) == sorted(everyone)
        meeting_now = sim.meeting
        assert meeting_now is not None and meeting_now.status().e2ee

        await sim.speak_together({name: tone_pcm(lines) for name, lines in after.items()})
        await sim.stop()

        assert_every_frame_decoded(sim, meeting_now.receiver)

        assert_transcript(
            sim,
            said(sim, "alice", before)
            + said(sim, "alice", after["alice"], nth=1)
            + said(sim, "carol", after["carol"]),
        )


# -- the command line -----------------------------------------------------------------------------


def test_simulate_help_shows_the_documented_interface(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert usage.startswith(f"usage: cantobot simulate {SIMULATE_USAGE}")
    args = parser.parse_args(["simulate", "--speaker", "a=x.wav"])
    assert args.dave is True and args.loss == 0.0 and args.jsonl is False
    assert parser.parse_args(["simulate", "--speaker", "a=x.wav", "--no-dave"]).dave is False
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--dave", "--no-dave", "--speaker", "a=x.wav"])
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--jsonl"])  # no speaker: bad usage, not a run


def clean_env() -> dict[str, str]:
    """This process's environment without any configuration override (tokens, URLs, keys)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def json_records(stdout: bytes) -> list[dict[str, object]]:
    records = []
    for raw in stdout.decode("utf-8").splitlines():
        record = json.loads(raw)  # every stdout line is one JSON object
        assert isinstance(record, dict) and set(record) == JSONL_KEYS, raw
        assert isinstance(record["edit"], bool) and isinstance(record["attachments"], list)
        records.append(record)
    return records


def spoken_lines(records: list[dict[str, object]]) -> list[tuple[object, str]]:
    out = []
    for r in records:
        match = LINE_RE.match(str(r["content"]))
        if match and not r["edit"]:
            out.append((r["author"], match.group(3)))
    return out


async def run_cli(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.xdist_group("cpu_heavy")  # one CPU-heavy test at a time in parallel runs (pyproject)
async def test_simulate_and_demo_jsonl_print_only_the_documented_records(
    stt: FakeSttServer, tmp_path: Path
) -> None:
    # simulate: files a user would pass (16 kHz mono WAV), AES-GCM only, no DAVE, 5 % loss.
    scripts = {"alice": [(0.2, "你好")], "bob": [(0.5, "早晨")]}
    flags = []
    for name, lines in scripts.items():
        path = tmp_path / f"{name}.wav"
        pcm = tone_pcm(lines)[:, 0]
        soundfile.write(path, pcm[:: SAMPLE_RATE // 16000], 16000, subtype="PCM_16")
        flags += ["--speaker", f"{name}={path}"]
    simulate_args = (
        "simulate",
        *flags,
        "--stt-url",
        stt.url,
        "--api-key",
        API_KEY,
        "--mode",
        AES,
        "--no-dave",
        "--loss",
        "5",
        "--jsonl",
    )
    async with asyncio.timeout(CLI_TIMEOUT):
        (sim_rc, sim_out, sim_err), (demo_rc, demo_out, demo_err) = await asyncio.gather(
            run_cli(*simulate_args), run_cli("demo", "--jsonl")
        )
    assert sim_rc == 0, sim_err.decode()[-4000:]
    assert demo_rc == 0, demo_err.decode()[-4000:]

    records = json_records(sim_out)
    assert sorted(spoken_lines(records)) == [("alice", "你好"), ("bob", "早晨")]
    # Everything in #general, but the consent notice also in the voice channel's own chat.
    assert {r["channel"] for r in records} == {"general", "Meeting Room"}
    in_voice_chat = [r for r in records if r["channel"] == "Meeting Room"]
    assert len(in_voice_chat) == 1 and "/transcribe optout" in str(in_voice_chat[0]["content"])
    assert {r["thread"] for r in records} == {None}
    minutes = [r for r in records if r["attachments"]]
    assert len(minutes) == 1 and "minutes.md" in minutes[0]["attachments"]  # type: ignore[operator]

    demo = json_records(demo_out)
    for name, lines in DEMO_SCRIPT.items():
        assert [text for who, text in spoken_lines(demo) if who == name] == [t for _, t in lines]
    assert any(r["attachments"] for r in demo)
    (summary,) = [str(r["content"]) for r in demo if r["attachments"]]
    assert "% alice: 2 lines" in summary and "`█" in summary  # talk-time bars


def test_demo_takes_the_script_and_jyutping_choices_and_refuses_others() -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "--script", "simplified", "--jyutping", "line"])
    assert (args.script, args.jyutping) == ("simplified", "line")
    assert (parser.parse_args(["demo"]).script, parser.parse_args(["demo"]).jyutping) == (
        None, None)  # the config defaults apply
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--script", "traditional"])


# -- Discord's own DAVE (libdave) in the members, davey in the bot (issue 12, item 4) ------------


def assert_privacy_codes_match(sim: Simulation) -> None:
    """The bot's voice privacy code is the one every libdave member computes for the epoch:
    ``generate_displayable_code(get_last_epoch_authenticator(), 30, 5)``."""
    meeting_now = sim.meeting
    assert meeting_now is not None
    status = meeting_now.status()
    assert status.e2ee and status.privacy_code
    codes = {}
    for uid, mv in sim.discord.voice.members.items():
        assert isinstance(mv.dave, LibdaveMember), "members run libdave"
        codes[uid] = mv.dave.privacy_code
    assert codes and set(codes.values()) == {status.privacy_code.replace(" ", "")}, codes


@pytest.mark.parametrize("mode", [AES, XCHACHA], ids=["aes-gcm", "xchacha"])
@pytest.mark.parametrize("flow", ["group-exists", "bot-commits"])
async def test_libdave_members_rekey_for_a_late_joiner_and_a_leaver_without_losing_words(
    config: Config, flow: str, mode: str
) -> None:
    alice, bob = [(0.3, "開會"), (5.5, "預算")], [(0.8, "收到"), (6.0, "明白")]
    carol, alice_after = [(0.5, "我嚟咗")], [(0.2, "再見")]
    first_lines_end = max(start for start, _ in (alice[0], bob[0])) + utterance_duration("收到")
    async with meeting(config, members=("alice", "bob", "carol"), modes=(mode,), dave=True,
                       seed=11, member_dave="libdave") as sim:
        group = sim.discord.voice.group
        bot = sim.discord.bot_user_id
        if flow == "group-exists":  # the members' group exists; the bot is welcomed into it
            await sim.join(sim.host, "alice", "bob")
            formed = len(group.history)
            await sim.start()
            assert group.history[formed - 1][0] != bot
            assert OP_MLS_WELCOME in ops_to_bot(sim)
        else:  # the bot arrives with the host alone, founds the group and commits every Add
            await sim.start()
            await sim.join("alice", "bob")
            assert group.history and all(who == bot for who, _, _ in group.history)
            assert ops_from_bot(sim).count(OP_MLS_COMMIT_WELCOME) == len(group.history)
        assert_privacy_codes_match(sim)
        epoch = group.epoch
        assert epoch is not None

        loop = asyncio.get_running_loop()
        began = loop.time()
        rekeyed_after = 0.0

        async def carol_joins_late() -> None:
            nonlocal rekeyed_after
            await asyncio.sleep(first_lines_end + 0.3)  # between everyone's 1st and 2nd lines
            await sim.join("carol")  # Add proposal, the bot's commit, welcome, new epoch
            rekeyed_after = loop.time() - began
            await sim.speak("carol", tone_pcm(carol))

        await asyncio.gather(sim.speak("alice", tone_pcm(alice, duration=8.5)),
                             sim.speak("bob", tone_pcm(bob, duration=9.0)), carol_joins_late())
        assert group.epoch == epoch + 1 and group.history[-1][0] == bot
        # The re-key fell between each speaker's two lines: words on both sides count below.
        assert first_lines_end < rekeyed_after < alice[1][0], rekeyed_after
        assert_privacy_codes_match(sim)

        await sim.leave("bob")  # Remove proposal, the bot's commit, another epoch
        assert group.epoch == epoch + 2 and sim.member_id("bob") not in group.members
        assert_privacy_codes_match(sim)
        await sim.speak("alice", tone_pcm(alice_after))
        receiver_stats = dict(sim.meeting.receiver.stats) if sim.meeting is not None else {}
        await sim.stop()

        assert_transcript(sim, said(sim, "alice", alice) + said(sim, "bob", bob)
                          + said(sim, "carol", carol) + said(sim, "alice", alice_after, nth=1))
        # libdave encrypts even the Opus silence frames; none failed to decrypt in the bot.
        assert receiver_stats.get("dave_failed", 0) == 0, receiver_stats
        assert all(not m.dave.failures for m in sim.discord.voice.members.values()
                   if isinstance(m.dave, LibdaveMember))


@pytest.mark.parametrize("command", ["demo", "simulate"])
async def test_without_the_sim_extra_simulate_and_demo_name_it_in_one_line(
    tmp_path: Path, command: str
) -> None:
    """An install without dave.py (no ``sim`` extra): one line saying what to install."""
    blocker = tmp_path / "site" / "dave"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('dave.py is not installed')\n")
    wav = tmp_path / "a.wav"
    soundfile.write(wav, tone_pcm([(0.2, "你好")])[:, 0], SAMPLE_RATE)
    args = ["demo"] if command == "demo" else [
        "simulate", "--speaker", f"alice={wav}", "--stt-url", "http://127.0.0.1:9",
        "--api-key", API_KEY]
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    async with asyncio.timeout(CLI_TIMEOUT):
        out, err = await proc.communicate()
    lines = [line for line in err.decode().splitlines() if line.startswith("cantobot:")]
    assert proc.returncode == 1 and out == b"", err.decode()
    assert len(lines) == 1 and "pip install 'cantobot[sim]'" in lines[0], err.decode()
    assert "Traceback" not in err.decode()
