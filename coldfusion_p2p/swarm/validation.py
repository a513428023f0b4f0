"""The DHT validator of the protocol's records, run by every node on every store and every answer.

hivemind runs ``RSASignatureValidator`` first (owner subkeys: the signature over key, subkey, value
and expiration must be the owner's), then this one, on the value with the signature stripped.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p import records as R

VALID_CACHE_SIZE = 50_000  # records remembered as valid, per validator (32-byte digests: a few MB at most)


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
