"""Catching up without trusting anyone (``sync.HistorySync``), with holders simulated on disk: no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from coldfusion_p2p import model as M
from coldfusion_p2p.certs import Certificate, CertChain, peer_id_of_public_key, sign_certificate
from coldfusion_p2p.store import VersionInfo, VersionStore
from coldfusion_p2p.swarm import BlobError, Identity
from coldfusion_p2p.sync import HistorySync

IDS = [Identity(RSAPrivateKey()) for _ in range(3)]
PEERS = [peer_id_of_public_key(i.public_key.encode()) for i in IDS]


class Holders:
    """Each 'peer' is a folder laid out like a store; fetch copies a blob as the transfer would."""

    def __init__(self, root: Path):
        self.root, self.fetched = root, []

    def store(self, peer: str) -> VersionStore:
        return VersionStore(self.root / peer)

    def fetch(self, peer, name, dest, max_bytes, timeout=10.0, on_bytes=None):
        from coldfusion_p2p.swarm.transfer import _blob

        self.fetched.append((peer, name))
        blob = _blob(self.root / peer, name) if (self.root / peer).is_dir() else None
        if blob is None or (isinstance(blob, Path) and not blob.is_file()):
            raise BlobError(f"peer {peer[:12]} does not have {name}")
        data = blob if isinstance(blob, bytes) else blob.read_bytes()
        if len(data) > max_bytes:
            raise BlobError("too big")
        Path(dest).write_bytes(data)


def _certify(version: int, parent: str, new: str, signers=(0, 1)) -> Certificate:
    cert = Certificate("s", version, parent, new, "ab" * 8, tuple(PEERS))
    for i in signers:
        cert = cert.with_signature(PEERS[i], IDS[i].public_key, sign_certificate(cert, PEERS[i], IDS[i]))
    return cert


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    v0 = M.body_state(M.load_body_module(tiny_model_dir))
    h0 = M.hash_body(v0)
    holders = Holders(tmp_path / "peers")
    mine = VersionStore(tmp_path / "me")
    mine.save(v0, VersionInfo(0, h0, parent=None))
    announced: dict = {}

    def make_sync(store=mine, strategy=None):
        chain = CertChain("s", h0, 2)
        sync = HistorySync(store, chain, "me", 0.05, holders.fetch, lambda: dict(announced), log=lambda _m: None, strategy=strategy)
        sync.load_local()
        return sync

    return v0, h0, holders, mine, announced, make_sync


def _publish(holders, peer, body, version, certs):
    store = holders.store(peer)
    store.save(body, VersionInfo(version, M.hash_body(body), parent=certs[-1].parent if certs else None))
    store.save_certificates([c.to_dict() for c in certs])


def _step(body, scale):
    return {k: (v + scale * (0.01 + v.abs().mean()) if v.is_floating_point() else v) for k, v in body.items()}


def test_a_certified_honest_version_is_adopted_with_its_chain(world):
    v0, h0, holders, mine, announced, make_sync = world
    v1 = _step(v0, 0.001)
    cert = _certify(1, h0, M.hash_body(v1))
    _publish(holders, PEERS[0], v1, 1, [cert])
    announced[PEERS[0]] = (1, M.hash_body(v1))
    sync = make_sync()
    choice = sync.look((0, h0))
    assert (choice.version, choice.hash, choice.signers) == (1, M.hash_body(v1), 2)
    held = sync.acquire(choice, sync.latest_local())
    assert held.version == 1 and sorted(held.contributors) == sorted(PEERS)
    assert mine.load(1)[1].hash == M.hash_body(v1) and mine.certificates()[0]["hash"] == M.hash_body(v1)
    assert make_sync().latest_local().version == 1  # after a restart, the stored chain is accepted again


def test_forged_chains_are_refused_and_skipped(world):
    v0, h0, holders, mine, announced, make_sync = world
    wiped = {k: (v * -3 if v.is_floating_point() else v) for k, v in v0.items()}
    one_signer = _certify(1, h0, M.hash_body(wiped), signers=(0,))  # one member signed: min_group_size is 2
    _publish(holders, "forger", wiped, 1, [one_signer])
    orphans, parent = [], "7" * 64  # well signed, but the chain starts from a v0 that is not the swarm's
    for v in range(1, 6):
        orphans.append(_certify(v, parent, "8" * 64 if v == 5 else f"{v:064x}"))
        parent = orphans[-1].hash
    _publish(holders, "orphan", v0, 5, orphans)
    announced.update({"forger": (1, M.hash_body(wiped)), "orphan": (5, "8" * 64), "nobody": (9, "9" * 64)})
    sync = make_sync()
    assert sync.look((0, h0)) is None
    assert {k[0] for k in sync.skip.current()} == {1, 5, 9}
    assert "1 valid member signature(s), the swarm needs 2" in sync.skip.why[(1, M.hash_body(wiped))]
    assert "v1's parent 777777777777 is not a version this peer accepts" in sync.skip.why[(5, "8" * 64)]
    fetched = len(holders.fetched)
    assert sync.look((0, h0)) is None and len(holders.fetched) == fetched  # skipped: not fetched again
    assert [i.version for i in mine.list()] == [0]


def test_a_certified_body_that_moved_too_far_or_lies_about_its_hash_is_not_stored(world):
    v0, h0, holders, mine, announced, make_sync = world
    # enough forged identities to certify a version (an open swarm's limit), but the body moved 300%
    wiped = {k: (v * -2 if v.is_floating_point() else v) for k, v in v0.items()}
    _publish(holders, "sybil", wiped, 1, [_certify(1, h0, M.hash_body(wiped))])
    announced["sybil"] = (1, M.hash_body(wiped))
    sync = make_sync()
    choice = sync.look((0, h0))
    assert choice is not None and choice.version == 1  # the certificate checks out
    assert sync.acquire(choice, sync.latest_local()) is None  # the body does not
    assert "more than 1 honest round(s) can move it" in sync.skip.why[(1, M.hash_body(wiped))]
    assert [i.version for i in mine.list()] == [0]
    # a holder that serves other bytes under a certified hash
    v1 = _step(v0, 0.001)
    cert = _certify(1, h0, M.hash_body(v1))
    _publish(holders, "liar", v0, 1, [cert])  # stores v0's bytes under v1's folder
    info = json.loads((holders.root / "liar" / "versions" / "v000001" / "manifest.json").read_text())
    info["hash"] = M.hash_body(v1)
    (holders.root / "liar" / "versions" / "v000001" / "manifest.json").write_text(json.dumps(info))
    announced.clear()
    announced["liar"] = (1, M.hash_body(v1))
    sync = make_sync()
    choice = sync.look((0, h0))
    assert sync.acquire(choice, sync.latest_local()) is None
    assert "hash" in sync.skip.why[(1, M.hash_body(v1))]


def test_our_version_is_retired_only_after_the_winner_is_verified(world):
    v0, h0, holders, mine, announced, make_sync = world
    ours = _step(v0, 0.001)
    ours_cert = _certify(1, h0, M.hash_body(ours), signers=(0, 1))
    mine.save(ours, VersionInfo(1, M.hash_body(ours), parent=h0))
    mine.save_certificates([ours_cert.to_dict()])
    theirs = _step(v0, 0.002)
    theirs_cert = _certify(1, h0, M.hash_body(theirs), signers=(0, 1, 2))  # more signatures: it wins the fork rule
    announced["winner"] = (1, M.hash_body(theirs))
    sync = make_sync()
    choice = sync.look((1, M.hash_body(ours)))
    assert choice is None  # the winner's chain cannot be fetched yet: nothing changes
    assert mine.read_info(1).hash == M.hash_body(ours)
    sync.skip.until.clear()
    _publish(holders, "winner", theirs, 1, [theirs_cert])
    shutil.rmtree(holders.root / "winner" / "versions" / "v000001")  # the chain is there, the body is not
    choice = sync.look((1, M.hash_body(ours)))
    assert choice is not None and choice.hash == M.hash_body(theirs)
    assert sync.acquire(choice, sync.latest_local()) is None
    assert mine.read_info(1).hash == M.hash_body(ours), "our valid version was retired before its replacement was verified"
    _publish(holders, "winner", theirs, 1, [theirs_cert])
    sync.skip.until.clear()
    held = sync.acquire(sync.look((1, M.hash_body(ours))), sync.latest_local())
    assert held.hash == M.hash_body(theirs) and mine.read_info(1).hash == M.hash_body(theirs)
    assert any((mine.root / "retired").iterdir())


def test_a_holders_info_is_a_courtesy_that_cannot_break_the_store(world):
    v0, h0, holders, mine, announced, make_sync = world
    v1 = _step(v0, 0.001)
    cert = _certify(1, h0, M.hash_body(v1))
    _publish(holders, "odd", v1, 1, [cert])
    path = holders.root / "odd" / "versions" / "v000001" / "manifest.json"
    info = json.loads(path.read_text())
    nested: dict = {}
    for _ in range(5000):
        nested = {"x": nested}
    text = json.dumps({**info, "round_stats": {"round_s": 3.0, "deep": "x"}, "averaged_tensors": ["not.ours", 7]})
    path.write_text(text.replace('"created": ', '"created": 1' + "0" * 400 + ', "ignored": '))
    announced["odd"] = (1, M.hash_body(v1))
    sync = make_sync()
    held = sync.acquire(sync.look((0, h0)), sync.latest_local())
    assert held is not None and held.version == 1, sync.skip.why
    stored = mine.read_info(1)
    assert set(stored.round_stats) <= {"round_s"} and stored.averaged_tensors == [] and stored.created < 1e11


def test_a_nesterov_base_carries_its_momentum_and_a_forged_momentum_is_refused(world):
    """A late joiner downloads a nesterov base with its momentum (hashed and certified with it);
    a base whose momentum no honest run can have built is refused, as is momentum in a mean swarm."""
    from coldfusion_p2p.fusion import delta_norm
    from coldfusion_p2p.strategies import MOMENTUM, Nesterov

    v0, h0, holders, mine, announced, make_sync = world
    names = M.averaged_names(v0)
    bound = 0.05 * delta_norm([v0[n].float() for n in names])
    nesterov = Nesterov()
    honest = [t * (0.5 * bound / delta_norm([v0[n].float() for n in names])) for t in (v0[n].float() for n in names)]
    v1 = nesterov.step(v0, names, honest)  # moves 0.7 * 1.9 * half the bound: beyond one plain round, within nesterov's
    assert any(k.startswith(MOMENTUM) for k in v1)
    _publish(holders, PEERS[0], v1, 1, [_certify(1, h0, M.hash_body(v1))])
    announced[PEERS[0]] = (1, M.hash_body(v1))
    assert make_sync().acquire(make_sync().look((0, h0)), make_sync().latest_local()) is None  # a mean swarm refuses it
    sync = make_sync(strategy=nesterov)
    held = sync.acquire(sync.look((0, h0)), sync.latest_local())
    assert held is not None and held.version == 1, sync.skip.why
    assert torch.equal(mine.load(1)[0][MOMENTUM + names[0]], v1[MOMENTUM + names[0]])
    forged = dict(v1, **{MOMENTUM + n: v1[MOMENTUM + n] * 100 for n in names})
    _publish(holders, "forger", forged, 1, [_certify(1, h0, M.hash_body(forged))])
    announced.clear()
    announced["forger"] = (1, M.hash_body(forged))
    other = VersionStore(mine.root.parent / "other")
    other.save(v0, VersionInfo(0, h0, parent=None))
    sync = make_sync(other, strategy=nesterov)
    assert sync.acquire(sync.look((0, h0)), sync.latest_local()) is None
    assert "momentum" in sync.skip.why[(1, M.hash_body(forged))]
