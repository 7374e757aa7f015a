"""Bad input never crashes the bot: fuzzed RTP, corrupt Opus, hostile transcripts, wrong config.

Hypothesis drives the pure and sans-IO parts directly (the whole :class:`VoiceReceiver`, the STT
payload parser, the caption formatter, the config loader); one test pushes hostile
``transcript-message`` payloads through a real :class:`SttSession` on loopback. "Counted" is
checked as well as "no exception": every datagram lands in exactly one of the receiver's buckets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import typing
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import Config, load_config
from bot.errors import ConfigError
from bot.sim.sender import OpusEncoder, audio_level_extension, build_rtp_header
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track
from bot.stt import protocol as p
from bot.stt.session import SegmentCommitted, SttEvent, SttSession
from bot.transcript.format import escape, format_line
from bot.transcript.model import Segment
from bot.voice.crypto import TransportCipher
from bot.voice.receiver import FRAME_SAMPLES_48K, VoiceReceiver

MODE = "aead_aes256_gcm_rtpsize"
KEY = bytes(range(32))
USER, SSRC = 4242, 777
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# One second of real Opus (a 440 Hz tone) to mutate: valid frames are the interesting seeds.
_ENC = OpusEncoder(48000, 2)
_T = np.arange(48000) / 48000
_PCM = np.repeat((0.3 * 32767 * np.sin(2 * np.pi * 440 * _T)).astype(np.int16)[:, None], 2, 1)
OPUS_FRAMES = [_ENC.encode(np.ascontiguousarray(_PCM[i:i + 960])) for i in range(0, 48000, 960)]
CIPHER = TransportCipher(MODE, KEY)


def packet(seq: int, payload: bytes, *, ssrc: int = SSRC, nonce: int | None = None) -> bytes:
    header, ext = build_rtp_header(seq & 0xFFFF, (seq * FRAME_SAMPLES_48K) & 0xFFFFFFFF, ssrc,
                                   extension=audio_level_extension(30))
    return CIPHER.encrypt(header, ext, payload, seq if nonce is None else nonce)


class Sink:
    def __init__(self) -> None:
        self.samples = 0
        self.idle: list[int] = []

    def audio(self, user_id: int, pcm: np.ndarray) -> None:
        assert user_id == USER and pcm.dtype == np.int16 and pcm.ndim == 1
        self.samples += len(pcm)


def receiver(sink: Sink) -> VoiceReceiver:
    r = VoiceReceiver(sample_rate=16000, on_audio=sink.audio, on_idle=sink.idle.append,
                      is_ignored=lambda uid: False)
    r.set_transport(MODE, KEY)
    r.on_speaking(USER, SSRC, 0.0)
    return r


def mutate(data: bytes, how: str, n: int) -> bytes:
    b = bytearray(data)
    if how == "truncate":
        return bytes(b[: n % max(1, len(b))])
    if how == "version":
        b[0] = (b[0] & 0x3F) | ((n % 3) << 6)  # versions 0, 1, 2: only 2 is RTP
    elif how == "csrc":
        b[0] = (b[0] & 0xF0) | (n % 16)  # CSRC count running past the end
    elif how == "ext_length" and len(b) > 15:
        b[14:16] = (n % 65536).to_bytes(2, "big")  # the extension's length in words
    elif how == "tag":
        b[-1 - n % 16] ^= 1 + n % 255  # the AEAD tag (or ciphertext) no longer authenticates
    elif how == "nonce":
        b[-1 - n % 4] ^= 1 + n % 255
    elif how == "payload_type":
        b[1] = n % 256
    elif how == "rtcp":
        b[1] = 200 + n % 5
    elif how == "ssrc":
        b[8:12] = (n % 2**32).to_bytes(4, "big")
    return bytes(b)


HOW = st.sampled_from(["keep", "truncate", "version", "csrc", "ext_length", "tag", "nonce",
                       "payload_type", "rtcp", "ssrc"])


@FUZZ
@given(st.lists(st.one_of(
    st.tuples(st.integers(0, 200), HOW, st.integers(0, 2**32)),  # a real packet, mutated
    st.binary(max_size=200),                                      # garbage
), max_size=120))
def test_any_datagram_sequence_through_the_receiver_is_counted_never_raises(
    items: list[tuple[int, str, int] | bytes],
) -> None:
    sink = Sink()
    r = receiver(sink)
    now = 0.0
    for item in items:
        if isinstance(item, bytes):
            data = item
        else:
            seq, how, n = item  # seq: replayed, out of order, gaps, wrapping
            frame = OPUS_FRAMES[seq % len(OPUS_FRAMES)]
            data = packet(seq + 65500, frame) if how == "keep" else mutate(
                packet(seq + 65500, frame), how, n)
        now += 0.02
        r.handle_packet(data, now)
        r.tick(now)
    r.tick(now + 3600)
    stats = r.stats
    assert stats["received"] == len(items)
    # Each datagram is dropped in at most one bucket (a parked "pending" one may be released
    # and then dropped again once its SSRC is known: never here, the only SSRC is mapped).
    dropped = sum(stats[k] for k in ("malformed", "rtcp", "other_payload_type", "pending",
                                     "bad_tag", "no_key", "ignored", "dave_failed"))
    assert dropped <= len(items)
    if dropped == len(items):
        assert sink.samples == 0  # nothing got through, nothing was invented


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=400), st.sampled_from(OPUS_FRAMES)),
                min_size=1, max_size=60))
def test_corrupt_opus_frames_are_concealed_counted_and_the_stream_goes_on(
    payloads: list[bytes],
) -> None:
    sink = Sink()
    r = receiver(sink)
    now, seq = 0.0, 0
    for seq, payload in enumerate(payloads):
        now += 0.02
        r.handle_packet(packet(seq, payload), now)
    before = sink.samples
    # The stream survives: good frames after the bad ones still decode.
    for good in OPUS_FRAMES[:5]:
        seq += 1
        now += 0.02
        r.handle_packet(packet(seq, good), now)
    r.tick(now + 0.5)
    assert r.stats["bad_tag"] == 0 and r.stats["malformed"] == 0
    # (Garbage may parse as a valid shorter packet, e.g. b"\x00" is 10 ms of SILK: less audio,
    # which is what the packet says; only the good 20 ms frames have a known length.)
    assert sink.samples - before >= 5 * (16000 // 50)


def test_a_frame_libopus_refuses_is_counted_and_concealed() -> None:
    sink = Sink()
    r = receiver(sink)
    bad = bytes([0x0B]) + b"\xff" * 3  # code 3 with an impossible frame count
    for seq, payload in enumerate([OPUS_FRAMES[0], bad, OPUS_FRAMES[1], bad, OPUS_FRAMES[2]]):
        r.handle_packet(packet(seq, payload), seq * 0.02)
    r.tick(0.3)  # past the jitter window, before any silence fill
    assert r.stats["undecodable"] == 2
    assert sink.samples == 5 * (16000 // 50)


# -- transcript payloads --------------------------------------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)
MESSAGE_TYPES = st.sampled_from(["partial_transcript", "committed_transcript",
                                 "committed_transcript_with_timestamps", "session_started",
                                 "something_new", "", 7])


@FUZZ
@given(st.one_of(JSONISH, st.fixed_dictionaries(
    {"message_type": MESSAGE_TYPES},
    optional={"text": JSONISH | st.text(max_size=50), "words": JSONISH,
              "session_id": JSONISH})))
def test_any_transcript_payload_parses_or_is_refused_with_a_protocol_error(payload: object) -> None:
    try:
        p.parse_transcript_message(payload)
    except p.ProtocolError:
        pass


MENTIONS = st.sampled_from(["@everyone", "@here", "<@123>", "<@!123>", "<@&456>", "<#789>",
                            "**bold**", "`code`", "||spoiler||", "> quote", "[x](http://a)",
                            "</cmd:1>", "\\@everyone", "@\u200beveryone"])


@FUZZ
@given(st.lists(st.one_of(MENTIONS, st.text(max_size=20)), min_size=1, max_size=8))
def test_posted_lines_never_carry_a_live_mention(parts: list[str]) -> None:
    text = "".join(parts)
    line = format_line(Segment(speaker="@everyone", text=text, start=1.0, end=2.0),
                       with_speaker=True)
    assert "@everyone" not in line and "@here" not in line
    for live in ("<@1", "<@!", "<@&", "<#7"):
        assert live not in line.replace("\\<", "")
    assert escape(text).count("@") == text.count("@")


async def test_hostile_transcript_messages_through_a_real_session_are_counted_and_skipped() -> None:
    events: list[SttEvent] = []
    hostile: list[object] = [
        None, 42, "text", [], {}, {"message_type": None},
        {"message_type": "committed_transcript"},  # no text
        {"message_type": "committed_transcript", "text": 12},
        {"message_type": "committed_transcript_with_timestamps", "text": "x", "words": "nope"},
        {"message_type": "committed_transcript_with_timestamps", "text": "x",
         "words": [{"text": "x", "start": "soon", "end": None}]},
        {"message_type": "partial_transcript", "text": ["a"]},
        {"message_type": "brand_new_kind", "text": "hi"},
        {"message_type": "committed_transcript", "text": "@everyone <@&1> " + "長" * 200_000},
    ]
    async with asyncio.timeout(30), FakeSttServer(api_key="k") as server:
        session = SttSession(url=server.url, api_key="k", sample_rate=16000, speaker="alice",
                             on_event=events.append)
        await session.start()
        for payload in hostile:
            await server.emit_raw(p.TRANSCRIPT_MESSAGE, payload)
        # The session still works: a real sentence afterwards becomes a line.
        track = speech_track([(0.3, "好")], 16000)
        session.send_audio(np.round(track * 32767).astype("<i2").tobytes())
        await session.stop()
    texts = [e.segment.text for e in events if isinstance(e, SegmentCommitted)]
    assert texts[-1] == "好"
    huge = [t for t in texts if t.startswith("@everyone")]
    assert len(huge) <= 1  # taken as (untrusted) text or refused: never a crash
    assert session.stats.protocol_errors >= 8, session.stats


# -- config ---------------------------------------------------------------------------------------

WRONG: dict[type, object] = {int: "many", float: "fast", bool: "perhaps", str: 12}


def _fields() -> list[tuple[str, str, object]]:
    out = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        hints = typing.get_type_hints(type(getattr(Config(), section.name)))
        for f in dataclasses.fields(type(getattr(Config(), section.name))):
            tp = hints[f.name]
            base = next((t for t in (bool, int, float, str) if t is tp or (
                typing.get_origin(tp) is not None and t in typing.get_args(tp))), str)
            bad: object = WRONG[base]
            if typing.get_origin(tp) is tuple or tuple in typing.get_args(tp):
                bad = {"not": "a list"}
            out.append((section.name, f.name, bad))
    return out


def test_every_config_key_given_a_wrong_value_is_one_clear_line(tmp_path: Path) -> None:
    checked = 0
    for section, key, bad in _fields():
        path = tmp_path / f"{section}-{key}.yaml"
        value = repr(bad) if not isinstance(bad, dict) else "{not: a list}"
        path.write_text(f"{section}:\n  {key}: {value}\n", encoding="utf-8")
        try:
            load_config(path, environ={})
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message, message
            assert f"{section}.{key}" in message and path.name in message, message
            checked += 1
        else:
            # A string-typed key takes any string; YAML quoting made ours one. Not a failure.
            assert isinstance(bad, int), (section, key)
    assert checked >= 20


def test_unknown_keys_and_sections_are_one_clear_line(tmp_path: Path) -> None:
    for text, key in [("stt:\n  sample_rat: 16000\n", "stt.sample_rat"),
                      ("sttt:\n  url: x\n", "sttt")]:
        path = tmp_path / "c.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path, environ={})
        except ConfigError as exc:
            assert "\n" not in str(exc) and key in str(exc)
        else:
            raise AssertionError(f"{key} accepted")


random.seed(0)
