"""The loopback Discord's side of DAVE: the voice server as MLS *external sender*.

Discord's voice server never joins a call's MLS group. It owns a P-256 signing key (the external
sender, announced in op 25), turns joins and leaves into signed Add / Remove proposals (op 27),
takes the first commit a member sends back (op 28), relays that commit to the members already in
the group (op 29) and the welcome to the members it adds (op 30), each tagged with a transition
id, and tells everyone to switch keys (op 22) once every recipient said it is ready (op 23). This
module is that bookkeeping as a state machine with no sockets and no timers: the loopback voice
gateway (``bot/sim/discord/voice.py``) feeds it what the bot sends and delivers what it returns.

Call members other than the bot are :class:`SimulatedMember` s: real ``davey.DaveSession`` s in
this process that act as real clients would, so their part of each exchange happens inside the
call that caused it. Only wire clients (the bot) receive frames.

Wiring for the voice gateway (every method returns ``list[(user_id, frame)]`` to deliver in
order; ``frame`` is a JSON op ``dict`` to send as text, or ``bytes`` = ``u8 opcode + payload`` to
send as a binary message after the transport's ``>H`` sequence number)::

    bot sends / event                     call                                   frames out
    ------------------------------------  -------------------------------------  ---------------
    after op 4 SESSION_DESCRIPTION        group.join(user_id)                    op 25 to the bot
      (with dave_protocol_version =
       group.protocol_version)
    op 26 key package (binary)            group.on_key_package(uid, payload)     op 27 / 29 / 30
    op 28 commit [+ welcome] (binary)     group.on_commit_welcome(uid, payload)  op 29, op 30, 22
    op 23 {transition_id}                 group.on_transition_ready(uid, tid)    op 22 (all ready)
    op 31 {transition_id}                 group.on_invalid_commit_welcome(uid,   (then the bot's new
                                            tid)                                   op 26 re-adds it)
    websocket closed / member left        group.leave(uid)                       op 27 (Remove) ...
    a simulated member joins / leaves     group.add_member(m) / group.leave(uid) op 27 / 29 / 30
    the bot never answers op 27           group.commit_timeout()                 a member commits
    DAVE switched off for the call        group.downgrade()                      op 21 {tid, 0}
                                                                                   then 22 after 23s
    DAVE switched back on                 group.upgrade()                        op 24 {epoch 1},
                                                                                   op 25; then as
                                                                                   on joining

Sequence when the bot joins a call whose members already share a group: ``join`` → op 25;
bot's op 26 → ``on_key_package``: the members (in process) receive an Add proposal, one commits,
all process it → op 30 (welcome, transition id *t*) to the bot; bot's op 23 *t* → op 22 *t*.
When the bot arrives first, it is the committer: a member's ``add_member`` → op 27 (Add, epoch
0) to the bot; bot's op 28 → op 29 *t* to the bot (the member processes the welcome in
process); bot's op 23 *t* → op 22 *t*. While the bot is in the group it is the preferred
committer (as on Discord, whoever commits first wins; in-process members would always win, so
they wait and their commit is only the fallback for :meth:`DaveGroup.commit_timeout`).

A client message that cannot be accepted (malformed op 28, a key package from a member already
in the group, an unknown user) raises :class:`DaveGroupError`; the gateway should close that
client's voice connection, as Discord does. Nothing here times out: the gateway owns the
clocks and calls :meth:`DaveGroup.commit_timeout` when the bot is slow to commit. A wire client
that never sends op 23 holds its transition open until it leaves.

Facts this relies on (Discord's DAVE protocol, https://daveprotocol.com, and RFC 9420):
ciphersuite 2 (P-256, SHA-256); group id = channel id as 8 bytes big-endian; proposals are
PublicMessages from sender type external, index 0, signed over FramedContentTBS with no group
context and carrying no membership tag; the op 28 payload is ``MLSMessage commit || Welcome``
with no separator, so it must be split by parsing the commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeAlias

import davey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bot.errors import VoiceError

try:  # Discord's libdave (the dave.py binding): only simulated members use it ("sim" extra)
    import dave as libdave
except ImportError:  # pragma: no cover - depends on the install
    libdave = None  # type: ignore[assignment]

_log = logging.getLogger(__name__)

#: The DAVE protocol version this fake speaks (davey 0.1.7 supports only version 1).
DAVE_PROTOCOL_VERSION = 1

#: RFC 9420 §6: ProtocolVersion mls10 and the wire formats used here.
MLS_VERSION_10 = 1
WIRE_FORMAT_PUBLIC_MESSAGE = 1
#: RFC 9420 §6: ContentType values.
CONTENT_TYPE_PROPOSAL = 2
CONTENT_TYPE_COMMIT = 3
#: RFC 9420 §12.1: ProposalType add / remove.
PROPOSAL_TYPE_ADD = 1
PROPOSAL_TYPE_REMOVE = 3
#: RFC 9420 §5.3: CredentialType basic / x509.
CREDENTIAL_BASIC = 1
CREDENTIAL_X509 = 2
#: RFC 9420 §7.2: LeafNodeSource values.
LEAF_SOURCE_KEY_PACKAGE = 1
LEAF_SOURCE_UPDATE = 2
LEAF_SOURCE_COMMIT = 3
#: RFC 9420 §5.1.2: the prefix of every SignWithLabel / RefHash label.
MLS_LABEL_PREFIX = b"MLS 1.0 "
#: Op 27 ``u8 operation_type`` (daveprotocol.com, dave_mls_proposals).
PROPOSALS_APPEND = 0
PROPOSALS_REVOKE = 1
#: Transition ids are u16 on the wire (op 29/30 ``>H``); 0 means "execute at once".
MAX_TRANSITION_ID = 0xFFFF


class Op(IntEnum):
    """Voice gateway opcodes of the DAVE handshake (daveprotocol.com, discord.py gateway.py)."""

    DAVE_PREPARE_TRANSITION = 21
    DAVE_EXECUTE_TRANSITION = 22
    DAVE_TRANSITION_READY = 23
    DAVE_PREPARE_EPOCH = 24
    MLS_EXTERNAL_SENDER = 25
    MLS_KEY_PACKAGE = 26
    MLS_PROPOSALS = 27
    MLS_COMMIT_WELCOME = 28
    MLS_ANNOUNCE_COMMIT_TRANSITION = 29
    MLS_WELCOME = 30
    MLS_INVALID_COMMIT_WELCOME = 31


class SenderType(IntEnum):
    """RFC 9420 §6 SenderType."""

    MEMBER = 1
    EXTERNAL = 2
    NEW_MEMBER_PROPOSAL = 3
    NEW_MEMBER_COMMIT = 4


#: A frame to deliver: a JSON op dict, or ``u8 opcode + payload`` for a binary message.
Frame: TypeAlias = dict[str, Any] | bytes
Delivery: TypeAlias = tuple[int, Frame]


class DaveGroupError(VoiceError):
    """A client sent the loopback Discord an MLS message it cannot accept (malformed, unknown)."""


# --- MLS encoding (RFC 9420 §2.1.2 variable-length integers, big-endian fixed ints) ---------


def encode_varint(n: int) -> bytes:
    """MLS variable-length integer: 1, 2 or 4 bytes, the top two bits giving the length."""
    if n < 0:
        raise ValueError("negative length")
    if n < 1 << 6:
        return bytes([n])
    if n < 1 << 14:
        return struct.pack(">H", n | 0x4000)
    if n < 1 << 30:
        return struct.pack(">I", n | 0x8000_0000)
    raise ValueError(f"length {n} does not fit an MLS varint")


def opaque(data: bytes) -> bytes:
    """``opaque data<V>``: a varint length then the bytes."""
    return encode_varint(len(data)) + data


class _Reader:
    """A cursor over MLS bytes that raises :class:`DaveGroupError` on truncation."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def take(self, n: int) -> bytes:
        end = self.off + n
        if end > len(self.data):
            raise DaveGroupError(f"MLS message truncated at byte {self.off} (wanted {n} more)")
        out = self.data[self.off : end]
        self.off = end
        return out

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def varint(self) -> int:
        first = self.uint(1)
        prefix = first >> 6
        if prefix == 3:
            raise DaveGroupError("invalid MLS varint prefix 0b11")
        value = first & 0x3F
        for _ in range((1 << prefix) - 1):
            value = (value << 8) | self.uint(1)
        return value

    def opaque(self) -> bytes:
        return self.take(self.varint())


# --- op 28: split commit || welcome ------------------------------------------------------


@dataclass(frozen=True)
class CommitInfo:
    """What the loopback Discord reads from a commit's clear framing."""

    group_id: bytes
    epoch: int
    sender_type: int
    sender_index: int | None


def _skip_leaf_node(r: _Reader) -> None:
    r.opaque()  # encryption_key
    r.opaque()  # signature_key
    credential_type = r.uint(2)
    if credential_type not in (CREDENTIAL_BASIC, CREDENTIAL_X509):
        raise DaveGroupError(f"unknown credential type {credential_type}")
    r.opaque()  # basic: identity<V>; x509: certificates<V> (a vector, skipped whole)
    for _ in range(5):  # Capabilities: versions, cipher_suites, extensions, proposals, credentials
        r.opaque()
    source = r.uint(1)
    if source == LEAF_SOURCE_KEY_PACKAGE:
        r.take(16)  # Lifetime: not_before, not_after (u64 each)
    elif source == LEAF_SOURCE_COMMIT:
        r.opaque()  # parent_hash
    elif source != LEAF_SOURCE_UPDATE:
        raise DaveGroupError(f"unknown leaf node source {source}")
    r.opaque()  # extensions
    r.opaque()  # signature


def _read_commit(r: _Reader) -> CommitInfo:
    version = r.uint(2)
    wire_format = r.uint(2)
    if version != MLS_VERSION_10 or wire_format != WIRE_FORMAT_PUBLIC_MESSAGE:
        raise DaveGroupError(
            f"commit is not an MLS 1.0 PublicMessage (version {version}, wire format {wire_format})"
        )
    group_id = r.opaque()
    epoch = r.uint(8)
    sender_type = r.uint(1)
    sender_index: int | None = None
    if sender_type in (SenderType.MEMBER, SenderType.EXTERNAL):
        sender_index = r.uint(4)
    elif sender_type not in (SenderType.NEW_MEMBER_PROPOSAL, SenderType.NEW_MEMBER_COMMIT):
        raise DaveGroupError(f"unknown sender type {sender_type}")
    r.opaque()  # authenticated_data
    content_type = r.uint(1)
    if content_type != CONTENT_TYPE_COMMIT:
        raise DaveGroupError(f"expected a commit, got content type {content_type}")
    r.opaque()  # proposals<V> (ProposalOrRef vector)
    has_path = r.uint(1)
    if has_path == 1:
        _skip_leaf_node(r)
        r.opaque()  # UpdatePathNode nodes<V>
    elif has_path != 0:
        raise DaveGroupError(f"invalid optional<UpdatePath> flag {has_path}")
    r.opaque()  # signature
    r.opaque()  # confirmation_tag
    if sender_type == SenderType.MEMBER:
        r.opaque()  # membership_tag
    return CommitInfo(group_id, epoch, sender_type, sender_index)


def split_commit_welcome(data: bytes) -> tuple[bytes, bytes | None]:
    """Split an op 28 payload into the commit MLSMessage and the bare Welcome (or None).

    davey deserialises strictly, so the boundary must be exact: the commit is parsed field by
    field (RFC 9420 §6, §12.4, §7.2) and whatever follows it is the welcome.
    """
    r = _Reader(data)
    _read_commit(r)
    commit, rest = data[: r.off], data[r.off :]
    return commit, (rest or None)


def commit_info(commit: bytes) -> CommitInfo:
    """The clear framing of a commit MLSMessage (group, epoch, sender); rejects trailing bytes."""
    r = _Reader(commit)
    info = _read_commit(r)
    if r.off != len(commit):
        raise DaveGroupError(f"{len(commit) - r.off} bytes after the commit")
    return info


def proposals_payload(optype: int, proposals: Iterable[bytes]) -> bytes:
    """The op 27 body: ``u8 optype`` then one ``<V>`` vector.

    For append (0) each item is a proposal MLSMessage (self-delimiting); for revoke (1) each item
    is a ProposalRef and is encoded as ``opaque<V>``.
    """
    if optype == PROPOSALS_APPEND:
        body = b"".join(proposals)
    elif optype == PROPOSALS_REVOKE:
        body = b"".join(opaque(ref) for ref in proposals)
    else:
        raise ValueError(f"unknown proposals operation type {optype}")
    return bytes([optype]) + opaque(body)


def group_id_for(channel_id: int) -> bytes:
    """DAVE's MLS group id: the channel id as 8 bytes big-endian."""
    return channel_id.to_bytes(8, "big")


# --- the external sender ---------------------------------------------------------------


class ExternalSender:
    """The voice server's P-256 signing identity and the messages it signs."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self._key = private_key or ec.generate_private_key(ec.SECP256R1())
        #: Uncompressed SEC1 point (65 bytes), the form MLS ciphersuite 2 uses for keys.
        self.public_key = self._key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )
        #: Basic credential identity; Discord's is not documented and an empty one is accepted.
        self.identity = b""

    def package(self) -> bytes:
        """The op 25 payload: ExternalSender = ``signature_key<V> || Credential``."""
        return opaque(self.public_key) + struct.pack(">H", CREDENTIAL_BASIC) + opaque(self.identity)

    def _sign_with_label(self, label: bytes, content: bytes) -> bytes:
        # RFC 9420 §5.1.2 SignWithLabel: sign SignContent = label<V> || content<V>.
        sign_content = opaque(MLS_LABEL_PREFIX + label) + opaque(content)
        return self._key.sign(sign_content, ec.ECDSA(hashes.SHA256()))

    def _proposal_message(self, group_id: bytes, epoch: int, proposal: bytes) -> bytes:
        framed = (
            opaque(group_id)
            + struct.pack(">QBI", epoch, SenderType.EXTERNAL, 0)
            + opaque(b"")  # authenticated_data
            + bytes([CONTENT_TYPE_PROPOSAL])
            + proposal
        )
        header = struct.pack(">HH", MLS_VERSION_10, WIRE_FORMAT_PUBLIC_MESSAGE)
        # FramedContentTBS = version || wire_format || content (no GroupContext: external sender)
        signature = self._sign_with_label(b"FramedContentTBS", header + framed)
        return header + framed + opaque(signature)

    def add_proposal(self, group_id: bytes, epoch: int, key_package: bytes) -> bytes:
        """A signed Add proposal MLSMessage for ``key_package`` (a bare KeyPackage)."""
        return self._proposal_message(
            group_id, epoch, struct.pack(">H", PROPOSAL_TYPE_ADD) + key_package
        )

    def remove_proposal(self, group_id: bytes, epoch: int, leaf_index: int) -> bytes:
        """A signed Remove proposal MLSMessage for the member at ``leaf_index``."""
        return self._proposal_message(
            group_id, epoch, struct.pack(">HI", PROPOSAL_TYPE_REMOVE, leaf_index)
        )


def proposal_ref(proposal_message: bytes) -> bytes:
    """RFC 9420 §5.2 ProposalRef of one of our proposal MLSMessages (for op 27 revoke).

    RefHash("MLS 1.0 Proposal Reference", AuthenticatedContent), where AuthenticatedContent is
    the message without its 2-byte ProtocolVersion (external senders carry no membership tag).
    """
    value = proposal_message[2:]
    return hashlib.sha256(opaque(MLS_LABEL_PREFIX + b"Proposal Reference") + opaque(value)).digest()


# --- call members simulated in process ---------------------------------------------------


class DaveMember(ABC):
    """Another person in the call, behaving like a real DAVE client in this process.

    :class:`DaveGroup` talks to members only through these methods, so any DAVE implementation
    can stand in: :class:`SimulatedMember` (davey, the bot's library) or :class:`LibdaveMember`
    (libdave, what Discord's own clients run).
    """

    #: Which library this member's DAVE runs on (``--member-dave``).
    kind: str
    user_id: int
    channel_id: int
    #: The call's protocol version as this client knows it (0 after a downgrade).
    protocol_version: int

    @abstractmethod
    def key_package(self, external_sender: bytes) -> bytes:
        """Take op 25 (the external sender) and answer with a key package (op 26)."""

    @abstractmethod
    def on_proposals(
        self, body: bytes, recognized: set[int]
    ) -> tuple[bytes, bytes | None] | None:
        """Op 27 ``body`` (operation-type byte first): our (commit, welcome), or None.
        ``recognized``: the user ids in the call (a real client checks Adds against them)."""

    @abstractmethod
    def on_commit(self, commit: bytes) -> None:
        """Op 29: apply the winning commit (ours included)."""

    @abstractmethod
    def on_welcome(self, welcome: bytes, recognized: set[int], epoch: int | None) -> None:
        """Op 30: join the group at ``epoch`` (as Discord saw the commit)."""

    @abstractmethod
    def reinit(self, protocol_version: int) -> None:
        """Op 24: start over with a new group (after DAVE was switched back on)."""

    def execute_transition(self) -> None:  # noqa: B027 - davey switches keys by itself
        """Op 22: the transition every client is ready for happens now (send with new keys)."""

    @property
    @abstractmethod
    def epoch(self) -> int | None: ...

    @property
    @abstractmethod
    def privacy_code(self) -> str | None:
        """The voice privacy code this client would show for the current epoch."""

    @abstractmethod
    def encrypt_opus(self, frame: bytes) -> bytes:
        """What this member puts in its RTP payload: DAVE-encrypted once ready, else plain."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(user_id={self.user_id}, epoch={self.epoch})"


class SimulatedMember(DaveMember):
    """A call member on davey (the library the bot uses), its own ``DaveSession``."""

    kind = "davey"

    def __init__(self, user_id: int, channel_id: int) -> None:
        self.user_id = user_id
        self.channel_id = channel_id
        self.session = davey.DaveSession(DAVE_PROTOCOL_VERSION, user_id, channel_id)
        #: The call's protocol version as this client knows it (0 after a downgrade).
        self.protocol_version = DAVE_PROTOCOL_VERSION

    def key_package(self, external_sender: bytes) -> bytes:
        self.session.set_external_sender(external_sender)
        return bytes(self.session.get_serialized_key_package())

    def on_proposals(
        self, body: bytes, recognized: set[int]
    ) -> tuple[bytes, bytes | None] | None:
        optype = (davey.ProposalsOperationType.append if body[0] == PROPOSALS_APPEND
                  else davey.ProposalsOperationType.revoke)
        result = self.session.process_proposals(optype, body[1:])
        if result is None:
            return None
        return bytes(result.commit), None if result.welcome is None else bytes(result.welcome)

    def on_commit(self, commit: bytes) -> None:
        self.session.process_commit(commit)

    def on_welcome(self, welcome: bytes, recognized: set[int], epoch: int | None) -> None:
        self.session.process_welcome(welcome)

    def reinit(self, protocol_version: int) -> None:
        self.session.reinit(protocol_version, self.user_id, self.channel_id)

    @property
    def epoch(self) -> int | None:
        return int(self.session.epoch) if self.session.epoch is not None else None

    @property
    def privacy_code(self) -> str | None:
        return str(self.session.voice_privacy_code) if self.session.ready else None

    def encrypt_opus(self, frame: bytes) -> bytes:
        if self.protocol_version == 0 or not self.session.ready:
            return frame  # as discord.py's send side does without ``can_encrypt``
        return bytes(self.session.encrypt_opus(frame))


#: ``--member-dave`` values: the DAVE library simulated members run.
MEMBER_DAVE_KINDS = ("libdave", "davey")
#: What to install for libdave members (the ``dave.py`` binding lives in the ``sim`` extra).
LIBDAVE_MISSING = (
    "libdave members need the dave.py package: pip install 'cantobot[sim]' "
    "(or pass --member-dave davey)"
)


def libdave_available() -> bool:
    """True when Discord's libdave binding (``dave.py``, import ``dave``) is installed."""
    return libdave is not None


class LibdaveMember(DaveMember):
    """A call member running Discord's own libdave (C++, via the ``dave.py`` binding), as the
    official clients do, so the bot's davey session is tested against the real thing.

    libdave's API differs from davey's in ways this adapter absorbs: ``process_proposals``
    takes the op 27 body *with* its operation-type byte and returns ``commit || welcome``
    (the op 28 payload); ``process_commit`` answers only roster changes (or a RejectType);
    media goes through a separate :class:`dave.Encryptor` fed the session's key ratchet after
    every epoch change. Unlike davey, libdave encrypts the Opus silence frame too.
    """

    kind = "libdave"
    #: The Encryptor picks the codec by SSRC; one stream per member, so one fixed value.
    _SSRC = 1

    def __init__(self, user_id: int, channel_id: int) -> None:
        if libdave is None:
            raise DaveGroupError(LIBDAVE_MISSING)
        self.user_id = user_id
        self.channel_id = channel_id
        self.protocol_version = DAVE_PROTOCOL_VERSION
        #: libdave's MLS failure reports, (source, reason), oldest first.
        self.failures: list[tuple[str, str]] = []
        self._epoch: int | None = None
        self._new_session(DAVE_PROTOCOL_VERSION)

    def _new_session(self, protocol_version: int) -> None:
        assert libdave is not None
        self.session = libdave.Session(self._on_failure)
        self.session.init(protocol_version, self.channel_id, str(self.user_id))
        self.encryptor = libdave.Encryptor()
        self.encryptor.assign_ssrc_to_codec(self._SSRC, libdave.Codec.opus)
        self._staged: libdave.IKeyRatchet | None = None
        self._epoch = None

    def _on_failure(self, source: str, reason: str) -> None:
        _log.warning("libdave member %d: MLS failure in %s: %s", self.user_id, source, reason)
        self.failures.append((source, reason))

    def _recognized(self, user_ids: set[int]) -> set[str]:
        return {str(u) for u in user_ids | {self.user_id}}

    def key_package(self, external_sender: bytes) -> bytes:
        self.session.set_external_sender(external_sender)
        kp = self.session.get_marshalled_key_package()
        if kp is None:
            raise DaveGroupError(f"libdave member {self.user_id} made no key package")
        return bytes(kp)

    def on_proposals(
        self, body: bytes, recognized: set[int]
    ) -> tuple[bytes, bytes | None] | None:
        out = self.session.process_proposals(body, self._recognized(recognized))
        if not out:
            return None
        return split_commit_welcome(bytes(out))

    def _rekey(self, epoch: int | None) -> None:
        """Stage the new epoch's key: like Discord's clients, the encryptor switches to it
        only when the transition executes (op 22), when every receiver holds it too."""
        ratchet = self.session.get_key_ratchet(str(self.user_id))
        if ratchet is None:
            raise DaveGroupError(f"libdave member {self.user_id} has no key after the commit")
        self._staged = ratchet
        self._epoch = epoch

    def execute_transition(self) -> None:
        if self._staged is not None:
            self.encryptor.set_key_ratchet(self._staged)
            self.encryptor.set_passthrough_mode(False)
            self._staged = None

    def on_commit(self, commit: bytes) -> None:
        result = self.session.process_commit(commit)
        if not isinstance(result, dict):
            raise DaveGroupError(
                f"libdave member {self.user_id} rejected a commit ({result.name}): "
                f"{self.failures[-1] if self.failures else 'no reason given'}"
            )
        self._rekey(commit_info(commit).epoch + 1)

    def on_welcome(self, welcome: bytes, recognized: set[int], epoch: int | None) -> None:
        roster = self.session.process_welcome(welcome, self._recognized(recognized))
        if roster is None:
            raise DaveGroupError(
                f"libdave member {self.user_id} rejected a welcome: "
                f"{self.failures[-1] if self.failures else 'no reason given'}"
            )
        self._rekey(epoch)

    def reinit(self, protocol_version: int) -> None:
        self._new_session(protocol_version)

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def ready(self) -> bool:
        return self.session.has_established_group() and self.encryptor.has_key_ratchet()

    @property
    def privacy_code(self) -> str | None:
        """``generate_displayable_code(last epoch authenticator, 30, 5)``, as clients show."""
        assert libdave is not None
        auth = self.session.get_last_epoch_authenticator()
        if not auth or not self.ready:
            return None
        return libdave.generate_displayable_code(auth, 30, 5)

    def encrypt_opus(self, frame: bytes) -> bytes:
        assert libdave is not None
        if self.protocol_version == 0 or not self.ready:
            return frame
        out = self.encryptor.encrypt(libdave.MediaType.audio, self._SSRC, frame)
        if out is None:
            raise DaveGroupError(f"libdave member {self.user_id} could not encrypt a frame")
        return bytes(out)


def make_member(kind: str, user_id: int, channel_id: int) -> DaveMember:
    """A simulated member whose DAVE runs on ``kind`` (one of :data:`MEMBER_DAVE_KINDS`)."""
    if kind == "libdave":
        return LibdaveMember(user_id, channel_id)
    if kind == "davey":
        return SimulatedMember(user_id, channel_id)
    raise ValueError(f"member DAVE must be one of {', '.join(MEMBER_DAVE_KINDS)}, not {kind!r}")


# --- Discord's bookkeeping for one call ------------------------------------------------------


@dataclass
class _Participant:
    user_id: int
    member: DaveMember | None  # None: a wire client (the bot)
    key_package: bytes | None = None
    in_group: bool = False

    @property
    def on_wire(self) -> bool:
        return self.member is None


@dataclass
class _Round:
    """One batch of proposals awaiting a commit."""

    epoch: int
    recipients: list[int]  # who received the proposals (members of the group, or the founder)
    adds: list[int]  # user ids, in proposal order
    removes: list[int]  # user ids, in proposal order
    forming: bool
    #: Simulated members' commits for this round, in the order they made them.
    fallbacks: dict[int, tuple[bytes, bytes | None]] = field(default_factory=dict)


@dataclass
class _Transition:
    protocol_version: int
    waiting: set[int]
    notified: list[int] = field(default_factory=list)


class DaveGroup:
    """Discord's view of one voice channel's MLS group: who is in it, at which leaf, which epoch.

    The tree is tracked as RFC 9420 §12.3 applies proposals (Removes blank a leaf and trim the
    right edge, Adds take the leftmost blank leaf or extend the tree), so Remove proposals name
    the same leaf the members' own trees hold.
    """

    def __init__(
        self, channel_id: int, sender: ExternalSender | None = None, *, protocol_version: int = 1
    ) -> None:
        self.channel_id = channel_id
        self.group_id = group_id_for(channel_id)
        self.sender = sender or ExternalSender()
        self.protocol_version = protocol_version
        #: The group's epoch as Discord saw the last commit; None while no group exists.
        self.epoch: int | None = None
        self._participants: dict[int, _Participant] = {}
        self._leaves: list[int | None] = []
        self._round: _Round | None = None
        self._queued_removes: list[int] = []
        self._transitions: dict[int, _Transition] = {}
        self._last_transition_id = 0
        #: Every commit applied, as (committer, epoch it created, transition id), for tests/logs.
        self.history: list[tuple[int, int, int]] = []

    # -- views --

    @property
    def members(self) -> list[int]:
        """User ids in the MLS group, in leaf order."""
        return [uid for uid in self._leaves if uid is not None]

    def leaf_index(self, user_id: int) -> int | None:
        """The leaf Discord believes ``user_id`` occupies, or None."""
        try:
            return self._leaves.index(user_id)
        except ValueError:
            return None

    @property
    def pending_transitions(self) -> dict[int, set[int]]:
        """Transition id → wire clients whose op 23 is still awaited."""
        return {tid: set(t.waiting) for tid, t in self._transitions.items()}

    @property
    def awaiting_commit(self) -> bool:
        """True while proposals are out and no commit has been accepted."""
        return self._round is not None

    # -- inputs --

    def join(self, user_id: int) -> list[Delivery]:
        """A wire client finished SESSION_DESCRIPTION: send it the external sender (op 25)."""
        if user_id in self._participants:
            raise DaveGroupError(f"user {user_id} joined twice")
        self._participants[user_id] = _Participant(user_id, None)
        if self.protocol_version == 0:
            return []
        return [(user_id, _binary(Op.MLS_EXTERNAL_SENDER, self.sender.package()))]

    def add_member(self, member: DaveMember) -> list[Delivery]:
        """A simulated member joins: it takes op 25 and sends its key package, in process."""
        if member.user_id in self._participants:
            raise DaveGroupError(f"user {member.user_id} joined twice")
        if member.channel_id != self.channel_id:
            raise DaveGroupError("member belongs to another channel")
        self._participants[member.user_id] = _Participant(member.user_id, member)
        member.protocol_version = self.protocol_version
        if self.protocol_version == 0:
            return []
        return self.on_key_package(member.user_id, member.key_package(self.sender.package()))

    def on_key_package(self, user_id: int, key_package: bytes) -> list[Delivery]:
        """Op 26: queue an Add for this client (a fresh key package replaces an older one)."""
        p = self._require(user_id)
        if self.protocol_version == 0:
            return []
        if p.in_group:
            raise DaveGroupError(f"user {user_id} sent a key package while in the group")
        p.key_package = key_package
        return self._pump()

    def on_commit_welcome(self, user_id: int, payload: bytes) -> list[Delivery]:
        """Op 28 from a wire client: accept the first valid commit for the open round."""
        self._require(user_id)
        commit, welcome = split_commit_welcome(payload)
        out = self._accept_commit(user_id, commit, welcome)
        return out + self._pump()

    def on_transition_ready(self, user_id: int, transition_id: int) -> list[Delivery]:
        """Op 23: once every notified wire client is ready, execute the transition (op 22)."""
        t = self._transitions.get(transition_id)
        if t is None:
            _log.debug("op 23 for unknown transition %d from %d", transition_id, user_id)
            return []
        t.waiting.discard(user_id)
        return self._maybe_execute(transition_id)

    def on_invalid_commit_welcome(self, user_id: int, transition_id: int) -> list[Delivery]:
        """Op 31: the client reset its session; remove its old leaf, await its new op 26."""
        p = self._require(user_id)
        _log.info("user %d could not process transition %d; re-adding it", user_id, transition_id)
        p.key_package = None
        out = self._drop_from_transitions(user_id)
        if p.in_group:
            p.in_group = False
            self._queued_removes.append(user_id)
        out += self._recipient_gone(user_id)
        return out + self._pump()

    def leave(self, user_id: int) -> list[Delivery]:
        """A client left the call: Remove its leaf (commit without welcome)."""
        p = self._participants.pop(user_id, None)
        if p is None:
            return []
        out = self._drop_from_transitions(user_id)
        if p.in_group:
            self._queued_removes.append(user_id)
        # (A joiner still in an open round is added by its commit, then removed: see below.)
        out += self._recipient_gone(user_id)
        return out + self._pump()

    def commit_timeout(self) -> list[Delivery]:
        """The wire committer did not answer op 27 in time: use a simulated member's commit."""
        return self._use_fallback() + self._pump()

    def downgrade(self) -> list[Delivery]:
        """Switch the call to protocol version 0 (no E2EE): op 21, op 22 once all are ready."""
        if self.protocol_version == 0:
            raise DaveGroupError("the call is already at protocol version 0")
        return self._prepare_transition(0)

    def upgrade(self) -> list[Delivery]:
        """Switch a version-0 call back to DAVE: op 24 ``{epoch: 1}`` asks every client for a
        new group (discord.py re-inits its session and sends op 26), then one forms as usual;
        its commit's transition (op 29/30 → 23 → 22) turns encryption on."""
        if self.protocol_version != 0:
            raise DaveGroupError("the call already uses DAVE")
        self._set_protocol_version(DAVE_PROTOCOL_VERSION)
        prepare = {
            "op": int(Op.DAVE_PREPARE_EPOCH),
            "d": {"epoch": 1, "protocol_version": DAVE_PROTOCOL_VERSION},
        }
        out: list[Delivery] = []
        for uid, p in self._participants.items():
            if p.member is None:
                out.append((uid, dict(prepare)))
                out.append((uid, _binary(Op.MLS_EXTERNAL_SENDER, self.sender.package())))
                continue
            p.member.reinit(DAVE_PROTOCOL_VERSION)
            p.key_package = p.member.key_package(self.sender.package())
        return out + self._pump()

    # -- the machinery --

    def _require(self, user_id: int) -> _Participant:
        p = self._participants.get(user_id)
        if p is None:
            raise DaveGroupError(f"user {user_id} is not in the call")
        return p

    def _is_wire(self, user_id: int) -> bool:
        p = self._participants.get(user_id)
        return p is not None and p.on_wire

    def _next_transition_id(self) -> int:
        tid = self._last_transition_id % MAX_TRANSITION_ID + 1
        while tid in self._transitions:
            tid = tid % MAX_TRANSITION_ID + 1
        self._last_transition_id = tid
        return tid

    def _pump(self) -> list[Delivery]:
        """Start the next proposal round if none is open and something is queued."""
        out: list[Delivery] = []
        while self._round is None and self.protocol_version > 0:
            started = self._start_round()
            if started is None:
                break
            out += started
        return out

    def _start_round(self) -> list[Delivery] | None:
        removes = [u for u in dict.fromkeys(self._queued_removes) if self.leaf_index(u) is not None]
        self._queued_removes = []
        joiners = [
            p.user_id for p in self._participants.values() if p.key_package and not p.in_group
        ]
        remaining = [u for u in self.members if u not in removes and u in self._participants]
        remaining = [u for u in remaining if self._participants[u].in_group]
        if not remaining:
            # Nobody left to commit: the group dissolves; a new one forms from the joiners.
            self._leaves = []
            self.epoch = None
            if len(joiners) < 2:
                return None
            founder = next((u for u in joiners if self._is_wire(u)), joiners[0])
            adds = [u for u in joiners if u != founder]
            self._round = _Round(0, [founder], adds, [], forming=True)
            _log.debug("forming group: %d commits adding %s", founder, adds)
        else:
            if not removes and not joiners:
                return None
            assert self.epoch is not None
            self._round = _Round(self.epoch, remaining, joiners, removes, forming=False)
        rnd = self._round
        proposals = [
            self.sender.remove_proposal(self.group_id, rnd.epoch, self._leaves.index(u))
            for u in rnd.removes
        ]
        proposals += [
            self.sender.add_proposal(self.group_id, rnd.epoch, self._key_package(u))
            for u in rnd.adds
        ]
        frame = _binary(Op.MLS_PROPOSALS, proposals_payload(PROPOSALS_APPEND, proposals))
        out: list[Delivery] = []
        for uid in rnd.recipients:
            p = self._participants[uid]
            if p.member is None:
                out.append((uid, frame))
                continue
            result = p.member.on_proposals(frame[1:], set(self._participants))
            if result is not None:
                rnd.fallbacks[uid] = result
        if not any(self._is_wire(u) for u in rnd.recipients):
            if not rnd.fallbacks:
                raise DaveGroupError("no member committed the proposals")  # a davey surprise
            out += self._use_fallback()
        return out

    def _key_package(self, user_id: int) -> bytes:
        kp = self._participants[user_id].key_package
        assert kp is not None
        return kp

    def _use_fallback(self) -> list[Delivery]:
        rnd = self._round
        if rnd is None:
            return []
        for committer, (commit, welcome) in rnd.fallbacks.items():
            if self._can_commit(rnd, committer):
                return self._accept_commit(committer, commit, welcome)
        return []

    def _can_commit(self, rnd: _Round, user_id: int) -> bool:
        p = self._participants.get(user_id)
        return p is not None and user_id in rnd.recipients and (p.in_group or rnd.forming)

    def _recipient_gone(self, user_id: int) -> list[Delivery]:
        """A proposal recipient left or reset before committing: find another committer."""
        rnd = self._round
        if rnd is None or user_id not in rnd.recipients:
            return []
        able = [u for u in rnd.recipients if u != user_id and self._can_commit(rnd, u)]
        if any(self._is_wire(u) for u in able):
            return []  # another wire client may still commit
        if any(u in rnd.fallbacks for u in able):
            return self._use_fallback()
        # Nobody left who holds these proposals: drop the round; joiners stay queued.
        self._round = None
        return []

    def _accept_commit(
        self, committer: int, commit: bytes, welcome: bytes | None
    ) -> list[Delivery]:
        rnd = self._round
        info = commit_info(commit)
        if rnd is None or info.epoch != rnd.epoch or not self._can_commit(rnd, committer):
            _log.debug(
                "ignoring commit from %d for epoch %d (stale or unasked)", committer, info.epoch
            )
            return []
        if info.group_id != self.group_id:
            raise DaveGroupError(f"commit for group {info.group_id.hex()}, not this channel")
        adds = [u for u in rnd.adds if u in self._participants]
        if rnd.adds and welcome is None:
            raise DaveGroupError(f"commit from {committer} adds members but carries no welcome")
        self._round = None
        # Apply to our copy of the tree exactly as members do (RFC 9420 §12.3).
        if rnd.forming:
            self._leaves = [committer]
        for uid in rnd.removes:
            self._leaves[self._leaves.index(uid)] = None
        while self._leaves and self._leaves[-1] is None:
            self._leaves.pop()
        for uid in rnd.adds:
            try:
                self._leaves[self._leaves.index(None)] = uid
            except ValueError:
                self._leaves.append(uid)
        self.epoch = rnd.epoch + 1
        tid = self._next_transition_id()
        self.history.append((committer, self.epoch, tid))
        transition = _Transition(self.protocol_version, set())
        self._transitions[tid] = transition
        out: list[Delivery] = []
        # Members that reset (op 31) since the proposals went out are re-added later instead.
        existing = [u for u in rnd.recipients if self._can_commit(rnd, u)]
        tid_bytes = struct.pack(">H", tid)
        for uid in existing:
            out += self._deliver(uid, tid, Op.MLS_ANNOUNCE_COMMIT_TRANSITION, tid_bytes + commit)
        for uid in adds:
            assert welcome is not None
            self._participants[uid].in_group = True
            self._participants[uid].key_package = None
            out += self._deliver(uid, tid, Op.MLS_WELCOME, tid_bytes + welcome)
        for uid in existing:
            self._participants[uid].in_group = True
            self._participants[uid].key_package = None  # the founder's was never used
        # Someone who left during the round was still added: take them out next.
        self._queued_removes += [u for u in rnd.adds if u not in self._participants]
        _log.debug(
            "epoch %d by %d, transition %d, members %s", self.epoch, committer, tid, self.members
        )
        return out + self._maybe_execute(tid)

    def _deliver(self, uid: int, tid: int, op: Op, payload: bytes) -> list[Delivery]:
        p = self._participants[uid]
        t = self._transitions[tid]
        if p.member is None:
            t.waiting.add(uid)
            t.notified.append(uid)
            return [(uid, _binary(op, payload))]
        if op == Op.MLS_WELCOME:
            p.member.on_welcome(payload[2:], set(self._participants), self.epoch)
        else:
            p.member.on_commit(payload[2:])
        return []

    def _prepare_transition(self, protocol_version: int) -> list[Delivery]:
        tid = self._next_transition_id()
        wire = [u for u, p in self._participants.items() if p.on_wire]
        self._transitions[tid] = _Transition(protocol_version, set(wire), list(wire))
        msg = {
            "op": int(Op.DAVE_PREPARE_TRANSITION),
            "d": {"transition_id": tid, "protocol_version": protocol_version},
        }
        return [(u, dict(msg)) for u in wire] + self._maybe_execute(tid)

    def _drop_from_transitions(self, user_id: int) -> list[Delivery]:
        out: list[Delivery] = []
        for tid, t in list(self._transitions.items()):
            if user_id in t.waiting:
                t.waiting.discard(user_id)
                t.notified = [u for u in t.notified if u != user_id]
                out += self._maybe_execute(tid)
        return out

    def _maybe_execute(self, tid: int) -> list[Delivery]:
        t = self._transitions.get(tid)
        if t is None or t.waiting:
            return []
        del self._transitions[tid]
        if t.protocol_version != self.protocol_version:
            self._set_protocol_version(t.protocol_version)
        for p in self._participants.values():
            if p.member is not None and p.in_group:
                p.member.execute_transition()
        msg = {"op": int(Op.DAVE_EXECUTE_TRANSITION), "d": {"transition_id": tid}}
        return [(u, dict(msg)) for u in t.notified if u in self._participants]

    def _set_protocol_version(self, version: int) -> None:
        _log.info(
            "channel %d: DAVE protocol version %d -> %d",
            self.channel_id,
            self.protocol_version,
            version,
        )
        self.protocol_version = version
        for p in self._participants.values():
            if p.member is not None:
                p.member.protocol_version = version
            p.in_group = False
            p.key_package = None
        # Either way the old group is gone: version 0 has none, a new version starts afresh.
        self._leaves = []
        self.epoch = None
        self._round = None
        self._queued_removes = []


def _binary(op: Op, payload: bytes) -> bytes:
    return bytes([op]) + payload


def describe(frame: Frame) -> str:
    """A short log/test label for a frame: ``op 22 {...}`` or ``op 29 (123 bytes)``."""
    if isinstance(frame, dict):
        return f"op {frame['op']} {json.dumps(frame['d'], sort_keys=True)}"
    return f"op {frame[0]} ({len(frame) - 1} bytes)"
