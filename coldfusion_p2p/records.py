"""The swarm's DHT records: one strict schema per record, with no networking.

Every record the protocol reads lives under its writer's *owner subkey* (``[owner:<ssh-rsa public
key>]``): hivemind's ``RSASignatureValidator`` signs key, subkey, value and expiration with that
key, so the subkey names who wrote the record and nobody can write under another's. This room says
what a well-formed value is; ``swarm.validation`` refuses everything else at every DHT node, and the
readers parse again with the same functions (a DHT node run by someone else answers what it likes).

Keys are global and fixed (the swarm's name is a field), so every node knows them from its start:
a plain value (no subkey) at one of them, an expiration beyond its TTL, a value that does not parse,
or an owner that is not the peer the record claims are all refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Type

import pydantic.v1 as pydantic  # hivemind 1.1.12 speaks pydantic v1; strict types forbid silent conversions

from coldfusion_p2p.certs import peer_id_of_public_key

PEER_RE = r"^[1-9A-HJ-NP-Za-km-z]{30,60}$"
HASH_RE = r"^[0-9a-f]{64}$"
OWNER_RE = re.compile(rb"^\[owner:(ssh-rsa [A-Za-z0-9+/=]{100,2000})\]$")
CLOCK_SLACK = 30.0  # seconds of clock difference tolerated on expirations

Name = pydantic.constr(strict=True, min_length=1, max_length=48)
Hash = pydantic.constr(strict=True, regex=HASH_RE)
Peer = pydantic.constr(strict=True, regex=PEER_RE)
Count = pydantic.conint(strict=True, ge=0, le=10**12)
Seconds = pydantic.confloat(strict=True, allow_inf_nan=False)


class _Record(pydantic.BaseModel):
    class Config:
        extra = pydantic.Extra.forbid


class ManifestRecord(_Record):
    """A swarm manifest signed by the swarm's authority; any peer may re-publish it under its own subkey."""

    swarm: Name
    serial: pydantic.conint(strict=True, ge=0, le=2**53)
    manifest: pydantic.conbytes(strict=True, max_length=65536)  # canonical JSON of SwarmManifest.to_dict()
    authority: pydantic.constr(strict=True, regex=r"^ssh-rsa [A-Za-z0-9+/=]{100,2000}$")
    signature: pydantic.constr(strict=True, max_length=2048)


class BaseRecord(_Record):
    """The newest certified base a peer holds and serves."""

    swarm: Name
    v: Count
    hash: Hash


class ProgressRecord(_Record):
    """Where a peer is in the round on base (v, hash); ``t``: when it entered that state."""

    swarm: Name
    v: Count
    hash: Hash
    state: pydantic.constr(strict=True, regex=r"^(training|ready|left)$")
    examples: Count
    t: Seconds
    # the matchmaking level (redo) a ready peer looks for its group at: peers that missed a group's unverified
    # all-reduce (or never learnt of it) move up to it, so that no two parts of a round wait at different keys;
    # left out at 0, so that peers of the release before it (which forbid unknown fields) read the common record
    redo: pydantic.conint(strict=True, ge=0, le=1000) = 0


class VerdictRecord(_Record):
    """A member's view of one all-reduce on base (v, base), and its signature on the result."""

    swarm: Name
    v: Count
    base: Hash
    redo: pydantic.conint(strict=True, ge=0, le=1000)
    group_id: pydantic.constr(strict=True, regex=r"^[0-9a-f]{2,128}$")
    members: pydantic.conlist(Peer, min_items=1, max_items=256)
    result: pydantic.constr(strict=True, regex=r"^([0-9a-f]{64})?$")  # "" when there is no result
    clean: pydantic.StrictBool
    reason: pydantic.constr(strict=True, max_length=300)
    offenders: pydantic.conlist(Peer, max_items=256)
    signature: pydantic.constr(strict=True, max_length=2048)  # on the certificate of ``result``; "" if unclean


class SliceDigest(_Record):
    reducer: Peer
    digest: pydantic.constr(strict=True, regex=r"^[0-9a-f]{32}$")  # the first 16 bytes of a sha256


class SlicesRecord(_Record):
    """A member's digest of each reducer's slice of one all-reduce's average, as that reducer sent it.

    Published next to the verdict (a key of its own, which peers of the release before never read: their
    DHT nodes store it like any key that is not theirs to judge). When members' results differ, the
    slices that differ say whose reducer sent what (``protocol.blame``)."""

    swarm: Name
    v: Count
    base: Hash
    redo: pydantic.conint(strict=True, ge=0, le=1000)
    group_id: pydantic.constr(strict=True, regex=r"^[0-9a-f]{2,128}$")
    slices: pydantic.conlist(SliceDigest, max_items=256)


class HistoryEntry(_Record):
    v: Count
    hash: Hash
    parent: Hash
    contributors: Count
    time: Seconds
    round_s: Seconds
    cert: dict  # the version's certificate (``certs.Certificate.to_dict``): a reader checks it, nothing else does


class HistoryRecord(_Record):
    """The newest versions a peer committed or holds, for ``cfp2p status``: shown only when their
    certificates chain back to v0 (a reader without the chain fetches it from a holder)."""

    swarm: Name
    entries: pydantic.conlist(HistoryEntry, max_items=10)


class MetricsRecord(_Record):
    """One peer's live metrics (``cfp2p status``)."""

    swarm: Name
    peer: Peer
    name: Optional[pydantic.constr(strict=True, max_length=40)] = None
    role: pydantic.constr(strict=True, regex=r"^(contributor|bootstrap|mirror)$")
    version: Count
    hash: Hash
    phase: pydantic.constr(strict=True, regex=r"^(syncing|training|matchmaking|averaging|idle|serving)$")
    # direct: other peers can dial it; client: they cannot (it reduces no part); relayed: through a relay
    reach: Optional[pydantic.constr(strict=True, regex=r"^(direct|client|relayed)$")] = None
    # the reducers of its last committed round whose direct lane it could not use (their parts went over p2pd)
    lane_missed: Optional[pydantic.conlist(Peer, max_items=16)] = None
    step: Count
    total: Count
    loss: Optional[Seconds] = None
    examples_per_second: Optional[pydantic.confloat(strict=True, ge=0, allow_inf_nan=False)] = None
    device: pydantic.constr(strict=True, max_length=80)
    uptime: pydantic.confloat(strict=True, ge=0, allow_inf_nan=False)
    last_round_seconds: Optional[pydantic.confloat(strict=True, ge=0, allow_inf_nan=False)] = None
    rounds: Count
    t: Seconds


class MemberRecord(_Record):
    """A private swarm's member shows its token (``cfp2p status`` lists members and expiries from these)."""

    swarm: Name
    peer: Peer
    token: pydantic.constr(strict=True, max_length=4096)  # the token's JSON; a reader checks it with the authority


@dataclass(frozen=True)
class RecordKind:
    key: str
    schema: Type[_Record]
    ttl: float  # the longest expiration a writer may ask for, in seconds from now
    peer_field: str | None = None  # a field that must name the owner's peer id


KINDS: Dict[str, RecordKind] = {
    k.key: k
    for k in (
        RecordKind("cfp2p.manifests", ManifestRecord, 900.0),
        RecordKind("cfp2p.bases", BaseRecord, 30.0),
        RecordKind("cfp2p.progress", ProgressRecord, 30.0),
        RecordKind("cfp2p.verdicts", VerdictRecord, 180.0),
        RecordKind("cfp2p.history", HistoryRecord, 3600.0),
        RecordKind("cfp2p_metrics", MetricsRecord, 20.0, peer_field="peer"),
        RecordKind("cfp2p.members", MemberRecord, 900.0, peer_field="peer"),
        RecordKind("cfp2p.slices", SlicesRecord, 180.0),
    )
}
MANIFEST_KEY, BASES_KEY, PROGRESS_KEY, VERDICTS_KEY, HISTORY_KEY, METRICS_KEY, MEMBERS_KEY, SLICES_KEY = KINDS


def owner_of(subkey: Any) -> str | None:
    """The ssh-rsa public key an owner subkey names (bytes or str), or None."""
    if isinstance(subkey, str):
        subkey = subkey.encode()
    if not isinstance(subkey, bytes):
        return None
    m = OWNER_RE.match(subkey)
    return m.group(1).decode() if m else None


def parse(kind: RecordKind, value: Any) -> _Record | None:
    """The value as its schema, or None when it is not exactly one (no type conversions)."""
    if not isinstance(value, dict):
        return None
    try:
        parsed = kind.schema.parse_obj(value)
    except (pydantic.ValidationError, TypeError, ValueError):
        return None
    # a conversion happened somewhere: refuse (a field left out for its default is no conversion)
    return parsed if parsed.dict(exclude_unset=True) == value else None


def check(kind: RecordKind, subkey: Any, value: Any, expiration: float, now: float) -> _Record | None:
    """Everything a node checks on a record besides its signature: owner subkey, TTL, schema, peer id."""
    owner = owner_of(subkey)
    if owner is None or not (expiration <= now + kind.ttl + CLOCK_SLACK):
        return None
    parsed = parse(kind, value)
    if parsed is None:
        return None
    if kind.peer_field and getattr(parsed, kind.peer_field) != peer_id_of_owner(owner):
        return None
    return parsed


_peer_cache: dict[str, str] = {}


def peer_id_of_owner(owner: str) -> str | None:
    """The peer id of an owner's ssh-rsa key (cached: keys repeat on every read)."""
    if owner not in _peer_cache:
        try:
            _peer_cache[owner] = peer_id_of_public_key(owner.encode())
        except ValueError:
            return None
        if len(_peer_cache) > 10_000:
            _peer_cache.clear()
    return _peer_cache.get(owner)


def owned(kind: RecordKind, found: dict[Any, Any], now: float, keys: dict[str, str] | None = None) -> Dict[str, _Record]:
    """Parse a fetched dictionary ``{subkey: (value, expiration)}`` into ``{peer id: record}``.

    Records that fail any check are dropped; so are subkeys whose owner key does not give a peer id.
    ``keys``, when given, receives each writer's public key by peer id (to check its other signatures).
    """
    out: Dict[str, _Record] = {}
    for subkey, (value, expiration) in found.items():
        parsed = check(kind, subkey, value, expiration, now)
        owner = owner_of(subkey)
        peer = peer_id_of_owner(owner) if owner else None
        if parsed is not None and peer is not None:
            out[peer] = parsed
            if keys is not None:
                keys[peer] = owner
    return out


def as_value(record: _Record) -> dict:
    return record.dict()


__all__ = [
    "KINDS", "RecordKind", "ManifestRecord", "BaseRecord", "ProgressRecord", "VerdictRecord", "SlicesRecord", "HistoryRecord",
    "HistoryEntry", "MetricsRecord", "MemberRecord", "owner_of", "parse", "check", "owned", "peer_id_of_owner", "MANIFEST_KEY",
    "BASES_KEY", "PROGRESS_KEY", "VERDICTS_KEY", "HISTORY_KEY", "METRICS_KEY", "MEMBERS_KEY", "SLICES_KEY", "SliceDigest",
]
