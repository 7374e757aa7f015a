"""The recorded packets every contender is fed: speech-like audio sent as Discord sends it.

Audio: a synthetic voice (a glottal pulse train at a wandering pitch, shaped by three formant
resonators, with syllable-rate loudness and breathy noise), in phrases separated by pauses of
quiet room noise. It is not speech, but it has what makes Opus work hard on speech: a pitch, a
spectral envelope that changes every few tens of milliseconds, and loud/quiet alternation.

Packets: libopus at Discord's settings (48 kHz stereo, 20 ms, 64 kbit/s, in-band FEC) through
:class:`bot.sim.sender.OpusEncoder`; an RTP header with the RFC 6464 audio-level extension
(:func:`bot.sim.sender.build_rtp_header`); optionally DAVE-encrypted by a real davey member of a
group the bot's own davey session belongs to (Discord's external sender played by
:class:`bot.sim.dave_group.DaveGroup`); then transport-encrypted with
:class:`bot.voice.crypto.TransportCipher` in the chosen ``*_rtpsize`` mode.

Packets are sent continuously (no silence suppression): the worst case for the receiver.

Several speakers (``meeting=True``, rows 2e and 2u) talk as a meeting's members do: each says
something else (speaker k starts :data:`CONTENT_STRIDE_FRAMES` x k frames into the recording,
wrapping round) and starts at its own moment (round k mod :data:`START_SPREAD_FRAMES`), so their
100 ms chunks end at different moments. Sent in lockstep, every speaker's packet of a round was
the same Opus frame, decoded by decoders in the same state (libopus ran ~10 % cheaper on the
repeats), and all chunks ended within the same 20 ms (the loop's bursts of sends cost ~10 %
more); both made rows 2e and 2u look ~20 % cheaper than a meeting.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import davey
import numpy as np
import numpy.typing as npt

from bot.sim.dave_group import DaveGroup, Delivery, Op, SimulatedMember
from bot.sim.sender import (
    AUDIO_LEVEL_EXTENSION_ID,
    OpusEncoder,
    build_rtp_header,
    one_byte_extension,
)
from bot.voice.crypto import MODE_AES256_GCM, MODE_XCHACHA20, TransportCipher

log = logging.getLogger(__name__)

#: Discord voice: 48 kHz stereo, 20 ms per packet, 50 packets a second.
SAMPLE_RATE: Final = 48000
CHANNELS: Final = 2
FRAME_SAMPLES: Final = 960
PACKETS_PER_SECOND: Final = 50
#: Discord's default voice bitrate for a normal channel (64 kbit/s).
BITRATE: Final = 64000
#: Ids for the simulated call (arbitrary snowflake-shaped numbers).
CHANNEL_ID: Final = 4242_0000_0000_0001
BOT_USER_ID: Final = 9000
FIRST_MEMBER_ID: Final = 1000
FIRST_SSRC: Final = 0x1000
MODES: Final = (MODE_AES256_GCM, MODE_XCHACHA20)
#: A meeting's speakers start over this many rounds (20 ms each): one 100 ms chunk, so that
#: their chunk boundaries fall at every 20 ms step of it.
START_SPREAD_FRAMES: Final = 5
#: Frames between two meeting speakers' starting points in the recording (1.34 s): a prime,
#: so that no two of a few hundred speakers say the same frame at the same moment.
CONTENT_STRIDE_FRAMES: Final = 67
SHORT_MODE: Final = {MODE_AES256_GCM: "aes-gcm", MODE_XCHACHA20: "xchacha20"}


def speech_like(seconds: float, seed: int = 1, rate: int = SAMPLE_RATE) -> npt.NDArray[np.float32]:
    """Mono float32 in [-1, 1]: phrases of a synthetic voice with pauses between them."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    # Pitch wanders 90..220 Hz (a Cantonese speaker's tones move it a lot).
    pitch = 150 + 50 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 20 * np.sin(
        2 * np.pi * 3.1 * t
    )
    phase = np.cumsum(pitch / rate)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float32)
    source = pulses + 0.05 * rng.standard_normal(n).astype(np.float32)
    # Three formants, retuned every 40 ms (vowels): shape each half-overlapped Hann block's
    # spectrum by Gaussian bumps, then overlap-add (plain numpy, fast enough for set-up).
    block = int(0.04 * rate)
    hop = block // 2
    window = np.hanning(block).astype(np.float32)
    freqs = np.fft.rfftfreq(block, 1 / rate)
    out = np.zeros(n + block, dtype=np.float32)
    for start in range(0, n, hop):
        seg = np.zeros(block, dtype=np.float32)
        piece = source[start : start + block]
        seg[: len(piece)] = piece
        shape = np.zeros_like(freqs)
        for k, (lo, hi) in enumerate(((300, 900), (900, 2300), (2300, 3200))):
            f = rng.uniform(lo, hi)
            shape += np.exp(-0.5 * ((freqs - f) / 80.0) ** 2) / (k + 1)
        spectrum = np.fft.rfft(seg * window) * shape
        out[start : start + block] += np.fft.irfft(spectrum, block).astype(np.float32)
    out = out[:n]
    out /= np.max(np.abs(out)) + 1e-9
    # Syllables at ~4 Hz, phrases of 1.5..4 s separated by 0.4..1.2 s pauses.
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    gate = np.zeros(n, dtype=np.float32)
    pos = 0
    while pos < n:
        talk = int(rng.uniform(1.5, 4.0) * rate)
        gate[pos : pos + talk] = 1.0
        pos += talk + int(rng.uniform(0.4, 1.2) * rate)
    smooth = np.convolve(gate, np.hanning(int(0.02 * rate)) / (0.01 * rate), mode="same")
    room = 0.003 * rng.standard_normal(n)
    voice: npt.NDArray[np.float32] = np.clip(
        0.5 * out * envelope * np.minimum(smooth, 1.0) + room, -1, 1).astype(np.float32)
    return voice


def encode_opus(mono: npt.NDArray[np.float32]) -> list[bytes]:
    """Opus packets of ``mono`` as a Discord client sends them (stereo capture of one voice)."""
    pcm = np.clip(mono * 32767, -32768, 32767).astype(np.int16)
    stereo = np.repeat(pcm[:, None], CHANNELS, axis=1)
    frames = len(stereo) // FRAME_SAMPLES
    with OpusEncoder(SAMPLE_RATE, CHANNELS, bitrate=BITRATE, fec=True) as enc:
        return [enc.encode(stereo[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES])
                for i in range(frames)]


def level_dbov(frame_pcm: npt.NDArray[np.float32]) -> int:
    """RFC 6464 level of one frame: 0 (loudest) .. 127 (silence) -dBov."""
    rms = float(np.sqrt(np.mean(frame_pcm.astype(np.float64) ** 2)) + 1e-12)
    return int(min(127, max(0, round(-20 * np.log10(rms)))))


#: A second one-byte-form element after the audio level, so the extension body is two 32-bit
#: words: py-cord's receive path assumes 8 bytes of decrypted extension (``result[8:]``), and
#: the bench must feed every contender packets it can parse.
SECOND_EXTENSION_ID: Final = 2
EXTENSION_BODY_BYTES: Final = 8


def extension_body(level: int) -> bytes:
    """Audio level (RFC 6464, voice flag set) plus a 4-byte element: 8 bytes, two words."""
    body = one_byte_extension([(AUDIO_LEVEL_EXTENSION_ID, bytes([0x80 | level])),
                               (SECOND_EXTENSION_ID, bytes(4))])
    assert len(body) == EXTENSION_BODY_BYTES
    return body


# --- DAVE: a bot session in a real group ------------------------------------------------------


class _WireBot:
    """The bot's davey session answering the group as discord.py 2.7.1's gateway does."""

    def __init__(self) -> None:
        self.session = davey.DaveSession(1, BOT_USER_ID, CHANNEL_ID)
        self.protocol_version = 1
        self.pending: dict[int, int] = {}

    def handle(self, frame: dict[str, Any] | bytes) -> list[tuple[str, Any]]:
        if isinstance(frame, dict):
            op, d = frame["op"], frame["d"]
            if op == Op.DAVE_PREPARE_TRANSITION:
                self.pending[d["transition_id"]] = d["protocol_version"]
                return [("ready", d["transition_id"])]
            if op == Op.DAVE_EXECUTE_TRANSITION:
                self.protocol_version = self.pending.pop(d["transition_id"], 1)
            return []
        op = frame[0]
        if op == Op.MLS_EXTERNAL_SENDER:
            self.session.set_external_sender(frame[1:])
            return []
        if op == Op.MLS_PROPOSALS:
            optype = (davey.ProposalsOperationType.append if frame[1] == 0
                      else davey.ProposalsOperationType.revoke)
            result = self.session.process_proposals(optype, frame[2:])
            if result is None:
                return []
            return [("commit_welcome", result.commit + (result.welcome or b""))]
        if op in (Op.MLS_ANNOUNCE_COMMIT_TRANSITION, Op.MLS_WELCOME):
            (tid,) = struct.unpack_from(">H", frame, 1)
            if op == Op.MLS_WELCOME:
                self.session.process_welcome(frame[3:])
            else:
                self.session.process_commit(frame[3:])
            return [("ready", tid)] if tid else []
        return []


def _deliver(group: DaveGroup, bot: _WireBot, deliveries: list[Delivery]) -> None:
    queue = list(deliveries)
    while queue:
        _uid, frame = queue.pop(0)
        for kind, value in bot.handle(frame):
            if kind == "commit_welcome":
                queue += group.on_commit_welcome(BOT_USER_ID, value)
            elif kind == "ready":
                queue += group.on_transition_ready(BOT_USER_ID, value)


@dataclass
class DaveCall:
    """One voice channel's MLS group: the bot's session and the talking members'."""

    group: DaveGroup
    bot: _WireBot
    members: dict[int, SimulatedMember] = field(default_factory=dict)

    @classmethod
    def form(cls, member_ids: list[int]) -> DaveCall:
        group = DaveGroup(CHANNEL_ID)
        bot = _WireBot()
        call = cls(group, bot)
        _deliver(group, bot, group.join(BOT_USER_ID))
        _deliver(group, bot, group.on_key_package(
            BOT_USER_ID, bot.session.get_serialized_key_package()))
        for uid in member_ids:
            member = SimulatedMember(uid, CHANNEL_ID)
            _deliver(group, bot, group.add_member(member))
            call.members[uid] = member
        if not bot.session.ready or not all(m.session.ready for m in call.members.values()):
            raise RuntimeError("the DAVE group did not form")
        return call

    @property
    def session(self) -> davey.DaveSession:
        return self.bot.session


# --- packets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    user_id: int
    ssrc: int


@dataclass
class PacketSet:
    """Datagrams of one or more speakers, in arrival order, with what a receiver needs."""

    mode: str
    dave: bool
    secret_key: bytes
    speakers: list[Speaker]
    #: (speaker index, datagram), interleaved round-robin, 20 ms of audio per speaker per round.
    datagrams: list[tuple[int, bytes]]
    #: When each datagram is due, in seconds from the first round: round x 20 ms, the speakers'
    #: phases spread over the 20 ms in index order.
    due: list[float]
    #: The plain Opus payloads each speaker sent (what the floor decodes after decryption).
    opus: list[list[bytes]]
    call: DaveCall | None = None

    @property
    def label(self) -> str:
        return f"{SHORT_MODE[self.mode]}, DAVE {'on' if self.dave else 'off'}"


def make_packets(
    opus: list[bytes],
    levels: list[int],
    *,
    mode: str,
    dave: bool,
    speakers: int = 1,
    call: DaveCall | None = None,
    secret_key: bytes | None = None,
    meeting: bool = False,
) -> PacketSet:
    """Encrypt the same Opus stream as sent by ``speakers`` members (each its own SSRC): in
    lockstep, or (``meeting``) each from its own point of the recording and its own start."""
    key = secret_key or os.urandom(32)
    cipher = TransportCipher(mode, key)
    people = [Speaker(FIRST_MEMBER_ID + i, FIRST_SSRC + i) for i in range(speakers)]
    if dave and call is None:
        call = DaveCall.form([s.user_id for s in people])
    per_speaker: list[list[bytes]] = []
    said_by: list[list[bytes]] = []
    n = len(opus)
    for k, s in enumerate(people):
        nonce = 1
        out = []
        at = CONTENT_STRIDE_FRAMES * k % n if meeting and n else 0
        sends = n - start_round(k, meeting)  # a late starter stops with the rest
        said = (opus[at:] + opus[:at])[:sends]
        said_by.append(said)
        for i, (frame, level) in enumerate(zip(said, (levels[at:] + levels[:at])[:sends],
                                               strict=True)):
            payload = call.members[s.user_id].encrypt_opus(frame) if dave and call else frame
            header, ext = build_rtp_header(
                i & 0xFFFF, (i * FRAME_SAMPLES) & 0xFFFFFFFF, s.ssrc,
                extension=extension_body(level),
            )
            out.append(cipher.encrypt(header, ext, payload, nonce))
            nonce += 1
        per_speaker.append(out)
    datagrams: list[tuple[int, bytes]] = []
    due: list[float] = []
    frame_s, phase_s = 1 / PACKETS_PER_SECOND, 1 / PACKETS_PER_SECOND / speakers
    for r in range(n):  # every round after the first START_SPREAD_FRAMES is full
        for k in range(speakers):
            i = r - start_round(k, meeting)
            if i >= 0:
                datagrams.append((k, per_speaker[k][i]))
                due.append(r * frame_s + k * phase_s)
    return PacketSet(mode, dave, key, people, datagrams, due, said_by,
                     call if dave else None)


def start_round(speaker: int, meeting: bool) -> int:
    """The round (20 ms) of ``speaker``'s first packet: 0 in lockstep."""
    return speaker % START_SPREAD_FRAMES if meeting else 0


def datagram_number(speaker: int, frame: int, speakers: int, meeting: bool) -> int:
    """Where ``speaker``'s ``frame`` (its RTP sequence number, from 0) is in
    :attr:`PacketSet.datagrams`, without building the set (row 2u maps a chunk to the
    datagram that completed it, on the hot path)."""
    r = frame + start_round(speaker, meeting)
    if not meeting:
        return r * speakers + speaker
    spread = START_SPREAD_FRAMES

    def present(q: int, upto: int) -> int:  # speakers j < upto sending in round q
        return upto if q >= spread - 1 else upto // spread * (q + 1) + min(upto % spread, q + 1)

    before = sum(present(q, speakers) for q in range(min(r, spread - 1)))
    before += max(0, r - (spread - 1)) * speakers
    return before + present(r, speaker)


@dataclass
class Recording:
    """Opus packets of a synthetic talker and their audio levels; encrypt with make_packets."""

    opus: list[bytes]
    levels: list[int]
    seconds: float


def record(seconds: float, seed: int = 1) -> Recording:
    mono = speech_like(seconds, seed)
    opus = encode_opus(mono)
    levels = [level_dbov(mono[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES])
              for i in range(len(opus))]
    return Recording(opus, levels, len(opus) / PACKETS_PER_SECOND)


def write_packet_file(path: str, packets: PacketSet) -> None:
    """Datagrams of speaker 0 for the peers' subprocesses: u16 length + bytes, each."""
    with open(path, "wb") as f:
        for k, data in packets.datagrams:
            if k == 0:
                f.write(struct.pack(">H", len(data)) + data)
