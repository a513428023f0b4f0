"""The DHT validator of the protocol's records, run by every node on every store and every answer.

hivemind runs ``RSASignatureValidator`` first (owner subkeys: the signature over key, subkey, value
and expiration must be the owner's), then this one, on the value with the signature stripped.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from typing import Callable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p import records as R

VALID_CACHE_SIZE = 50_000  # records remembered as valid, per validator (32-byte digests: a few MB at most)
# records another node asks this node to keep at keys that are not the protocol's (hivemind's matchmaking keys:
# a few bytes each, for seconds); hivemind keeps any number of them, as large and as long as the writer asks
FOREIGN_TTL = 600.0  # seconds: the furthest expiration such a record may ask for here
FOREIGN_RECORD_BYTES = 64 << 10  # the longest such record (key, subkey and value)
FOREIGN_BYTES = 16 << 20  # bytes of such records this node takes until they expire
FOREIGN_RECORD_COST = 1024  # bytes a record is counted as at least: what keeping one costs hivemind (65,536 records of
# 8 bytes grew a DHT process by 39 MiB)
FIND_KEYS = 256  # keys one find request may ask about: hivemind's own lookups ask a few (its cache refresh 16 at most);
# answered, 90,000 random keys a request from a red-team node grew a peer's DHT process to 1.8 GiB and held its loop for seconds
FIND_VALUE_BYTES = 4 << 20  # bytes of values one answer carries (p2pd carries no longer answer): later found keys answer
# as not found, each key's value goes once however often it is asked, and its nearest neighbours always
PROTOCOL_BYTES = 8 << 20  # bytes of records one of the protocol's kinds may hold on this node (any key can own one):
# twice what a read can carry (p2pd answers at most 4 MiB, and a read of a kind takes all of its records at once)


class ValidCache:
    """Records a validator found valid, so that the same record read again is not checked again.

    A peer waiting for its round re-reads the round's records every half second, and every answer
    is validated on arrival: with 16 local peers, validating the same unchanged records (an RSA
    signature check and a schema parse each) took about half of every DHT process's CPU
    (bench/scale.py). Only a True verdict is kept, and only where it cannot turn False with time:
    a signature over fixed bytes, and an expiration within the TTL from now (``now`` only grows).
    A record is remembered by a digest of all its bytes, so that large records sent on purpose
    cannot grow the cache beyond its count."""

    def __init__(self, size: int = VALID_CACHE_SIZE):
        self.size, self._seen = size, set()

    def valid(self, record: DHTRecord, check: Callable[[DHTRecord], bool]) -> bool:
        """``check(record)``, or True at once for a record it passed before."""
        digest = hashlib.sha256()
        for part in (record.key, record.subkey, record.value, struct.pack("<d", record.expiration_time)):
            digest.update(struct.pack("<Q", len(part)))
            digest.update(part)
        key = digest.digest()
        if key in self._seen:
            return True
        if not check(record):
            return False
        if len(self._seen) >= self.size:
            self._seen.clear()
        self._seen.add(key)
        return True


_KIND_BY_ID = {DHTID.generate(source=key).to_bytes(): kind for key, kind in R.KINDS.items()}


class ProtocolValidator(RecordValidatorBase):
    """Refuses, at the protocol's keys: a plain value (no subkey), a subkey that is not an owner
    subkey, an expiration beyond the record's TTL, and a value that is not exactly its schema; at other keys,
    anything but hivemind's matchmaking records (``_matchmaking_shaped``).

    A DHT key holds either one plain value or a dictionary, and a plain value with a later expiration
    replaces the whole dictionary: without this, one record could erase or freeze a round's records
    for as long as its writer asked. At other keys only matchmaking records are kept.
    """

    def __init__(self):
        self._valid = ValidCache()

    def validate(self, record: DHTRecord) -> bool:
        kind = _KIND_BY_ID.get(record.key)
        if kind is None:
            return _matchmaking_shaped(record)
        return self._valid.valid(record, lambda r: self._check(kind, r))

    @staticmethod
    def _check(kind: R.RecordKind, record: DHTRecord) -> bool:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:  # noqa: BLE001 - bytes that do not even decode
            return False
        return R.check(kind, subkey, value, record.expiration_time, get_dht_time()) is not None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, ProtocolValidator)  # one is enough: the keys are global


_LOOKING = (MSGPackSerializer.dumps(True), MSGPackSerializer.dumps(False))
MATCHMAKING_SUBKEY_BYTES = 128  # a peer id's bytes (34 for the RSA keys peers use)


def _matchmaking_shaped(record: DHTRecord) -> bool:
    """Whether a record at a key that is not the protocol's is what hivemind's matchmaking keeps there (the only
    records the swarm writes at such keys): a peer id's bytes as subkey, True or False ("looking for a group") as value,
    for at most ``FOREIGN_TTL``. Any other record there is refused, stored or found: answers to this node's own
    lookups were merged, unchecked, into what it holds (a red-team node answered each matchmaking lookup with 20,000
    new entries expiring in three years, and a peer's DHT process grew by 200 MiB in a minute); hivemind drops an
    answer for a key whole when one of its records is refused."""
    if record.value not in _LOOKING or not record.expiration_time <= get_dht_time() + FOREIGN_TTL:
        return False
    if record.subkey in DHTProtocol.RESERVED_SUBKEYS or len(record.subkey) > MATCHMAKING_SUBKEY_BYTES + 2:
        return False
    try:
        subkey = MSGPackSerializer.loads(record.subkey)
    except Exception:  # noqa: BLE001 - bytes that do not even decode
        return False
    return isinstance(subkey, bytes) and 0 < len(subkey) <= MATCHMAKING_SUBKEY_BYTES


class StoreBudget:
    """The bytes of the records at some keys that this node holds and that have not expired, by (key, subkey).

    hivemind's ``rpc_store`` keeps whatever another node sends, at any key, for as long as it asks: a plain
    hivemind node could fill a peer's DHT process until the system ended it (280 MiB in 6 s here). Each
    record taken is counted (at least ``FOREIGN_RECORD_COST``) until its expiration; a record that replaces
    one at the same (key, subkey) replaces its count, and one hivemind then refuses is given back
    (``restore``), so that refused or repeated stores cost no room. ``limit()``: the bytes it may hold."""

    def __init__(self, limit: Callable[[], int]):
        self.limit, self.used = limit, 0
        self._held: dict[tuple[bytes, bytes], tuple[float, int]] = {}  # (key, subkey) -> (expiration, bytes)
        self._expiring: list[tuple[float, bytes, bytes]] = []  # a heap; entries replaced since are skipped

    def take(self, where: tuple[bytes, bytes], nbytes: int, expiration: float, now: float) -> tuple | None:
        """Count a record at ``where`` if it fits: (this budget, ``where``, what it replaced), what ``restore`` takes to
        give it back; None if it does not fit, or if its expiration is not a finite number (a NaN at the top of the
        heap would compare false with ``now`` for ever, and nothing held here would expire again)."""
        if not math.isfinite(expiration):
            return None
        while self._expiring and self._expiring[0][0] < now:
            expired, key, subkey = heapq.heappop(self._expiring)
            held = self._held.get((key, subkey))
            if held is not None and held[0] == expired:
                self.used -= self._held.pop((key, subkey))[1]
        nbytes = max(nbytes, FOREIGN_RECORD_COST)
        before = self._held.get(where)
        if self.used - (before[1] if before else 0) + nbytes > self.limit():
            return None
        self.used += nbytes - (before[1] if before else 0)
        self._held[where] = (expiration, nbytes)
        heapq.heappush(self._expiring, (expiration, *where))
        if len(self._expiring) > 2 * len(self._held) + 1024:  # replaced entries: rebuilt from what is held
            self._expiring = [(exp, *w) for w, (exp, _) in self._held.items()]
            heapq.heapify(self._expiring)
        return self, where, before

    def restore(self, where: tuple[bytes, bytes], before: tuple[float, int] | None) -> None:
        """Give back a record hivemind refused: ``where`` counts what it counted before ``take``."""
        now = self._held.pop(where, None)
        self.used -= now[1] if now else 0
        if before is not None:
            self._held[where] = before
            self.used += before[1]
            heapq.heappush(self._expiring, (before[0], *where))


_foreign = StoreBudget(lambda: FOREIGN_BYTES)
_protocol = {key_id: StoreBudget(lambda: PROTOCOL_BYTES) for key_id in _KIND_BY_ID}  # one per kind: a flood of one
# kind (a history record may be 2 MB, from a key minted for it) cannot crowd out the others


def _taken(key: bytes, subkey: bytes, value: bytes, expiration: float, now: float) -> tuple | None:
    """Whether this node takes one record of a store request: its count in its budget (``StoreBudget.take``), or None."""
    size = len(key) + len(subkey) + len(value)
    whole = subkey == DHTProtocol.IS_DICTIONARY  # a whole dictionary: each entry names its own expiration
    kind = _KIND_BY_ID.get(key)
    if kind is not None:  # judged by the validators; a whole one's entries at most the kind's TTL ahead
        lasts = now + kind.ttl + R.CLOCK_SLACK if whole else expiration
        return _protocol[key].take((key, subkey), size, lasts, now)
    # not the protocol's: hivemind's matchmaking records, a few bytes for seconds; never a whole dictionary
    if whole or size > FOREIGN_RECORD_BYTES or not expiration <= now + FOREIGN_TTL:
        return None
    return _foreign.take((key, subkey), size, expiration, now)


async def budgeted_store(original, protocol: DHTProtocol, request, context):
    """hivemind's ``rpc_store`` (``original``) for the records of ``request`` that fit their ``StoreBudget``;
    False for the others (``node._bound_dht_handlers`` puts it in hivemind's place, in the DHT process).

    Each record is counted, handed to hivemind alone and given back when hivemind does not keep it. hivemind
    raises on bytes it cannot parse (a key that is no DHT ID, a subkey that is not msgpack) and drops the rest
    of the request with them: handed over together, the counts of a request that stored nothing stayed taken."""
    columns = (request.keys, request.subkeys, request.values, request.expiration_time, request.in_cache)
    if len({len(c) for c in columns}) != 1:  # hivemind checks four of them and zips all five: refused here
        return dht_pb2.StoreResponse(store_ok=[False] * len(request.keys), peer=protocol.node_info)
    # no records: what hivemind does with the sender (a ping into its routing table) is done once, not per record
    response = await original(protocol, dht_pb2.StoreRequest(peer=request.peer), context)
    now, said = get_dht_time(), []
    for key, subkey, value, expiration, in_cache in zip(*columns):  # in order: one request may store one place twice
        count, stored = _taken(key, subkey, value, expiration, now), False
        if count is not None:
            one = dht_pb2.StoreRequest(keys=[key], subkeys=[subkey], values=[value], expiration_time=[expiration],
                                       in_cache=[in_cache])
            try:  # hivemind's rpc_store awaits nothing: no other request runs between this take and its restore
                stored = bool(next(iter((await original(protocol, one, context)).store_ok), False))
            except Exception:  # noqa: BLE001 - bytes hivemind could not parse: this record is refused, the others go on
                stored = False
            if not stored:  # hivemind kept nothing: the count goes back
                budget, where, before = count
                budget.restore(where, before)
        said.append(stored)
    return dht_pb2.StoreResponse(store_ok=said, peer=response.peer)


async def bounded_find(original, protocol: DHTProtocol, request, context):
    """hivemind's ``rpc_find`` (``original``) for at most ``FIND_KEYS`` keys, each looked up once, with at most
    ``FIND_VALUE_BYTES`` of values in the answer; a request past the key count, or with a key that is no DHT ID,
    gets an empty answer (the caller's hivemind takes that as no answer). hivemind answers every key of a request,
    repeated ones too, with the value found and its nearest neighbours, before a byte of it is sent."""
    keys = list(request.keys)
    if len(keys) > FIND_KEYS:
        return dht_pb2.FindResponse(results=[], peer=protocol.node_info)
    unique = list(dict.fromkeys(keys))
    try:
        response = await original(protocol, dht_pb2.FindRequest(keys=unique, peer=request.peer), context)
    except Exception:  # noqa: BLE001 - bytes hivemind could not parse (a key that is no DHT ID): no answer
        return dht_pb2.FindResponse(results=[], peer=protocol.node_info)
    found = dict(zip(unique, response.results))
    answer, given, spent = dht_pb2.FindResponse(peer=response.peer), set(), 0
    for key in keys:
        item = found[key]
        if item.type != dht_pb2.NOT_FOUND:
            if key in given or spent + len(item.value) > FIND_VALUE_BYTES:
                item = dht_pb2.FindResult(type=dht_pb2.NOT_FOUND, nearest_node_ids=item.nearest_node_ids,
                                          nearest_peer_ids=item.nearest_peer_ids)
            else:
                given.add(key)
                spent += len(item.value)
        answer.results.append(item)
    return answer
