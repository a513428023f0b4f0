"""The DHT validator of the protocol's records, run by every node on every store and every answer.

hivemind runs ``RSASignatureValidator`` first (owner subkeys: the signature over key, subkey, value
and expiration must be the owner's), then this one, on the value with the signature stripped.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import struct
import typing
from typing import Callable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
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
    subkey, an expiration beyond the record's TTL, and a value that is not exactly its schema.

    A DHT key holds either one plain value or a dictionary, and a plain value with a later expiration
    replaces the whole dictionary: without this, one record could erase or freeze a round's records
    for as long as its writer asked. Records at other keys are not ours to judge.
    """

    def __init__(self):
        self._valid = ValidCache()

    def validate(self, record: DHTRecord) -> bool:
        kind = _KIND_BY_ID.get(record.key)
        if kind is None:
            return True
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


class ForeignBudget:
    """The bytes of records at keys that are not the protocol's that this node took and that have not expired.

    hivemind's ``rpc_store`` keeps whatever another node sends, at any key, for as long as it asks: a plain
    hivemind node could fill a peer's DHT process until the system ended it. Such a record is refused here
    when it asks for more than ``FOREIGN_TTL``, is longer than ``FOREIGN_RECORD_BYTES`` or is a whole
    dictionary (each entry has an expiration of its own, which the request's does not bound), and once the
    records taken and not yet expired reach ``FOREIGN_BYTES``. A flood then costs this node at most that
    much memory, and new records at such keys (a round's matchmaking) are refused here until some of it
    expires: degraded, not ended. Records at the protocol's keys are judged by ``ProtocolValidator``."""

    def __init__(self):
        self.used, self._expiring = 0, []  # [(expiration, bytes)]

    def take(self, nbytes: int, expiration: float, now: float) -> bool:
        while self._expiring and self._expiring[0][0] < now:
            self.used -= heapq.heappop(self._expiring)[1]
        nbytes = max(nbytes, FOREIGN_RECORD_COST)
        if not expiration <= now + FOREIGN_TTL or self.used + nbytes > FOREIGN_BYTES:
            return False
        heapq.heappush(self._expiring, (expiration, nbytes))
        self.used += nbytes
        return True


_foreign = ForeignBudget()


def cap_foreign_stores() -> None:
    """Put ``ForeignBudget`` before hivemind's ``rpc_store`` (called in the DHT process, before its node starts)."""
    from hivemind.proto import dht_pb2

    if getattr(DHTProtocol, "_cfp2p_capped", False):
        return
    original = DHTProtocol.rpc_store

    async def rpc_store(self, request, context):
        columns = (request.keys, request.subkeys, request.values, request.expiration_time, request.in_cache)
        if len({len(c) for c in columns}) != 1:
            return await original(self, request, context)  # hivemind refuses a request whose columns differ
        now, taken = get_dht_time(), []
        for key, subkey, value, expiration, _ in zip(*columns):
            size = len(key) + len(subkey) + len(value)
            # a whole dictionary carries an expiration per entry, each as far ahead as its writer liked: never at such keys
            taken.append(key in _KIND_BY_ID or (subkey != DHTProtocol.IS_DICTIONARY and size <= FOREIGN_RECORD_BYTES
                                                and _foreign.take(size, expiration, now)))
        if all(taken):
            return await original(self, request, context)
        kept = dht_pb2.StoreRequest(peer=request.peer)
        for column, name in zip(columns, ("keys", "subkeys", "values", "expiration_time", "in_cache")):
            getattr(kept, name).extend(item for item, ok in zip(column, taken) if ok)
        response = await original(self, kept, context)
        answers = iter(response.store_ok)
        return dht_pb2.StoreResponse(store_ok=[ok and next(answers, False) for ok in taken], peer=response.peer)

    functools.update_wrapper(rpc_store, original)
    del rpc_store.__wrapped__  # hivemind registers handlers by their own (self, request, context) and type hints
    rpc_store.__annotations__ = typing.get_type_hints(original)
    DHTProtocol.rpc_store = rpc_store
    DHTProtocol._cfp2p_capped = True
