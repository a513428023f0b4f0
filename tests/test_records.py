"""Records, their validator and certificates, without a network: every malformed record is refused."""

from __future__ import annotations

import math

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p import records as R
from coldfusion_p2p.certs import Certificate, CertChain, check_certificate, max_drift, peer_id_of_public_key, sign_certificate
from coldfusion_p2p.swarm import Identity, open_manifest, sign_manifest
from coldfusion_p2p.swarm.node import CachedSignatureValidator
from coldfusion_p2p.swarm.validation import ProtocolValidator

KEYS = [RSAPrivateKey() for _ in range(4)]
IDS = [Identity(k) for k in KEYS]
PEERS = [peer_id_of_public_key(i.public_key.encode()) for i in IDS]
H0, H1, H2 = "0" * 64, "1" * 64, "2" * 64


def test_peer_ids_match_libp2p():
    import hashlib

    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2

    for key, peer in zip(KEYS, PEERS):
        der = key.get_public_key()._public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
        assert peer == PeerID(multihash.encode(hashlib.sha256(proto).digest(), "sha2-256")).to_base58()
    with pytest.raises(ValueError):
        peer_id_of_public_key(b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
    with pytest.raises(ValueError):
        peer_id_of_public_key(b"junk")


def _signed_record(identity_index: int, key: str, value, ttl: float = 10.0, subkey=None, signer_index=None) -> DHTRecord:
    """A record as a DHT node receives it: signed by ``signer_index``'s key under ``identity_index``'s owner subkey."""
    validator = RSASignatureValidator(KEYS[identity_index if signer_index is None else signer_index])
    owner = RSASignatureValidator(KEYS[identity_index]).local_public_key if subkey is None else subkey
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(owner), MSGPackSerializer.dumps(value),
                       get_dht_time() + ttl)
    signed = RSASignatureValidator(KEYS[identity_index]).sign_value(record) if signer_index is None else validator.sign_value(record)
    return DHTRecord(record.key, record.subkey, signed, record.expiration_time)


def _node_validator() -> CompositeValidator:
    """What a swarm node runs (``swarm.start_dht``): both checks remember the records they found valid."""
    return CompositeValidator([CachedSignatureValidator(RSAPrivateKey()), ProtocolValidator()])


def progress(**kw):
    return {"swarm": "s", "v": 3, "hash": H1, "state": "training", "examples": 0, "t": 1.0, "redo": 0, **kw}


def test_a_well_formed_owned_record_passes():
    assert _node_validator().validate(_signed_record(0, R.PROGRESS_KEY, progress()))


def test_a_record_read_again_is_not_checked_again_but_any_changed_byte_is(monkeypatch):
    from hivemind.utils.crypto import RSAPublicKey

    checks = []
    verify = RSAPublicKey.verify
    monkeypatch.setattr(RSAPublicKey, "verify", lambda self, data, sig: checks.append(1) or verify(self, data, sig))
    node, good = _node_validator(), _signed_record(0, R.PROGRESS_KEY, progress())
    assert all(node.validate(good) for _ in range(5)) and len(checks) == 1
    forged_value = MSGPackSerializer.dumps(progress(state="ready"))
    signature_part = good.value[good.value.rindex(b"[signature:"):] if b"[signature:" in good.value else b""
    for bad in (
        DHTRecord(good.key, good.subkey, forged_value + signature_part, good.expiration_time),  # another value, the same signature
        DHTRecord(good.key, good.subkey, good.value, good.expiration_time + 1),  # a later expiration than was signed
        DHTRecord(good.key, MSGPackSerializer.dumps(RSASignatureValidator(KEYS[1]).local_public_key), good.value, good.expiration_time),
    ):
        assert not node.validate(bad)
    too_long = _signed_record(0, R.PROGRESS_KEY, progress(), ttl=10 ** 6)
    assert not node.validate(too_long) and not node.validate(too_long)  # a refusal is never remembered as valid


@pytest.mark.parametrize("bad", [
    progress(v=-1), progress(v=3.0), progress(v="3"), progress(hash="xyz"), progress(state="hacking"), progress(t=math.nan),
    progress(examples=True), {**progress(), "extra": 1}, {k: v for k, v in progress().items() if k != "t"}, [1, 2], "plain", None,
])
def test_malformed_values_are_refused(bad):
    assert not _node_validator().validate(_signed_record(0, R.PROGRESS_KEY, bad))


def test_a_progress_record_says_its_redo_level_only_above_zero_and_one_without_it_is_read_as_zero():
    """Peers of the release before redo levels forbid unknown fields: the common record (level 0) stays theirs."""
    old = {k: v for k, v in progress(state="ready").items() if k != "redo"}
    assert _node_validator().validate(_signed_record(0, R.PROGRESS_KEY, old))
    assert R.parse(R.KINDS[R.PROGRESS_KEY], old).redo == 0
    assert R.parse(R.KINDS[R.PROGRESS_KEY], progress(redo=5)).redo == 5
    for bad in (1.0, True, "1", -1, 1001, None):  # no conversions, and no level past what a manifest allows
        assert R.parse(R.KINDS[R.PROGRESS_KEY], progress(redo=bad)) is None, bad
        assert not _node_validator().validate(_signed_record(0, R.PROGRESS_KEY, progress(redo=bad)))


def test_plain_values_foreign_subkeys_long_expirations_and_forged_owners_are_refused():
    v = _node_validator()
    key_id = DHTID.generate(source=R.PROGRESS_KEY).to_bytes()
    plain = DHTRecord(key_id, DHTProtocol.IS_REGULAR_VALUE, MSGPackSerializer.dumps(progress()), get_dht_time() + 10)
    assert not v.validate(plain)  # a plain value would replace every peer's record at the key
    assert not v.validate(_signed_record(0, R.PROGRESS_KEY, progress(), subkey="QmSomePeer"))  # not an owner subkey
    assert not v.validate(_signed_record(0, R.PROGRESS_KEY, progress(), ttl=10 * 365 * 86400))  # years ahead
    assert not v.validate(_signed_record(0, R.PROGRESS_KEY, progress(), signer_index=1))  # signed by someone else
    # at keys that are not the protocol's: hivemind's matchmaking records only (a peer id's bytes, True or False, minutes)
    other, now = DHTID.generate(source="someone.else").to_bytes(), get_dht_time()
    peer = MSGPackSerializer.dumps(b"\x12\x20" + b"p" * 32)
    assert v.validate(DHTRecord(other, peer, MSGPackSerializer.dumps(True), now + 10))
    assert v.validate(DHTRecord(other, peer, MSGPackSerializer.dumps(False), now + 10))
    for subkey, value, expiration in ((DHTProtocol.IS_REGULAR_VALUE, True, now + 10), (peer, 5, now + 10), (peer, True, now + 1e6),
                                      (peer, b"x" * 100, now + 10), (MSGPackSerializer.dumps("text"), True, now + 10),
                                      (MSGPackSerializer.dumps(b"p" * 129), True, now + 10), (b"\xc1", True, now + 10)):
        assert not v.validate(DHTRecord(other, subkey, MSGPackSerializer.dumps(value), expiration)), (subkey, value, expiration)


def test_metrics_must_name_their_owner():
    value = {"swarm": "s", "peer": PEERS[0], "name": None, "role": "contributor", "version": 0, "hash": H0, "phase": "idle",
             "step": 0, "total": 0, "loss": None, "examples_per_second": None, "device": "cpu", "uptime": 1.0,
             "last_round_seconds": None, "rounds": 0, "reach": "client", "t": 1.0}
    assert _node_validator().validate(_signed_record(0, R.METRICS_KEY, value))
    assert not _node_validator().validate(_signed_record(1, R.METRICS_KEY, value))  # peer 1 claiming peer 0's metrics


def test_every_record_kind_has_a_ttl_cap_and_rejects_junk():
    for key, kind in R.KINDS.items():
        assert 0 < kind.ttl <= 3600
        assert R.parse(kind, {"swarm": "s"}) is None
        assert R.check(kind, b"[owner:ssh-rsa AAAA]", {}, 0.0, 0.0) is None


def _cert(version=1, parent=H0, new=H1, members=PEERS[:3], signers=(0, 1, 2)) -> Certificate:
    cert = Certificate("s", version, parent, new, "ab" * 8, tuple(members))
    for i in signers:
        cert = cert.with_signature(PEERS[i], IDS[i].public_key, sign_certificate(cert, PEERS[i], IDS[i]))
    return cert


def test_certificates_need_enough_valid_member_signatures():
    assert check_certificate(_cert(), "s", 3).ok
    assert not check_certificate(_cert(signers=(0,)), "s", 2).ok
    assert not check_certificate(_cert(), "other-swarm", 2).ok
    outsider = _cert(members=PEERS[:2], signers=(0, 1))
    outsider = outsider.with_signature(PEERS[3], IDS[3].public_key, sign_certificate(outsider, PEERS[3], IDS[3]))
    assert check_certificate(outsider, "s", 2).signers == tuple(sorted(PEERS[:2]))  # a non-member's signature does not count
    stolen = _cert(signers=(0,))
    forged = stolen.with_signature(PEERS[1], IDS[0].public_key, stolen.signatures[PEERS[0]][1])  # peer 0's key under peer 1's id
    assert check_certificate(forged, "s", 2).signers == (PEERS[0],)
    tampered = Certificate("s", 1, H0, H2, "ab" * 8, tuple(PEERS[:3]), _cert().signatures)  # signatures of another hash
    assert not check_certificate(tampered, "s", 1).ok
    assert Certificate.from_dict(_cert().to_dict()) == _cert()
    for junk in ({}, {"kind": "cfp2p-certificate/1"}, {**_cert().to_dict(), "version": "1"}, {**_cert().to_dict(), "members": ["x"]},
                 {**_cert().to_dict(), "signatures": {"a": "b"}}, {**_cert().to_dict(), "more": 1}):
        with pytest.raises(ValueError):
            Certificate.from_dict(junk)


def test_chain_accepts_only_versions_whose_parent_it_accepts():
    chain = CertChain("s", H0, 2)
    assert chain.add(_cert(version=2, parent=H1, new=H2)) is not None  # v1 unknown: no chain back to v0
    assert chain.add(_cert(version=1)) is None and chain.accepts(1, H1) and chain.signers(1, H1) == 3
    assert chain.add(_cert(version=2, parent=H1, new=H2, signers=(0,))) is not None  # too few signatures
    assert chain.add(_cert(version=2, parent=H1, new=H2)) is None
    assert [c.version for c in chain.lineage(2, H2)] == [1, 2]


def test_the_recent_signers_of_a_line_are_its_valid_signers_within_the_depth_and_on_that_line_only():
    chain = CertChain("s", H0, 2)
    v1 = _cert(members=PEERS[:3], signers=(0, 1))  # peer 2 is a member that did not sign: not one of the makers
    v1 = v1.with_signature(PEERS[3], IDS[3].public_key, sign_certificate(v1, PEERS[3], IDS[3]))  # nor a non-member that did
    assert chain.add(v1) is None
    assert chain.add(_cert(version=2, parent=H1, new=H2, members=(PEERS[1], PEERS[3]), signers=(1, 3))) is None
    fork = _cert(version=2, parent=H1, new="f" * 64, members=(PEERS[0], PEERS[2]), signers=(0, 2))
    assert chain.add(fork) is None
    assert chain.recent_signers(2, H2, 8) == {PEERS[0], PEERS[1], PEERS[3]}
    assert chain.recent_signers(2, H2, 1) == {PEERS[1], PEERS[3]}  # only v2's own
    assert chain.recent_signers(2, "f" * 64, 8) == {PEERS[0], PEERS[1], PEERS[2]}  # the other branch's
    assert chain.recent_signers(0, H0, 8) == frozenset() and chain.recent_signers(3, H2, 8) == frozenset()  # v0, not linked


def test_max_drift_grows_with_rounds():
    assert max_drift(100.0, 0.05, 0) == 0
    assert math.isclose(max_drift(100.0, 0.05, 1), 5.0)
    assert math.isclose(max_drift(100.0, 0.05, 2), 10.25)


def test_manifests_count_only_with_the_authoritys_signature():
    manifest = {"name": "s", "model": {"v0_hash": H0}}
    signed = sign_manifest(IDS[0], manifest, 3)
    rec = R.parse(R.KINDS[R.MANIFEST_KEY], signed)
    assert rec is not None and open_manifest(rec, PEERS[0]) == manifest
    assert open_manifest(rec, PEERS[1]) is None  # not the pinned authority
    forged = R.parse(R.KINDS[R.MANIFEST_KEY], {**signed, "serial": 4})  # a newer serial the authority never signed
    assert open_manifest(forged, PEERS[0]) is None
    other = R.parse(R.KINDS[R.MANIFEST_KEY], sign_manifest(IDS[1], manifest, 9))  # well signed, by another key
    assert open_manifest(other, PEERS[0]) is None


def test_slice_digests_are_a_record_of_their_own_with_a_strict_shape():
    kind = R.KINDS[R.SLICES_KEY]
    good = {"swarm": "s", "v": 3, "base": H0, "redo": 0, "group_id": "ab" * 8,
            "slices": [{"reducer": PEERS[0], "digest": "0f" * 16}, {"reducer": PEERS[1], "digest": "a1" * 16}]}
    assert R.parse(kind, good) is not None
    assert _node_validator().validate(_signed_record(0, R.SLICES_KEY, good))
    for bad in ({**good, "slices": [{"reducer": PEERS[0], "digest": "0f" * 32}]},  # a whole sha256: 16 bytes are kept
                {**good, "slices": [{"reducer": "not a peer id!", "digest": "0f" * 16}]},
                {**good, "slices": [{"reducer": PEERS[0], "digest": "0f" * 16}] * 257},
                {**good, "extra": 1}):
        assert R.parse(kind, bad) is None
