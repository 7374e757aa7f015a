"""RTP parsing and building, as Discord voice lays packets out (bot.voice.rtp)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.errors import VoiceError
from bot.sim.sender import (
    audio_level_extension,
    build_rtp_header,
    one_byte_extension,
    parse_one_byte_extension,
)
from bot.voice.rtp import (
    DISCORD_OPUS_PAYLOAD_TYPE,
    ONE_BYTE_EXTENSION_PROFILE,
    MalformedPacket,
    common_opus_header,
    extension_body,
    is_rtcp,
    parse_rtp,
    strip_extension_body,
)

# The bytes after the clear header in an _rtpsize packet: ciphertext + tag + nonce; opaque here.
BODY = bytes(range(40))


def test_a_discord_py_style_header_parses_into_its_fields() -> None:
    # discord.py's _get_voice_packet: 0x80, 0x78, >H sequence, >I timestamp, >I ssrc.
    header = bytes([0x80, 0x78]) + struct.pack(">HII", 513, 960 * 7, 0xDEADBEEF)
    packet = parse_rtp(header + BODY)
    assert (packet.version, packet.padding, packet.marker) == (2, False, False)
    assert packet.payload_type == DISCORD_OPUS_PAYLOAD_TYPE
    assert (packet.sequence, packet.timestamp, packet.ssrc) == (513, 6720, 0xDEADBEEF)
    assert packet.csrcs == ()
    assert not packet.has_extension and packet.extension_profile is None
    assert packet.extension_words == 0
    assert packet.header == header and packet.body == BODY


def test_build_then_parse_round_trips_csrcs_marker_and_extension_header() -> None:
    ext = audio_level_extension(30)
    header, ext_body = build_rtp_header(
        65535, 0xFFFFFFFF, 42, marker=True, csrcs=(1, 2, 0xFFFFFFFF), extension=ext
    )
    assert ext_body == ext
    # The clear header: 12 fixed bytes, three CSRCs, and the 4-byte BE DE length header only.
    assert len(header) == 12 + 12 + 4
    assert header[-4:] == bytes([0xBE, 0xDE, 0x00, 0x01])
    packet = parse_rtp(header + BODY)
    assert packet.marker and packet.has_extension
    assert (packet.sequence, packet.timestamp, packet.ssrc) == (65535, 0xFFFFFFFF, 42)
    assert packet.csrcs == (1, 2, 0xFFFFFFFF)
    assert packet.extension_profile == ONE_BYTE_EXTENSION_PROFILE
    assert packet.extension_words == 1
    assert packet.header == header
    assert packet.body == BODY  # the extension body is not part of the clear header


def test_build_without_extension_is_the_exact_discord_py_header() -> None:
    header, ext_body = build_rtp_header(1, 2, 3)
    assert header == bytes([0x80, 0x78]) + struct.pack(">HII", 1, 2, 3)
    assert ext_body == b""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (bytes([0x80, 0x78]) + bytes(9), "too short"),
        (bytes([0x40, 0x78]) + bytes(20), "version 1"),
        (bytes([0x00, 0x02]) + bytes(72), "version 0"),  # an IP discovery reply is not RTP
        (bytes([0x83, 0x78]) + bytes(10 + 8), "CSRC list (3)"),
        (bytes([0x90, 0x78]) + bytes(10 + 3), "extension header"),
        (bytes([0x91, 0x78]) + bytes(10 + 4 + 3), "extension header"),
    ],
)
def test_malformed_datagrams_raise_malformed_packet_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_rtp(data)


def test_malformed_packet_is_a_voice_error_so_receivers_catch_one_family() -> None:
    assert issubclass(MalformedPacket, VoiceError)


def test_a_header_with_an_extension_header_and_no_body_is_still_a_packet() -> None:
    # The extension length is checked only after decryption: its body is encrypted.
    header, _ = build_rtp_header(5, 6, 7, extension=bytes(8))
    packet = parse_rtp(header)
    assert packet.extension_words == 2 and packet.body == b""


@pytest.mark.parametrize("packet_type", [200, 201, 202, 203, 204])
def test_rtcp_reports_on_the_voice_socket_are_recognised(packet_type: int) -> None:
    receiver_report = bytes([0x81, packet_type]) + struct.pack(">HI", 7, 1234) + bytes(24)
    assert is_rtcp(receiver_report)


@pytest.mark.parametrize("marker", [False, True])
def test_discord_voice_rtp_is_not_mistaken_for_rtcp(marker: bool) -> None:
    header, _ = build_rtp_header(200, 201, 202, marker=marker)
    assert not is_rtcp(header + BODY)
    assert not is_rtcp(b"\x81")
    assert not is_rtcp(bytes([0x00, 200]) + bytes(10))  # wrong version


def test_strip_extension_body_drops_exactly_the_extension_words() -> None:
    ext = one_byte_extension([(1, b"\x9e"), (3, b"abcdef")])
    assert len(ext) == 12
    header, _ = build_rtp_header(1, 1, 1, extension=ext)
    packet = parse_rtp(header + BODY)
    plaintext = ext + b"OPUS FRAME"
    assert strip_extension_body(plaintext, packet) == b"OPUS FRAME"
    assert extension_body(plaintext, packet) == ext


def test_strip_extension_body_without_extension_returns_the_same_bytes() -> None:
    packet = parse_rtp(build_rtp_header(1, 1, 1)[0] + BODY)
    plaintext = b"opus"
    assert strip_extension_body(plaintext, packet) is plaintext


def test_an_extension_longer_than_the_decrypted_payload_is_malformed() -> None:
    header, _ = build_rtp_header(1, 1, 1, extension=bytes(8))
    packet = parse_rtp(header + BODY)
    with pytest.raises(MalformedPacket, match="extension body"):
        strip_extension_body(bytes(7), packet)


def test_rtp_padding_is_removed_after_the_extension() -> None:
    header, _ = build_rtp_header(1, 1, 1, extension=bytes(4))
    padded = bytes([header[0] | 0x20]) + header[1:]
    packet = parse_rtp(padded + BODY)
    assert packet.padding
    assert strip_extension_body(bytes(4) + b"opus" + b"\x00\x00\x03", packet) == b"opus"
    with pytest.raises(MalformedPacket, match="padding"):
        strip_extension_body(bytes(4) + b"op\x00", packet)
    with pytest.raises(MalformedPacket, match="padding"):
        strip_extension_body(bytes(4) + b"\x09", packet)


def test_audio_level_extension_is_discords_one_byte_element_padded_to_a_word() -> None:
    body = audio_level_extension(30)
    # id 1, length-1 = 0, then V bit + 30, then two padding bytes.
    assert body == bytes([0x10, 0x80 | 30, 0, 0])
    assert parse_one_byte_extension(body) == {1: bytes([0x80 | 30])}
    assert audio_level_extension(127, voice=False) == bytes([0x10, 127, 0, 0])


def test_one_byte_extension_round_trips_several_elements() -> None:
    elements = {1: b"\x81", 5: b"0123456789abcdef", 14: b"xy"}
    body = one_byte_extension(elements.items())
    assert len(body) % 4 == 0
    assert parse_one_byte_extension(body) == elements


def test_one_byte_extension_rejects_what_the_form_cannot_carry() -> None:
    with pytest.raises(ValueError, match="id"):
        one_byte_extension([(15, b"x")])
    with pytest.raises(ValueError, match="1..16"):
        one_byte_extension([(1, bytes(17))])
    with pytest.raises(ValueError, match="1..16"):
        one_byte_extension([(1, b"")])
    with pytest.raises(MalformedPacket):
        parse_one_byte_extension(bytes([0x13, 1, 2]))


def test_build_rejects_values_that_do_not_fit_the_header() -> None:
    with pytest.raises(ValueError, match="sequence"):
        build_rtp_header(65536, 0, 0)
    with pytest.raises(ValueError, match="32 bits"):
        build_rtp_header(0, 1 << 32, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_rtp_header(0, 0, 0, extension=b"abc")
    with pytest.raises(ValueError, match="15 CSRCs"):
        build_rtp_header(0, 0, 0, csrcs=range(16))


@given(st.binary(max_size=96))
def test_parse_rtp_on_arbitrary_bytes_returns_a_packet_or_raises_malformed(data: bytes) -> None:
    try:
        packet = parse_rtp(data)
    except MalformedPacket:
        return
    assert packet.header + packet.body == data
    assert packet.version == 2


@given(
    seq=st.integers(0, 0xFFFF),
    ts=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    marker=st.booleans(),
    words=st.none() | st.integers(0, 4),
)
def test_any_built_header_parses_back_to_the_same_fields(
    seq: int, ts: int, ssrc: int, csrcs: list[int], marker: bool, words: int | None
) -> None:
    ext = None if words is None else bytes(4 * words)
    header, _ = build_rtp_header(seq, ts, ssrc, marker=marker, csrcs=csrcs, extension=ext)
    packet = parse_rtp(header + BODY)
    assert (packet.sequence, packet.timestamp, packet.ssrc) == (seq, ts, ssrc)
    assert packet.csrcs == tuple(csrcs) and packet.marker == marker
    assert packet.extension_words == (words or 0)
    assert packet.has_extension == (words is not None)
    assert packet.header == header


@given(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.booleans(), st.booleans(), st.sampled_from([DISCORD_OPUS_PAYLOAD_TYPE, 96]),
       st.lists(st.integers(0, 2**32 - 1), max_size=2), st.booleans())
def test_the_common_header_read_agrees_with_the_full_parse_or_declines(
    seq: int, ts: int, ssrc: int, with_extension: bool, marker: bool, payload_type: int,
    csrcs: list[int], padding: bool,
) -> None:
    header, ext_body = build_rtp_header(
        seq, ts, ssrc, payload_type=payload_type, marker=marker, csrcs=csrcs,
        extension=audio_level_extension(42) if with_extension else None)
    if padding:
        header = bytes([header[0] | 0x20]) + header[1:]
    data = header + ext_body + BODY
    common = common_opus_header(data)
    uncommon = marker or padding or bool(csrcs) or payload_type != DISCORD_OPUS_PAYLOAD_TYPE
    if uncommon:
        assert common is None  # left to parse_rtp, which sees every field
        return
    packet = parse_rtp(data)
    assert common == (packet.sequence, packet.timestamp, packet.ssrc, len(packet.header),
                      packet.extension_words)
