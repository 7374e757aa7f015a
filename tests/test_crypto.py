"""Transport decryption of Discord voice packets (bot.voice.crypto), with real Opus and ciphers."""

from __future__ import annotations

import math
import os
import struct
from types import SimpleNamespace

import discord.opus
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from discord.voice_client import VoiceClient
from hypothesis import given
from hypothesis import strategies as st

from bot.errors import VoiceError
from bot.sim.sender import (
    audio_level_extension,
    build_rtp_header,
    one_byte_extension,
    parse_one_byte_extension,
)
from bot.voice.crypto import (
    MODE_AES256_GCM,
    MODE_XCHACHA20,
    SUPPORTED_MODES,
    DecryptError,
    PacketCounters,
    TransportCipher,
    UnsupportedMode,
    choose_mode,
    nonce_of,
)
from bot.voice.rtp import (
    MalformedPacket,
    extension_body,
    is_rtcp,
    parse_rtp,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SAMPLES_PER_FRAME = 960  # 20 ms at 48 kHz, Discord's Opus frame


def _opus_frames(count: int) -> list[bytes]:
    """Real Opus frames from libopus: a 440 Hz stereo tone, 20 ms each."""
    discord.opus._load_default()
    encoder = discord.opus.Encoder()
    frames = []
    for n in range(count):
        samples = []
        for i in range(SAMPLES_PER_FRAME):
            v = int(8000 * math.sin(2 * math.pi * 440 * (n * SAMPLES_PER_FRAME + i) / 48000))
            samples += (v, v)
        frames.append(encoder.encode(struct.pack(f"<{len(samples)}h", *samples), SAMPLES_PER_FRAME))
    return frames


OPUS = _opus_frames(3)


def _discord_py_packet(
    mode: str, key: bytes, opus: bytes, *, seq: int, ts: int, nonce: int
) -> bytes:
    """A packet made by discord.py 2.7.1's own VoiceClient._get_voice_packet (no connection)."""
    client = VoiceClient.__new__(VoiceClient)
    client.sequence = seq
    client.timestamp = ts
    client._incr_nonce = nonce
    client._connection = SimpleNamespace(  # the attributes _get_voice_packet reads
        dave_session=None, can_encrypt=False, ssrc=0x1234, mode=mode, secret_key=list(key)
    )
    packet: bytes = client._get_voice_packet(opus)
    assert client._incr_nonce == nonce + 1  # it did go through discord.py's nonce counter
    return packet


def test_packets_from_discord_py_xchacha20_send_path_decrypt_to_the_opus_frame() -> None:
    cipher = TransportCipher(MODE_XCHACHA20, KEY)
    for i, frame in enumerate(OPUS):
        data = _discord_py_packet(MODE_XCHACHA20, KEY, frame, seq=100 + i, ts=960 * i, nonce=7 + i)
        packet = parse_rtp(data)
        assert (packet.sequence, packet.timestamp, packet.ssrc) == (100 + i, 960 * i, 0x1234)
        assert nonce_of(packet) == 7 + i
        assert cipher.decrypt(packet) == frame


def test_decrypted_discord_py_opus_decodes_with_libopus() -> None:
    data = _discord_py_packet(MODE_XCHACHA20, KEY, OPUS[1], seq=1, ts=0, nonce=0)
    frame = TransportCipher(MODE_XCHACHA20, KEY).decrypt(parse_rtp(data))
    pcm = discord.opus.Decoder().decode(frame)
    assert len(pcm) == SAMPLES_PER_FRAME * 2 * 2  # stereo int16
    assert max(abs(v) for v in struct.unpack(f"<{len(pcm) // 2}h", pcm)) > 1000


@pytest.mark.parametrize("mode", [MODE_XCHACHA20])
def test_our_encrypt_is_byte_identical_to_discord_py(mode: str) -> None:
    header, ext_body = build_rtp_header(9, 960, 0x1234)
    ours = TransportCipher(mode, KEY).encrypt(header, ext_body, OPUS[0], nonce=41)
    assert ours == _discord_py_packet(mode, KEY, OPUS[0], seq=9, ts=960, nonce=41)


def test_aes_gcm_packet_layout_is_header_ciphertext_then_the_nonce_counter() -> None:
    # Discord's AES-GCM: 12-byte nonce = 4-byte big-endian counter then zeros; AAD = header.
    header, _ = build_rtp_header(3, 4, 5)
    data = TransportCipher(MODE_AES256_GCM, KEY).encrypt(header, b"", OPUS[0], nonce=0x01020304)
    assert data[:12] == header and data[-4:] == bytes([1, 2, 3, 4])
    expected = AESGCM(KEY).encrypt(bytes([1, 2, 3, 4]) + bytes(8), OPUS[0], header)
    assert data[12:-4] == expected


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@pytest.mark.parametrize("csrcs", [(), (11, 22)])
@pytest.mark.parametrize("with_extension", [False, True])
def test_round_trip_with_csrcs_and_header_extension(
    mode: str, csrcs: tuple[int, ...], with_extension: bool
) -> None:
    ext = one_byte_extension([(1, b"\x9e"), (2, b"abcde")]) if with_extension else None
    header, ext_body = build_rtp_header(65535, 0xFFFFFC40, 77, csrcs=csrcs, extension=ext)
    cipher = TransportCipher(mode, KEY)
    data = cipher.encrypt(header, ext_body, OPUS[2], nonce=0xFFFFFFFF)
    packet = parse_rtp(data)
    assert packet.csrcs == csrcs and packet.header == header
    assert cipher.decrypt(packet) == OPUS[2]
    raw = cipher.decrypt_raw(packet)
    assert extension_body(raw, packet) == ext_body
    if with_extension:
        assert parse_one_byte_extension(extension_body(raw, packet))[1] == b"\x9e"


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_the_extension_body_is_encrypted_but_its_header_is_clear(mode: str) -> None:
    ext = audio_level_extension(20)
    header, ext_body = build_rtp_header(1, 2, 3, extension=ext)
    data = TransportCipher(mode, KEY).encrypt(header, ext_body, OPUS[0], nonce=1)
    assert data.startswith(header)
    assert data[len(header) : len(header) + len(ext)] != ext


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_a_wrong_key_is_a_decrypt_error(mode: str) -> None:
    header, _ = build_rtp_header(1, 2, 3)
    data = TransportCipher(mode, KEY).encrypt(header, b"", OPUS[0], nonce=5)
    with pytest.raises(DecryptError, match="authentication failed"):
        TransportCipher(mode, OTHER_KEY).decrypt(parse_rtp(data))


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_any_flipped_bit_is_a_decrypt_error(mode: str) -> None:
    # Header (AAD), ciphertext, tag and nonce suffix are all covered by authentication.
    ext = audio_level_extension(20)
    header, ext_body = build_rtp_header(1, 2, 3, csrcs=(9,), extension=ext)
    cipher = TransportCipher(mode, KEY)
    data = cipher.encrypt(header, ext_body, OPUS[0][:40], nonce=5)
    for byte in range(len(data)):
        corrupt = bytearray(data)
        corrupt[byte] ^= 0x01
        try:
            packet = parse_rtp(bytes(corrupt))
        except MalformedPacket:
            continue  # e.g. the version bits; never reaches decryption
        with pytest.raises(DecryptError):
            cipher.decrypt(packet)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_truncated_packets_raise_malformed_or_decrypt_error(mode: str) -> None:
    header, _ = build_rtp_header(1, 2, 3)
    cipher = TransportCipher(mode, KEY)
    data = cipher.encrypt(header, b"", OPUS[0], nonce=5)
    for size in range(len(data)):
        with pytest.raises((MalformedPacket, DecryptError)):
            cipher.decrypt(parse_rtp(data[:size]))


def test_a_body_too_short_for_tag_and_nonce_says_so() -> None:
    header, _ = build_rtp_header(1, 2, 3)
    with pytest.raises(DecryptError, match="too short"):
        TransportCipher(MODE_AES256_GCM, KEY).decrypt(parse_rtp(header + bytes(19)))


def test_rtcp_is_recognised_before_decryption() -> None:
    sender_report = bytes([0x80, 200]) + struct.pack(">HI", 6, 0x1234) + bytes(20)
    assert is_rtcp(sender_report)
    header, _ = build_rtp_header(1, 2, 3)
    assert not is_rtcp(TransportCipher(MODE_AES256_GCM, KEY).encrypt(header, b"", b"x", 0))


def test_unsupported_modes_are_refused_permanently() -> None:
    with pytest.raises(UnsupportedMode) as info:
        TransportCipher("xsalsa20_poly1305_lite", KEY)
    assert info.value.permanent and isinstance(info.value, VoiceError)


def test_a_secret_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(VoiceError, match="32 bytes"):
        TransportCipher(MODE_AES256_GCM, bytes(16))


def test_the_secret_key_list_from_session_description_is_accepted() -> None:
    cipher = TransportCipher(MODE_XCHACHA20, list(KEY))  # type: ignore[arg-type]
    data = _discord_py_packet(MODE_XCHACHA20, KEY, OPUS[0], seq=1, ts=1, nonce=1)
    assert cipher.decrypt(parse_rtp(data)) == OPUS[0]


def test_the_repr_never_shows_the_key() -> None:
    assert KEY.hex() not in repr(TransportCipher(MODE_AES256_GCM, KEY))
    assert repr(TransportCipher(MODE_XCHACHA20, KEY)) == f"TransportCipher({MODE_XCHACHA20!r})"


def test_choose_mode_prefers_aes_gcm_and_refuses_when_nothing_fits() -> None:
    assert SUPPORTED_MODES[0] == MODE_AES256_GCM
    offered = ["xsalsa20_poly1305", MODE_XCHACHA20, MODE_AES256_GCM]
    assert choose_mode(offered) == MODE_AES256_GCM
    assert choose_mode([MODE_XCHACHA20]) == MODE_XCHACHA20
    with pytest.raises(UnsupportedMode, match="xsalsa20_poly1305"):
        choose_mode(["xsalsa20_poly1305"])


def test_encrypt_refuses_a_nonce_past_32_bits() -> None:
    header, _ = build_rtp_header(1, 2, 3)
    with pytest.raises(ValueError, match="nonce"):
        TransportCipher(MODE_AES256_GCM, KEY).encrypt(header, b"", b"x", 1 << 32)


def test_packet_counters_start_at_zero_and_report_as_a_dict() -> None:
    counters = PacketCounters()
    counters.received += 2
    counters.bad_tag += 1
    expected = {"received": 2, "rtcp": 0, "malformed": 0, "bad_tag": 1, "decrypted": 0}
    assert counters.as_dict() == expected


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(data=st.binary(max_size=80), force_v2=st.booleans())
def test_arbitrary_bytes_raise_only_malformed_or_decrypt_error(
    mode: str, data: bytes, force_v2: bool
) -> None:
    if force_v2 and data:  # most random bytes fail the version check; get past it half the time
        data = bytes([0x80 | data[0] & 0x3F]) + data[1:]
    cipher = TransportCipher(mode, KEY)
    try:
        cipher.decrypt(parse_rtp(data))
    except (MalformedPacket, DecryptError):
        return
    pytest.fail("random bytes must never authenticate")


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(
    ext_words=st.none() | st.integers(0, 3),
    payload=st.binary(max_size=64),
    nonce=st.integers(0, 0xFFFFFFFF),
    key=st.binary(min_size=32, max_size=32),
)
def test_any_packet_we_encrypt_decrypts_to_its_payload(
    mode: str, ext_words: int | None, payload: bytes, nonce: int, key: bytes
) -> None:
    ext = None if ext_words is None else os.urandom(4 * ext_words)
    header, ext_body = build_rtp_header(1, 2, 3, extension=ext)
    cipher = TransportCipher(mode, key)
    packet = parse_rtp(cipher.encrypt(header, ext_body, payload, nonce))
    assert cipher.decrypt(packet) == payload
    assert nonce_of(packet) == nonce


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@given(
    ext_words=st.none() | st.integers(0, 3),
    claimed_words=st.none() | st.integers(0, 40),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=3),
    pad=st.integers(0, 5),
    payload=st.binary(max_size=64),
    cut=st.integers(0, 3),
)
def test_decrypt_datagram_is_decrypt_of_the_parsed_packet(
    mode: str, ext_words: int | None, claimed_words: int | None, csrcs: list[int], pad: int,
    payload: bytes, cut: int,
) -> None:
    # The receiver's fast path decrypts from header offsets alone: same frame, same errors as
    # parse_rtp + decrypt, for padding (valid or not), CSRCs, extension lengths that do or do
    # not fit, and truncated datagrams.
    ext = None if ext_words is None else os.urandom(4 * ext_words)
    header, ext_body = build_rtp_header(1, 2, 3, csrcs=csrcs, extension=ext)
    if claimed_words is not None and ext is not None:
        header = header[:-2] + claimed_words.to_bytes(2, "big")
    plaintext = payload
    if pad:
        header = bytes([header[0] | 0x20]) + header[1:]
        plaintext += bytes(pad - 1) + bytes([pad if cut != 1 else 200])
    cipher = TransportCipher(mode, KEY)
    data = cipher.encrypt(header, ext_body, plaintext, 9)
    if cut == 3:
        data = data[:len(header) + 10]
    packet = parse_rtp(data)
    try:
        expected: bytes | type[Exception] = cipher.decrypt(packet)
    except (MalformedPacket, DecryptError) as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = cipher.decrypt_datagram(
            data, len(packet.header), packet.extension_words, packet.padding)
    except (MalformedPacket, DecryptError) as exc:
        got = type(exc)
    assert got == expected
