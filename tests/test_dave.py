"""DAVE end to end without sockets: a real davey "bot" session and real davey members in one MLS
group run by the loopback Discord's external sender; the bot's frames are decrypted through
:class:`bot.voice.dave.DaveReceiver` exactly as the voice receiver will do per packet.

``WireBot`` below plays discord.py 2.7.1's part (``gateway.py`` received_binary_message and
received_message for ops 21-31, ``voice_state.py`` reinit / transitions), written here so these
tests need neither discord.py's websocket nor the loopback gateway.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import davey
import discord.opus
import numpy as np
import pytest

from bot.errors import VoiceError
from bot.sim.dave_group import (
    PROPOSALS_APPEND,
    PROPOSALS_REVOKE,
    DaveGroup,
    DaveGroupError,
    Delivery,
    ExternalSender,
    LibdaveMember,
    Op,
    SimulatedMember,
    commit_info,
    encode_varint,
    group_id_for,
    proposal_ref,
    proposals_payload,
    split_commit_welcome,
)
from bot.voice.dave import (
    DAVE_MAGIC_MARKER,
    OPUS_SILENCE_FRAME,
    DaveReceiver,
    failure_reason,
)

CHANNEL = 4242_0000_0000_0001
BOT = 9000
ALICE, BOB, CAROL = 101, 102, 103


# --- test-local helpers --------------------------------------------------------------------


class WireBot:
    """The bot's DAVE client as discord.py 2.7.1 drives it, answering the group's frames."""

    def __init__(self, user_id: int = BOT, channel_id: int = CHANNEL) -> None:
        self.user_id = user_id
        self.channel_id = channel_id
        self.session: davey.DaveSession | None = None
        self.protocol_version = 0
        self.pending_transitions: dict[int, int] = {}
        self.received: list[str] = []
        self.corrupt_next_commit = False
        self.downgraded = False
        self.ignore_proposals = False

    def session_description(self, dave_protocol_version: int) -> list[tuple[str, Any]]:
        """Op 4: create the session and send a key package at once (``reinit_dave_session``)."""
        self.protocol_version = dave_protocol_version
        return self._reinit() if dave_protocol_version > 0 else []

    def _reinit(self) -> list[tuple[str, Any]]:
        if self.session is None:
            self.session = davey.DaveSession(self.protocol_version, self.user_id, self.channel_id)
        else:
            self.session.reinit(self.protocol_version, self.user_id, self.channel_id)
        return [("key_package", self.session.get_serialized_key_package())]

    def handle(self, frame: dict[str, Any] | bytes) -> list[tuple[str, Any]]:
        assert self.session is not None
        if isinstance(frame, dict):
            op, d = frame["op"], frame["d"]
            self.received.append(f"op {op}")
            if op == Op.DAVE_PREPARE_TRANSITION:
                self.pending_transitions[d["transition_id"]] = d["protocol_version"]
                if d["protocol_version"] == 0:
                    self.session.set_passthrough_mode(True, 120)
                return [("ready", d["transition_id"])]
            if op == Op.DAVE_EXECUTE_TRANSITION:
                old = self.protocol_version
                self.protocol_version = self.pending_transitions.pop(d["transition_id"])
                if old != self.protocol_version and self.protocol_version == 0:
                    self.downgraded = True
                elif d["transition_id"] > 0 and self.downgraded:
                    self.downgraded = False
                    self.session.set_passthrough_mode(True, 10)
                return []
            if op == Op.DAVE_PREPARE_EPOCH:
                if d["epoch"] != 1:
                    return []
                self.protocol_version = d["protocol_version"]
                return self._reinit()
            raise AssertionError(f"unexpected JSON op {op}")
        op = frame[0]
        self.received.append(f"op {op}")
        if op == Op.MLS_EXTERNAL_SENDER:
            self.session.set_external_sender(frame[1:])
            return []
        if op == Op.MLS_PROPOSALS:
            optype = davey.ProposalsOperationType.append if frame[1] == 0 else (
                davey.ProposalsOperationType.revoke
            )
            result = self.session.process_proposals(optype, frame[2:])
            if result is None or self.ignore_proposals:
                return []
            return [("commit_welcome", result.commit + (result.welcome or b""))]
        if op in (Op.MLS_ANNOUNCE_COMMIT_TRANSITION, Op.MLS_WELCOME):
            (tid,) = struct.unpack_from(">H", frame, 1)
            body = frame[3:]
            if op == Op.MLS_ANNOUNCE_COMMIT_TRANSITION and self.corrupt_next_commit:
                self.corrupt_next_commit = False
                body = body[:-1] + bytes([body[-1] ^ 0xFF])  # a flipped bit in the tag
            try:
                if op == Op.MLS_WELCOME:
                    self.session.process_welcome(body)
                else:
                    self.session.process_commit(body)
            except ValueError:
                return [("invalid", tid), *self._reinit()]
            if tid == 0:
                return []
            self.pending_transitions[tid] = self.protocol_version
            return [("ready", tid)]
        raise AssertionError(f"unexpected binary op {op}")


def deliver(group: DaveGroup, bot: WireBot, deliveries: list[Delivery]) -> None:
    """Run the wire until quiet: frames to the bot, the bot's answers back to the group."""
    queue = list(deliveries)
    while queue:
        user_id, frame = queue.pop(0)
        assert user_id == bot.user_id, "only the bot is on the wire"
        for kind, value in bot.handle(frame):
            if kind == "key_package":
                queue += group.on_key_package(bot.user_id, value)
            elif kind == "commit_welcome":
                queue += group.on_commit_welcome(bot.user_id, value)
            elif kind == "ready":
                queue += group.on_transition_ready(bot.user_id, value)
            elif kind == "invalid":
                queue += group.on_invalid_commit_welcome(bot.user_id, value)


def bot_joins(group: DaveGroup, bot: WireBot) -> None:
    out = group.join(bot.user_id)
    answers = bot.session_description(group.protocol_version)
    deliver(group, bot, out)  # op 25 (the gateway sends it right after op 4)
    for kind, value in answers:
        assert kind == "key_package"
        deliver(group, bot, group.on_key_package(bot.user_id, value))


def member_joins(group: DaveGroup, bot: WireBot | None, member: SimulatedMember) -> None:
    out = group.add_member(member)
    if bot is None:
        assert out == []
    else:
        deliver(group, bot, out)


def receiver_for(bot: WireBot, **kwargs: Any) -> DaveReceiver:
    return DaveReceiver(lambda: bot.session, lambda: bot.protocol_version, **kwargs)


class OpusTalker:
    """Real Opus frames (libopus via discord.py), a different tone per speaker."""

    def __init__(self, hz: float) -> None:
        assert discord.opus._load_default(), "libopus is required"
        self.encoder = discord.opus.Encoder()
        self.hz = hz
        self.t = 0

    def frame(self) -> bytes:
        n = discord.opus.Encoder.SAMPLES_PER_FRAME
        t = (self.t + np.arange(n)) / discord.opus.Encoder.SAMPLING_RATE
        self.t += n
        mono = (np.sin(2 * np.pi * self.hz * t) * 8000).astype("<i2")
        return self.encoder.encode(np.repeat(mono, 2).tobytes(), n)


@pytest.fixture
def group() -> DaveGroup:
    return DaveGroup(CHANNEL)


@pytest.fixture
def bot() -> WireBot:
    return WireBot()


def speak(member: SimulatedMember, talker: OpusTalker, n: int = 3) -> list[tuple[bytes, bytes]]:
    """``n`` (plain, as sent) pairs from one member."""
    out = []
    for _ in range(n):
        plain = talker.frame()
        out.append((plain, member.encrypt_opus(plain)))
    return out


def assert_decrypts(receiver: DaveReceiver, user_id: int, pairs: list[tuple[bytes, bytes]]) -> None:
    for plain, sent in pairs:
        assert sent != plain and sent.endswith(DAVE_MAGIC_MARKER)
        assert receiver.decrypt(user_id, sent) == plain


def assert_leaves_match(
    group: DaveGroup, *members: SimulatedMember, bot: WireBot | None = None
) -> None:
    """Discord's copy of the tree names the same leaves the members' own trees hold."""
    for m in members:
        assert group.leaf_index(m.user_id) == m.session.own_leaf_index
    if bot is not None and bot.session is not None:
        assert group.leaf_index(bot.user_id) == bot.session.own_leaf_index


# --- op 28 split and op 27 payload (pure) ----------------------------------------------------


def _proposals_to(session: davey.DaveSession, group: DaveGroup, proposals: list[bytes]) -> Any:
    body = proposals_payload(PROPOSALS_APPEND, proposals)
    return session.process_proposals(davey.ProposalsOperationType.append, body[1:])


def test_split_commit_welcome_recovers_both_halves_of_a_commit_that_adds_members(
    group: DaveGroup,
) -> None:
    founder = SimulatedMember(ALICE, CHANNEL)
    founder.session.set_external_sender(group.sender.package())
    joiners = [SimulatedMember(u, CHANNEL) for u in (BOB, CAROL)]
    for j in joiners:
        j.session.set_external_sender(group.sender.package())
    adds = [
        group.sender.add_proposal(group.group_id, 0, j.session.get_serialized_key_package())
        for j in joiners
    ]
    result = _proposals_to(founder.session, group, adds)
    assert result.welcome is not None

    commit, welcome = split_commit_welcome(result.commit + result.welcome)

    assert (commit, welcome) == (result.commit, result.welcome)
    info = commit_info(commit)
    assert (info.group_id, info.epoch) == (group_id_for(CHANNEL), 0)
    # davey deserialises strictly: both halves are accepted as they are.
    founder.session.process_commit(commit)
    for j in joiners:
        j.session.process_welcome(welcome)
        assert j.session.epoch == founder.session.epoch == 1


def test_split_commit_welcome_returns_no_welcome_for_a_commit_that_only_removes(
    group: DaveGroup,
) -> None:
    a, b = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, None, a)
    member_joins(group, None, b)
    remove = group.sender.remove_proposal(group.group_id, 1, b.session.own_leaf_index)
    result = _proposals_to(a.session, group, [remove])
    assert result.welcome is None

    commit, welcome = split_commit_welcome(result.commit)

    assert commit == result.commit and welcome is None
    assert commit_info(commit).epoch == 1


def test_a_truncated_or_padded_commit_is_rejected_as_a_dave_group_error(group: DaveGroup) -> None:
    a = SimulatedMember(ALICE, CHANNEL)
    a.session.set_external_sender(group.sender.package())
    b = SimulatedMember(BOB, CHANNEL)
    add = group.sender.add_proposal(group.group_id, 0, b.session.get_serialized_key_package())
    commit = _proposals_to(a.session, group, [add]).commit

    with pytest.raises(DaveGroupError, match="truncated"):
        split_commit_welcome(commit[:-1])
    with pytest.raises(DaveGroupError, match="after the commit"):
        commit_info(commit + b"\x00")
    with pytest.raises(DaveGroupError, match="PublicMessage"):
        split_commit_welcome(b"\x00\x01\x00\x03" + commit[4:])
    assert issubclass(DaveGroupError, VoiceError)


def test_mls_varints_use_one_two_or_four_bytes() -> None:
    assert encode_varint(63) == b"\x3f"
    assert encode_varint(64) == b"\x40\x40"
    assert encode_varint(16383) == b"\x7f\xff"
    assert encode_varint(16384) == b"\x80\x00\x40\x00"
    with pytest.raises(ValueError):
        encode_varint(1 << 30)


def test_proposals_payload_is_an_optype_byte_then_one_vector() -> None:
    assert proposals_payload(PROPOSALS_APPEND, [b"ab", b"c"]) == b"\x00\x03abc"
    assert proposals_payload(PROPOSALS_REVOKE, [b"ab", b"c"]) == b"\x01\x05\x02ab\x01c"
    with pytest.raises(ValueError):
        proposals_payload(2, [])


def test_the_external_sender_package_is_a_p256_key_and_a_basic_credential() -> None:
    package = ExternalSender().package()
    assert package[:3] == b"\x40\x41\x04"  # V(65-byte uncompressed SEC1 point)
    assert package[67:] == b"\x00\x01\x00"  # u16 basic, V(empty identity)
    davey.DaveSession(1, BOT, CHANNEL).set_external_sender(package)  # davey accepts it


def test_a_revoke_naming_our_proposal_ref_is_accepted_and_an_unknown_ref_is_refused(
    group: DaveGroup,
) -> None:
    bot = davey.DaveSession(1, BOT, CHANNEL)
    bot.set_external_sender(group.sender.package())
    joiners = [SimulatedMember(u, CHANNEL) for u in (ALICE, BOB)]
    adds = [
        group.sender.add_proposal(group.group_id, 0, j.session.get_serialized_key_package())
        for j in joiners
    ]
    _proposals_to(bot, group, adds)
    revoke = davey.ProposalsOperationType.revoke

    with pytest.raises(ValueError, match="ProposalNotFound"):
        bot.process_proposals(revoke, proposals_payload(PROPOSALS_REVOKE, [bytes(32)])[1:])
    bot.process_proposals(revoke, proposals_payload(PROPOSALS_REVOKE, [proposal_ref(adds[0])])[1:])


# --- group lifecycles with the bot on the wire ---------------------------------------------


def test_a_bot_that_arrives_first_founds_the_group_and_decrypts_each_member_by_user_id(
    group: DaveGroup, bot: WireBot
) -> None:
    bot_joins(group, bot)
    assert bot.received == ["op 25"] and group.epoch is None  # alone: nothing to commit yet
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)

    member_joins(group, bot, alice)
    member_joins(group, bot, bob)

    # op 27 → the bot commits (op 28) → op 29 back to it → op 23 → op 22; twice.
    assert bot.received[1:] == ["op 27", "op 29", "op 22"] * 2
    assert [committer for committer, _, _ in group.history] == [BOT, BOT]
    assert group.epoch == bot.session.epoch == alice.session.epoch == bob.session.epoch == 2
    assert group.members == [BOT, ALICE, BOB]
    assert_leaves_match(group, alice, bob, bot=bot)
    assert group.pending_transitions == {}
    receiver = receiver_for(bot)
    assert receiver.is_e2ee() and receiver.epoch == 2
    assert receiver.privacy_code() == alice.session.voice_privacy_code
    a_talk, b_talk = OpusTalker(220), OpusTalker(330)
    assert_decrypts(receiver, ALICE, speak(alice, a_talk))
    assert_decrypts(receiver, BOB, speak(bob, b_talk))
    # A frame is only decrypted under the key of the user who sent it.
    assert receiver.decrypt(BOB, alice.encrypt_opus(a_talk.frame())) is None
    assert sum(receiver.stats.values()) == 1


def test_a_bot_joining_an_existing_call_is_welcomed_into_the_members_group(
    group: DaveGroup, bot: WireBot
) -> None:
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, None, alice)
    member_joins(group, None, bob)
    assert group.epoch == 1 and group.members == [ALICE, BOB]

    bot_joins(group, bot)

    assert bot.received == ["op 25", "op 30", "op 22"]
    assert group.epoch == bot.session.epoch == alice.session.epoch == 2
    assert group.history[-1][0] in (ALICE, BOB)
    assert_leaves_match(group, alice, bob, bot=bot)
    receiver = receiver_for(bot)
    assert_decrypts(receiver, ALICE, speak(alice, OpusTalker(200)))
    assert_decrypts(receiver, BOB, speak(bob, OpusTalker(300)))
    assert not receiver.stats


def test_members_joining_and_leaving_mid_stream_lose_no_frames(
    group: DaveGroup, bot: WireBot
) -> None:
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, None, alice)
    bot_joins(group, bot)
    receiver = receiver_for(bot)
    a_talk = OpusTalker(250)
    assert_decrypts(receiver, ALICE, speak(alice, a_talk))
    in_flight = speak(alice, a_talk)  # sent at epoch 2, arriving after the change
    epoch_before = group.epoch

    member_joins(group, bot, bob)
    assert group.epoch == epoch_before + 1 == bot.session.epoch == bob.session.epoch

    assert_decrypts(receiver, ALICE, in_flight)
    assert_decrypts(receiver, ALICE, speak(alice, a_talk))
    assert_decrypts(receiver, BOB, speak(bob, OpusTalker(350)))
    assert_leaves_match(group, alice, bob, bot=bot)

    in_flight = speak(bob, OpusTalker(350))
    received_before = len(bot.received)
    deliver(group, bot, group.leave(ALICE))

    # A Remove: the bot commits, nobody is welcomed.
    assert bot.received[received_before:] == ["op 27", "op 29", "op 22"]
    assert group.members == [BOT, BOB] and ALICE not in bot.session.get_user_ids()
    assert group.epoch == epoch_before + 2 == bob.session.epoch == bot.session.epoch
    assert_leaves_match(group, bob, bot=bot)
    assert_decrypts(receiver, BOB, in_flight)
    assert_decrypts(receiver, BOB, speak(bob, OpusTalker(350)))
    assert not receiver.stats


def test_a_leaf_freed_by_a_removal_is_reused_by_the_next_member(
    group: DaveGroup, bot: WireBot
) -> None:
    bot_joins(group, bot)
    alice, bob, carol = (SimulatedMember(u, CHANNEL) for u in (ALICE, BOB, CAROL))
    member_joins(group, bot, alice)
    member_joins(group, bot, bob)
    deliver(group, bot, group.leave(ALICE))
    member_joins(group, bot, carol)

    assert group.members == [BOT, CAROL, BOB]
    assert_leaves_match(group, bob, carol, bot=bot)
    assert_decrypts(receiver_for(bot), CAROL, speak(carol, OpusTalker(440)))


def test_a_corrupt_commit_makes_the_bot_reset_and_the_server_re_adds_it(
    group: DaveGroup, bot: WireBot
) -> None:
    alice, bob, carol = (SimulatedMember(u, CHANNEL) for u in (ALICE, BOB, CAROL))
    member_joins(group, None, alice)
    member_joins(group, None, bob)
    bot_joins(group, bot)
    receiver = receiver_for(bot)
    bot.corrupt_next_commit = True
    received_before = len(bot.received)

    member_joins(group, bot, carol)

    # op 29 fails → op 31 + new key package → Remove(old leaf), then Add → op 30 → 23 → 22.
    assert bot.received[received_before:] == ["op 27", "op 29", "op 30", "op 22"]
    # The bot committed epoch 3 (adding Carol) but could not apply it; Alice committed its
    # removal (epoch 4) and its re-addition into the freed leaf (epoch 5).
    assert [(who, epoch) for who, epoch, _ in group.history[-3:]] == [
        (BOT, 3),
        (ALICE, 4),
        (ALICE, 5),
    ]
    assert group.members == [ALICE, BOB, BOT, CAROL]
    assert bot.session.ready
    assert bot.session.epoch == group.epoch == alice.session.epoch == carol.session.epoch
    assert_leaves_match(group, alice, bob, carol, bot=bot)
    assert_decrypts(receiver, CAROL, speak(carol, OpusTalker(500)))
    assert_decrypts(receiver, ALICE, speak(alice, OpusTalker(520)))


def test_if_the_bot_never_commits_a_member_commit_is_used_and_the_bot_follows_it(
    group: DaveGroup, bot: WireBot
) -> None:
    bot_joins(group, bot)
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, bot, alice)
    bot.ignore_proposals = True

    deliver(group, bot, group.add_member(bob))
    assert group.awaiting_commit and bob.session.epoch is not None and not bob.session.ready

    deliver(group, bot, group.commit_timeout())

    assert not group.awaiting_commit and group.history[-1][0] == ALICE
    assert group.epoch == bot.session.epoch == bob.session.epoch == 2
    assert_decrypts(receiver_for(bot), BOB, speak(bob, OpusTalker(610)))


def test_a_bot_that_resets_while_proposals_await_its_commit_is_re_added_by_the_members(
    group: DaveGroup, bot: WireBot
) -> None:
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, None, alice)
    bot_joins(group, bot)
    bot.ignore_proposals = True
    deliver(group, bot, group.add_member(bob))
    assert group.awaiting_commit

    # The bot gives up on its state (op 31) and sends a fresh key package, as discord.py does.
    bot.ignore_proposals = False
    out = group.on_invalid_commit_welcome(BOT, 0)
    bot.session.reinit(1, BOT, CHANNEL)
    out += group.on_key_package(BOT, bot.session.get_serialized_key_package())
    deliver(group, bot, out)

    # Alice's commit added Bob without the reset bot; then the bot's leaf was freed and refilled.
    assert [who for who, _, _ in group.history[-3:]] == [ALICE, ALICE, ALICE]
    assert group.members == [BOT, ALICE, BOB]
    assert bot.received[-2:] == ["op 30", "op 22"]
    assert_leaves_match(group, alice, bob, bot=bot)
    assert_decrypts(receiver_for(bot), BOB, speak(bob, OpusTalker(710)))


def test_a_joiner_who_leaves_before_the_commit_is_added_then_removed(
    group: DaveGroup, bot: WireBot
) -> None:
    bot_joins(group, bot)
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, bot, alice)
    bot.ignore_proposals = True
    proposals = group.add_member(bob)
    assert group.leave(BOB) == []  # the round stays open: the bot holds the proposals
    bot.ignore_proposals = False

    deliver(group, bot, proposals)

    assert group.members == [BOT, ALICE] and not group.awaiting_commit
    assert bot.session.epoch == alice.session.epoch == group.epoch == 3  # add, then remove
    assert sorted(bot.session.get_user_ids()) == sorted([str(BOT), str(ALICE)])
    assert_leaves_match(group, alice, bot=bot)


def test_a_late_second_commit_for_the_same_round_is_ignored(
    group: DaveGroup, bot: WireBot
) -> None:
    bot_joins(group, bot)
    alice = SimulatedMember(ALICE, CHANNEL)
    out = group.add_member(alice)
    (uid, proposals), = out
    result = bot.handle(proposals)
    (kind, payload), = result
    first = group.on_commit_welcome(BOT, payload)
    epoch = group.epoch

    assert group.on_commit_welcome(BOT, payload) == []
    assert group.epoch == epoch
    deliver(group, bot, first)
    assert bot.session.ready


def test_the_call_survives_the_bot_leaving(group: DaveGroup, bot: WireBot) -> None:
    bot_joins(group, bot)
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, bot, alice)
    member_joins(group, bot, bob)

    assert group.leave(BOT) == []

    assert group.members == [ALICE, BOB] and group.leaf_index(ALICE) == 1  # leaf 0 is blank
    assert alice.session.epoch == bob.session.epoch == group.epoch == 3
    assert_leaves_match(group, alice, bob)
    plain = OpusTalker(100).frame()
    assert bob.session.decrypt(ALICE, davey.MediaType.audio, alice.encrypt_opus(plain)) == plain


def test_messages_from_someone_not_in_the_call_are_refused(group: DaveGroup) -> None:
    with pytest.raises(DaveGroupError, match="not in the call"):
        group.on_key_package(BOT, b"kp")
    group.join(BOT)
    with pytest.raises(DaveGroupError, match="twice"):
        group.join(BOT)


# --- transitions to protocol version 0 ---------------------------------------------------------


def test_a_downgrade_to_version_0_passes_plaintext_through_during_and_after_the_transition(
    group: DaveGroup, bot: WireBot
) -> None:
    alice = SimulatedMember(ALICE, CHANNEL)
    member_joins(group, None, alice)
    bot_joins(group, bot)
    receiver = receiver_for(bot)
    talk = OpusTalker(300)
    plain = talk.frame()
    assert receiver.decrypt(ALICE, plain) is None  # plaintext refused while E2EE is on
    assert receiver.stats["UnencryptedWhenPassthroughDisabled"] == 1

    prepare = group.downgrade()
    (to, op21), = prepare
    tid = op21["d"]["transition_id"]
    assert to == BOT and op21 == {"op": 21, "d": {"transition_id": tid, "protocol_version": 0}}
    # Between op 21 and op 22: the bot allows passthrough; members may send either kind.
    bot.handle(op21)
    assert bot.protocol_version == 1 and receiver.is_e2ee()
    plain = talk.frame()
    assert receiver.decrypt(ALICE, plain) == plain
    assert_decrypts(receiver, ALICE, speak(alice, talk))

    deliver(group, bot, group.on_transition_ready(BOT, tid))

    assert bot.received[-2:] == ["op 21", "op 22"]
    assert bot.protocol_version == 0 == group.protocol_version == alice.protocol_version
    assert not receiver.is_e2ee() and receiver.privacy_code() is None
    for _ in range(3):
        plain = talk.frame()
        sent = alice.encrypt_opus(plain)
        assert sent == plain and receiver.decrypt(ALICE, sent) == plain
    assert receiver.stats["UnencryptedWhenPassthroughDisabled"] == 1


def test_an_upgrade_back_to_dave_forms_a_new_group_and_encrypts_again(
    group: DaveGroup, bot: WireBot
) -> None:
    alice, bob = SimulatedMember(ALICE, CHANNEL), SimulatedMember(BOB, CHANNEL)
    member_joins(group, None, alice)
    member_joins(group, None, bob)
    bot_joins(group, bot)
    (_, op21), = group.downgrade()
    deliver(group, bot, [(BOT, op21)])
    assert bot.protocol_version == group.protocol_version == 0 and group.epoch is None
    received_before = len(bot.received)

    deliver(group, bot, group.upgrade())

    # The members, re-initialised in process, form the new group first; the bot's new key
    # package (its answer to op 24) then gets it welcomed (op 30 → 23 → 22).
    assert bot.received[received_before:] == ["op 24", "op 25", "op 30", "op 22"]
    assert group.protocol_version == bot.protocol_version == alice.protocol_version == 1
    assert group.epoch == bot.session.epoch == alice.session.epoch == bob.session.epoch == 2
    assert group.members == [ALICE, BOB, BOT]
    assert_leaves_match(group, alice, bob, bot=bot)
    receiver = receiver_for(bot)
    assert receiver.is_e2ee()
    assert_decrypts(receiver, ALICE, speak(alice, OpusTalker(900)))
    assert_decrypts(receiver, BOB, speak(bob, OpusTalker(950)))
    with pytest.raises(DaveGroupError):
        group.upgrade()


def test_a_call_at_version_0_sends_no_mls_at_all() -> None:
    group = DaveGroup(CHANNEL, protocol_version=0)
    bot = WireBot()
    bot_joins(group, bot)
    alice = SimulatedMember(ALICE, CHANNEL)
    member_joins(group, bot, alice)
    assert bot.received == [] and bot.session is None and group.epoch is None
    receiver = receiver_for(bot)
    plain = OpusTalker(200).frame()
    assert alice.encrypt_opus(plain) == plain and receiver.decrypt(ALICE, plain) == plain
    assert not receiver.is_e2ee() and receiver.epoch is None


# --- DaveReceiver failure handling --------------------------------------------------------


def test_frames_before_the_group_is_ready_are_counted_not_raised(bot: WireBot) -> None:
    bot.session_description(1)
    assert bot.session is not None and not bot.session.ready
    receiver = receiver_for(bot)
    stranger = SimulatedMember(ALICE, CHANNEL)

    assert receiver.decrypt(ALICE, b"\xfc" + bytes(40) + DAVE_MAGIC_MARKER) is None
    assert receiver.decrypt(ALICE, stranger.encrypt_opus(b"\xfc\x01\x02")) is None
    assert receiver.decrypt(ALICE, OPUS_SILENCE_FRAME) == OPUS_SILENCE_FRAME
    assert receiver.stats == {"NotReady": 2}
    assert not receiver.is_e2ee()


def test_frames_from_unknown_users_and_garbage_are_counted_by_reason(
    group: DaveGroup, bot: WireBot
) -> None:
    alice = SimulatedMember(ALICE, CHANNEL)
    member_joins(group, None, alice)
    bot_joins(group, bot)
    receiver = receiver_for(bot)
    sent = alice.encrypt_opus(OpusTalker(200).frame())

    assert receiver.decrypt(CAROL, sent) is None
    tampered = sent[:1] + bytes([sent[1] ^ 0x55]) + sent[2:]
    assert receiver.decrypt(ALICE, tampered) is None
    assert receiver.decrypt(ALICE, b"") is None
    assert receiver.decrypt(ALICE, OPUS_SILENCE_FRAME) == OPUS_SILENCE_FRAME

    assert receiver.stats["NoDecryptorForUser"] == 1
    assert sum(receiver.stats.values()) == 3
    assert receiver.decrypt(ALICE, sent) is not None  # the untouched frame still decrypts


def test_a_getter_that_raises_is_counted_too() -> None:
    def broken() -> davey.DaveSession | None:
        raise RuntimeError("connection state gone")

    receiver = DaveReceiver(broken, lambda: 1)
    assert receiver.decrypt(ALICE, b"\xfc\x00") is None
    assert receiver.stats == {"RuntimeError": 1}


def test_failures_are_logged_once_per_reason_per_interval(
    bot: WireBot, caplog: pytest.LogCaptureFixture
) -> None:
    bot.session_description(1)
    now = [1000.0]
    receiver = receiver_for(bot, clock=lambda: now[0], log_interval=30.0)
    caplog.set_level(logging.WARNING, logger="bot.voice.dave")

    for _ in range(5):
        receiver.decrypt(ALICE, b"\xfc\x00\x01")
    now[0] += 29.0
    receiver.decrypt(ALICE, b"\xfc\x00\x01")
    assert len(caplog.records) == 1
    now[0] += 1.5
    receiver.decrypt(ALICE, b"\xfc\x00\x01")

    assert len(caplog.records) == 2 and "7 so far" in caplog.records[1].getMessage()
    assert receiver.stats == {"NotReady": 7}


def test_the_session_is_looked_up_on_every_frame_never_cached(group: DaveGroup) -> None:
    first, second = WireBot(), WireBot()
    alice = SimulatedMember(ALICE, CHANNEL)
    member_joins(group, None, alice)
    bot_joins(group, first)
    current = [first]
    receiver = DaveReceiver(lambda: current[0].session, lambda: current[0].protocol_version)
    assert_decrypts(receiver, ALICE, speak(alice, OpusTalker(200), 1))

    current[0] = second  # discord.py replaced the connection state (reconnect)
    sent = alice.encrypt_opus(b"\xfc\x01")
    assert receiver.decrypt(ALICE, sent) == sent  # no session, version 0: handed on as is
    second.session_description(1)
    assert receiver.decrypt(ALICE, alice.encrypt_opus(b"\xfc\x01")) is None
    assert receiver.stats == {"NotReady": 1} and receiver.epoch is None


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Failed to decrypt: NoDecryptorForUser", "NoDecryptorForUser"),
        (
            "Failed to decrypt: DecryptionFailed(UnencryptedWhenPassthroughDisabled)",
            "UnencryptedWhenPassthroughDisabled",
        ),
        (
            "Failed to decrypt: DecryptionFailed(NoValidCryptorFound { media_type: AUDIO })",
            "NoValidCryptorFound",
        ),
    ],
)
def test_failure_reasons_are_davey_s_innermost_error_name(message: str, reason: str) -> None:
    assert failure_reason(ValueError(message)) == reason


# --- Discord's libdave in the members, davey in the bot (issue 12, item 4) ------------------


@pytest.mark.parametrize("bot_first", [True, False], ids=["bot-commits", "bot-welcomed"])
def test_libdave_members_and_a_davey_bot_agree_on_keys_codes_and_silence_frames(
    group: DaveGroup, bot: WireBot, bot_first: bool
) -> None:
    alice, bob = LibdaveMember(ALICE, CHANNEL), LibdaveMember(BOB, CHANNEL)
    if bot_first:
        bot_joins(group, bot)
        member_joins(group, bot, alice)
        member_joins(group, bot, bob)
        assert [who for who, _, _ in group.history] == [BOT, BOT]
    else:
        member_joins(group, None, alice)  # libdave members found the group (one commits)
        member_joins(group, None, bob)
        bot_joins(group, bot)  # and welcome the davey bot into it
        assert bot.received == ["op 25", "op 30", "op 22"]
    assert bot.session is not None
    assert group.epoch == bot.session.epoch == alice.epoch == bob.epoch == 2
    receiver = receiver_for(bot)
    # The voice privacy code clients show: libdave's displayable code of the epoch authenticator.
    assert alice.privacy_code is not None
    assert receiver.privacy_code() == alice.privacy_code == bob.privacy_code
    assert_decrypts(receiver, ALICE, speak(alice, OpusTalker(220)))
    assert_decrypts(receiver, BOB, speak(bob, OpusTalker(330)))
    # libdave encrypts the Opus silence frame too (davey would send it plain).
    silence = alice.encrypt_opus(OPUS_SILENCE_FRAME)
    assert silence != OPUS_SILENCE_FRAME and silence.endswith(DAVE_MAGIC_MARKER)
    assert receiver.decrypt(ALICE, silence) == OPUS_SILENCE_FRAME

    carol = LibdaveMember(CAROL, CHANNEL)  # joins mid-call: Add, the bot's commit, a welcome
    in_flight = speak(alice, OpusTalker(220))
    member_joins(group, bot, carol)
    assert group.epoch == 3 == bot.session.epoch == carol.epoch == alice.epoch
    assert receiver.privacy_code() == alice.privacy_code == carol.privacy_code
    assert_decrypts(receiver, ALICE, in_flight)  # sent under the old key, still readable
    assert_decrypts(receiver, CAROL, speak(carol, OpusTalker(440)))
    deliver(group, bot, group.leave(BOB))  # a Remove, the bot's commit
    assert group.epoch == 4 == alice.epoch and group.members.count(BOB) == 0
    assert receiver.privacy_code() == alice.privacy_code
    assert_decrypts(receiver, ALICE, speak(alice, OpusTalker(220)))
    assert not receiver.stats
    assert not (alice.failures or bob.failures or carol.failures)
