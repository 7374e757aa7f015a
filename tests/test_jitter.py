"""The per-SSRC jitter buffer (bot.voice.jitter): order, loss, silence, wrap-around."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.voice.jitter import Frame, JitterBuffer, JitterOutput, Lost, Silence

SPF = 960  # samples per 20 ms frame at 48 kHz


def _payload(seq: int) -> bytes:
    return f"opus-{seq}".encode()


def _packets(first_seq: int, first_ts: int, count: int) -> list[tuple[int, int, bytes]]:
    """Consecutive packets as Discord sends them: seq +1, timestamp +960, both wrapping."""
    return [
        ((first_seq + i) & 0xFFFF, (first_ts + i * SPF) & 0xFFFFFFFF, _payload(first_seq + i))
        for i in range(count)
    ]


def _run(buffer: JitterBuffer, packets: list[tuple[int, int, bytes]]) -> list[JitterOutput]:
    out: list[JitterOutput] = []
    for seq, ts, payload in packets:
        out += buffer.push(seq, ts, payload)
    return out + buffer.drain()


def _samples(outputs: list[JitterOutput]) -> int:
    return sum(SPF if isinstance(o, Frame) else o.samples for o in outputs)


def _frames(outputs: list[JitterOutput]) -> list[bytes]:
    return [o.payload for o in outputs if isinstance(o, Frame)]


def test_in_order_packets_come_out_as_frames_with_their_timestamps() -> None:
    packets = _packets(10, 5000, 6)
    out = _run(JitterBuffer(), packets)
    assert out == [Frame(p, ts) for _, ts, p in packets]


def test_in_order_packets_are_released_at_once_after_the_first_window() -> None:
    buffer = JitterBuffer(window_packets=3)
    packets = _packets(0, 0, 5)
    assert buffer.push(*packets[0]) == []
    assert buffer.push(*packets[1]) == []
    assert len(buffer.push(*packets[2])) == 3  # the window filled: the stream starts
    assert buffer.push(*packets[3]) == [Frame(packets[3][2], packets[3][1])]
    assert buffer.waiting == 0


def test_packets_shuffled_within_the_window_come_out_in_order() -> None:
    rng = random.Random(7)
    packets = _packets(100, 0, 60)
    shuffled: list[tuple[int, int, bytes]] = []
    for i in range(0, len(packets), 3):
        block = packets[i : i + 3]
        rng.shuffle(block)
        shuffled += block
    buffer = JitterBuffer(window_packets=3)
    out = _run(buffer, shuffled)
    assert _frames(out) == [p for _, _, p in packets]
    assert buffer.stats.lost == 0 and buffer.stats.late == 0


def test_a_dropped_packet_becomes_lost_with_the_next_packet_for_fec() -> None:
    packets = _packets(0, 0, 8)
    del packets[4]
    out = _run(JitterBuffer(), packets)
    assert out[4] == Lost(SPF, _payload(5))
    assert out[5] == Frame(_payload(5), 5 * SPF)
    assert _samples(out) == 7 * SPF + SPF  # last_ts - first_ts + one frame


def test_several_dropped_packets_become_one_lost_of_their_total_length() -> None:
    packets = _packets(0, 0, 20)
    kept = packets[:5] + packets[9:]
    buffer = JitterBuffer()
    out = _run(buffer, kept)
    assert Lost(4 * SPF, _payload(9)) in out
    assert buffer.stats.lost == 4
    assert _samples(out) == 19 * SPF + SPF


def test_a_packet_waits_for_a_hole_until_the_window_is_full() -> None:
    buffer = JitterBuffer(window_packets=3)
    packets = _packets(0, 0, 10)
    for p in packets[:4]:
        buffer.push(*p)
    # 4 is missing: 5 and 6 wait for it, 7 fills the window and 4 is declared lost.
    assert buffer.push(*packets[5]) == []
    assert buffer.push(*packets[6]) == []
    out = buffer.push(*packets[7])
    assert out == [Lost(SPF, _payload(5))] + [Frame(p, ts) for _, ts, p in packets[5:8]]
    # 4 turns up now: too late, dropped and counted.
    assert buffer.push(*packets[4]) == []
    assert buffer.stats.late == 1 and buffer.stats.duplicates == 0


def test_sequence_wraparound_at_65535_keeps_the_order() -> None:
    packets = _packets(65533, 0, 8)
    swapped = packets[:2] + [packets[3], packets[2]] + packets[4:]  # 65535 and 0 swap places
    buffer = JitterBuffer()
    out = _run(buffer, swapped)
    assert _frames(out) == [p for _, _, p in packets]
    assert [o.timestamp for o in out if isinstance(o, Frame)] == [i * SPF for i in range(8)]


def test_loss_across_the_sequence_wrap_is_counted_right() -> None:
    packets = _packets(65534, 0, 6)
    del packets[2]  # sequence 0
    buffer = JitterBuffer()
    out = _run(buffer, packets)
    assert Lost(SPF, _payload(65537)) in out
    assert buffer.stats.lost == 1
    assert _samples(out) == 6 * SPF


def test_timestamp_wraparound_keeps_the_timeline_continuous() -> None:
    packets = _packets(7, 0xFFFFFFFF - 2 * SPF, 6)
    del packets[3]
    out = _run(JitterBuffer(), packets)
    assert [type(o) for o in out] == [Frame, Frame, Frame, Lost, Frame, Frame]
    assert _samples(out) == 6 * SPF


def test_duplicates_are_dropped_and_counted() -> None:
    packets = _packets(0, 0, 6)
    buffer = JitterBuffer()
    out = _run(buffer, packets[:4] + [packets[1], packets[3]] + packets[4:] + [packets[5]])
    assert _frames(out) == [p for _, _, p in packets]
    assert buffer.stats.duplicates == 3
    # a duplicate of a packet still waiting in the buffer is caught too
    buffer = JitterBuffer()
    assert buffer.push(*packets[0]) == [] and buffer.push(*packets[0]) == []
    assert buffer.stats.duplicates == 1


def test_a_talk_spurt_gap_becomes_silence_of_exactly_the_timestamp_gap() -> None:
    first = _packets(0, 0, 5)
    # Discord stopped sending for 1.5 s: sequence goes on, timestamp jumps.
    second = _packets(5, 4 * SPF + SPF + 72000, 5)
    out = _run(JitterBuffer(), first + second)
    assert out[5] == Silence(72000)
    assert [type(o) for o in out].count(Silence) == 1
    assert _samples(out) == second[-1][1] - first[0][1] + SPF


def test_a_gap_after_drain_is_bridged_with_silence() -> None:
    buffer = JitterBuffer()
    out = _run(buffer, _packets(0, 0, 2))  # fewer than the window: drain releases them
    assert _frames(out) == [_payload(0), _payload(1)]
    later = buffer.push(2, 2 * SPF + 4800, _payload(2))
    assert later == [Silence(4800), Frame(_payload(2), 2 * SPF + 4800)]


def test_drain_with_force_starts_a_new_timeline() -> None:
    buffer = JitterBuffer()
    _run(buffer, _packets(0, 0, 4))
    assert buffer.drain(force=True) == []
    # a brand-new numbering is not late nor bridged with silence
    out = _run(buffer, _packets(40000, 123456789, 3))
    assert all(isinstance(o, Frame) for o in out) and len(out) == 3


def test_loss_at_a_talk_spurt_boundary_gives_lost_then_silence() -> None:
    packets = _packets(0, 0, 4) + _packets(4, 4 * SPF + 9600, 4)
    del packets[3]  # the last packet before the pause
    out = _run(JitterBuffer(), packets)
    assert out[3:5] == [Lost(SPF, _payload(4)), Silence(9600)]
    assert _samples(out) == packets[-1][1] + SPF


def test_an_absurd_gap_is_clamped_to_the_maximum_and_counted() -> None:
    buffer = JitterBuffer(max_gap_seconds=10.0)
    packets = _packets(0, 0, 3) + _packets(3, 3 * SPF + 48000 * 3600, 3)
    out = _run(buffer, packets)
    assert Silence(480000) in out
    assert buffer.stats.clamped_gaps == 1


def test_a_restarted_sender_is_followed_after_two_consecutive_packets() -> None:
    buffer = JitterBuffer()
    out = _run(buffer, _packets(100, 0, 5))
    restarted = _packets(30000, 5 * SPF, 5)
    for p in restarted:
        out += buffer.push(*p)
    out += buffer.drain()
    assert buffer.stats.stray == 1 and buffer.stats.resyncs == 1
    assert _frames(out) == [p for _, _, p in _packets(100, 0, 5)] + [p for *_, p in restarted[1:]]


def test_a_single_stray_packet_does_not_disturb_the_stream() -> None:
    buffer = JitterBuffer()
    packets = _packets(100, 0, 10)
    out = _run(buffer, packets[:5] + [(20000, 0, b"stray")] + packets[5:])
    assert _frames(out) == [p for _, _, p in packets]
    assert buffer.stats.stray == 1 and buffer.stats.resyncs == 0


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        JitterBuffer(window_packets=0)


@st.composite
def _arrivals(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, bytes]]]:
    """Consecutive packets, some dropped, some duplicated, reordered within blocks."""
    first_seq = draw(st.integers(0, 0xFFFF))
    first_ts = draw(st.integers(0, 0xFFFFFFFF))
    count = draw(st.integers(1, 40))
    packets = _packets(first_seq, first_ts, count)
    keep = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    kept = [p for p, k in zip(packets, keep, strict=True) if k] or packets[:1]
    dups = draw(st.lists(st.sampled_from(kept), max_size=5))
    arrival = kept + dups
    block = draw(st.integers(1, 6))
    shuffled: list[tuple[int, int, bytes]] = []
    rng = random.Random(draw(st.integers(0, 2**32)))
    for i in range(0, len(arrival), block):
        chunk = arrival[i : i + block]
        rng.shuffle(chunk)
        shuffled += chunk
    return first_seq, first_ts, shuffled


@given(_arrivals(), st.integers(1, 5))
def test_any_arrival_pattern_gives_a_timeline_as_long_as_the_released_span(
    arrivals: tuple[int, int, list[tuple[int, int, bytes]]], window: int
) -> None:
    _, _, packets = arrivals
    buffer = JitterBuffer(window_packets=window)
    out = _run(buffer, packets)
    frames = [o for o in out if isinstance(o, Frame)]
    assert frames, "at least one packet is always released"
    span = (frames[-1].timestamp - frames[0].timestamp) % (1 << 32) + SPF
    assert _samples(out) == span
    # released frames are strictly in timeline order and never repeated
    offsets = [(f.timestamp - frames[0].timestamp) % (1 << 32) for f in frames]
    assert offsets == sorted(set(offsets))
    assert buffer.stats.received == len(packets)
    stats = buffer.stats
    assert stats.released + stats.duplicates + stats.late + stats.stray == len(packets)


def _state(jb: JitterBuffer) -> tuple[object, ...]:
    return (jb._next, jb._highest, jb._cursor, jb._probation, tuple(jb._lost_recent),
            dict(jb._pending), jb.stats.as_dict())


# Each step: 0 the next packet, 1 skip one (loss), 2 swap with the next (reorder), 3 repeat the
# last (duplicate), 4 a talk-spurt gap (timestamp jump), 5 a timestamp overlap, 6 one stray
# packet far away, 7 drain (nothing arrived for a while), 8 a restart far away (confirmed).
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
       st.lists(st.integers(0, 8), min_size=1, max_size=120))
def test_push_in_order_is_push_without_the_output_objects(seq0: int, ts0: int,
                                                           steps: list[int]) -> None:
    fast, general = JitterBuffer(), JitterBuffer()
    seq, ts = seq0, ts0
    sent: list[tuple[int, int, bytes]] = []
    packets: list[tuple[int, int, bytes] | None] = []  # None: drain here
    for step in steps:
        if step == 1:
            seq, ts = seq + 1, ts + SPF
        elif step == 4:
            ts += 40 * SPF
        elif step == 5:
            ts -= SPF // 2
        elif step == 8:
            seq += 20000
        if step == 6:
            packets.append(((seq + 20000) & 0xFFFF, ts & 0xFFFFFFFF, b"stray"))
            continue
        if step == 7:
            packets.append(None)
            continue
        packet = ((seq & 0xFFFF), ts & 0xFFFFFFFF, _payload(seq))
        if step == 3 and sent:
            packet = sent[-1]
        sent.append(packet)
        packets.append(packet)
        if step == 2 and len(packets) >= 2 and packets[-2] is not None:
            packets[-2:] = packets[-1:-3:-1]
        if step != 3:
            seq, ts = seq + 1, ts + SPF
    taken = 0
    for item in packets:
        if item is None:
            assert fast.drain() == general.drain()
        else:
            s, t, payload = item
            expected = general.push(s, t, payload)
            if fast.push_in_order(s, t):
                taken += 1
                assert expected == [Frame(payload, t)]
            else:
                assert fast.push(s, t, payload) == expected
        assert _state(fast) == _state(general)
    assert fast.drain(force=True) == general.drain(force=True)
    if set(steps) == {0}:  # in order: all but the first window's packets take the fast step
        assert taken == max(0, len(steps) - fast.window)


def test_push_in_order_takes_the_common_packet_and_nothing_else() -> None:
    jb = JitterBuffer(window_packets=3)
    packets = _packets(65534, 2**32 - 960, 8)
    assert not any(jb.push_in_order(s, t) for s, t, _ in packets[:1])  # position unknown
    for s, t, p in packets[:3]:
        jb.push(s, t, p)
    assert [jb.push_in_order(s, t) for s, t, _ in packets[3:5]] == [True, True]  # wraps
    s, t, _ = packets[6]
    assert not jb.push_in_order(s, t)  # one missing before it
    s, t, _ = packets[5]
    assert not jb.push_in_order(s, t + 960)  # a timestamp gap: Silence is due first
    assert jb.push_in_order(s, t) and jb.stats.released == 6 and jb.stats.received == 6
