"""SSRC <-> user mapping and packets waiting for it (bot.voice.speakers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.voice.speakers import MAX_SSRCS_PER_USER, PendingPackets, SpeakerMap

ALICE = 111111111111111111
BOB = 222222222222222222


def test_an_ssrc_is_unknown_until_op_5_names_its_user() -> None:
    speakers = SpeakerMap()
    speakers.on_client_connect([ALICE])
    assert speakers.user_for(1001) is None
    assert speakers.on_speaking(ALICE, 1001) is None
    assert speakers.user_for(1001) == ALICE
    assert speakers.ssrcs_for(ALICE) == {1001}
    assert ALICE in speakers.members


def test_discord_string_ids_are_accepted_as_ints() -> None:
    speakers = SpeakerMap()
    speakers.on_speaking(str(ALICE), 1001)  # type: ignore[arg-type]
    assert speakers.user_for(1001) == ALICE


def test_a_member_who_rejoins_with_a_new_ssrc_maps_to_the_same_user() -> None:
    speakers = SpeakerMap()
    speakers.on_speaking(ALICE, 1001)
    speakers.on_speaking(ALICE, 2002)
    assert speakers.user_for(1001) == ALICE and speakers.user_for(2002) == ALICE
    assert speakers.ssrcs_for(ALICE) == {1001, 2002}


def test_repeated_speaking_events_change_nothing() -> None:
    speakers = SpeakerMap()
    speakers.on_speaking(ALICE, 1001)
    assert speakers.on_speaking(ALICE, 1001) is None
    assert speakers.ssrcs_for(ALICE) == {1001}


def test_a_disconnect_forgets_the_users_ssrcs_and_returns_them() -> None:
    speakers = SpeakerMap()
    speakers.on_client_connect([ALICE, BOB])
    speakers.on_speaking(ALICE, 1001)
    speakers.on_speaking(ALICE, 2002)
    speakers.on_speaking(BOB, 3003)
    assert speakers.on_client_disconnect(ALICE) == {1001, 2002}
    assert speakers.user_for(1001) is None and speakers.user_for(2002) is None
    assert speakers.ssrcs_for(ALICE) == set()
    assert speakers.user_for(3003) == BOB
    assert speakers.members == frozenset({BOB})
    assert speakers.on_client_disconnect(ALICE) == set()  # twice is harmless


def test_an_ssrc_reassigned_to_another_user_moves_and_names_the_previous_owner() -> None:
    speakers = SpeakerMap()
    speakers.on_speaking(ALICE, 1001)
    assert speakers.on_speaking(BOB, 1001) == ALICE
    assert speakers.user_for(1001) == BOB
    assert speakers.ssrcs_for(ALICE) == set()
    assert speakers.ssrcs_for(BOB) == {1001}


def test_ssrcs_for_returns_a_copy() -> None:
    speakers = SpeakerMap()
    speakers.on_speaking(ALICE, 1001)
    speakers.ssrcs_for(ALICE).add(9)
    assert speakers.ssrcs_for(ALICE) == {1001}


def test_a_user_keeps_only_the_most_recent_ssrcs() -> None:
    speakers = SpeakerMap()
    for ssrc in range(MAX_SSRCS_PER_USER + 2):
        speakers.on_speaking(ALICE, ssrc)
    assert speakers.ssrcs_for(ALICE) == set(range(2, MAX_SSRCS_PER_USER + 2))
    assert speakers.user_for(0) is None and speakers.user_for(1) is None


@given(
    st.lists(
        st.tuples(st.sampled_from(["speak", "leave"]), st.integers(1, 4), st.integers(1, 6)),
        max_size=40,
    )
)
def test_the_two_directions_of_the_map_always_agree(events: list[tuple[str, int, int]]) -> None:
    speakers = SpeakerMap()
    for kind, user, ssrc in events:
        if kind == "speak":
            speakers.on_speaking(user, ssrc)
        else:
            speakers.on_client_disconnect(user)
    for user in range(1, 5):
        for ssrc in speakers.ssrcs_for(user):
            assert speakers.user_for(ssrc) == user
    for ssrc in range(1, 7):
        owner = speakers.user_for(ssrc)
        if owner is not None:
            assert ssrc in speakers.ssrcs_for(owner)


def test_pending_packets_are_released_in_arrival_order() -> None:
    pending: PendingPackets[bytes] = PendingPackets()
    pending.add(1001, b"a", now=0.0)
    pending.add(2002, b"x", now=0.01)
    pending.add(1001, b"b", now=0.02)
    assert len(pending) == 3 and 1001 in pending
    assert pending.release(1001) == [b"a", b"b"]
    assert pending.release(1001) == []
    assert 1001 not in pending and len(pending) == 1


def test_past_the_per_ssrc_bound_the_oldest_packet_is_dropped_and_counted() -> None:
    pending: PendingPackets[int] = PendingPackets(max_per_ssrc=3)
    for i in range(5):
        pending.add(7, i, now=float(i) / 100)
    assert pending.dropped == 2
    assert pending.release(7) == [2, 3, 4]


def test_past_the_ssrc_bound_the_ssrc_with_the_oldest_packet_is_dropped() -> None:
    pending: PendingPackets[str] = PendingPackets(max_ssrcs=2)
    pending.add(1, "old", now=0.0)
    pending.add(2, "mid", now=0.5)
    pending.add(1, "newer", now=0.6)
    pending.add(3, "new", now=0.7)
    assert 1 not in pending and pending.dropped == 2
    assert pending.release(2) == ["mid"] and pending.release(3) == ["new"]


def test_expire_drops_packets_older_than_max_age_and_counts_them() -> None:
    pending: PendingPackets[str] = PendingPackets(max_age=2.0)
    pending.add(1, "a", now=10.0)
    pending.add(1, "b", now=11.0)
    pending.add(2, "c", now=10.5)
    assert pending.expire(now=12.0) == 0
    assert pending.expire(now=12.75) == 2
    assert pending.dropped == 2
    assert 2 not in pending
    assert pending.release(1) == ["b"]


def test_discard_drops_what_a_departed_user_left_behind() -> None:
    pending: PendingPackets[str] = PendingPackets()
    pending.add(1, "a", now=0.0)
    pending.add(1, "b", now=0.0)
    assert pending.discard(1) == 2 and pending.dropped == 2
    assert pending.discard(1) == 0


def test_discard_all_drops_and_counts_every_ssrcs_packets_and_the_count_keeps_growing() -> None:
    pending: PendingPackets[str] = PendingPackets()
    pending.add(1, "a", now=0.0)
    pending.add(2, "b", now=0.0)
    pending.discard(2)
    assert pending.discard_all() == 1 and pending.dropped == 2 and len(pending) == 0
    pending.add(3, "c", now=1.0)  # still usable afterwards (a new voice session)
    assert pending.discard_all() == 1 and pending.dropped == 3


def test_pending_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PendingPackets(max_per_ssrc=0)
    with pytest.raises(ValueError):
        PendingPackets(max_age=0)


@given(
    st.lists(st.tuples(st.integers(0, 9), st.floats(0, 0.01)), max_size=200),
    st.integers(1, 5),
    st.integers(1, 4),
)
def test_pending_never_holds_more_than_its_bounds_and_loses_nothing_uncounted(
    adds: list[tuple[int, float]], per_ssrc: int, ssrcs: int
) -> None:
    pending: PendingPackets[int] = PendingPackets(max_per_ssrc=per_ssrc, max_ssrcs=ssrcs)
    now = 0.0
    for i, (ssrc, step) in enumerate(adds):
        now += step
        pending.add(ssrc, i, now)
        assert len(pending) <= per_ssrc * ssrcs
    held = sum(len(pending.release(s)) for s in range(10))
    assert held + pending.dropped == len(adds)
