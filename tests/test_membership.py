"""Membership tokens, admission and enrollment rules, without a network."""

from __future__ import annotations

import json
import time

import pytest

from coldfusion_p2p.certs import Certificate, check_certificate, lineage_digest, peer_id_of_public_key, sign_certificate
from coldfusion_p2p.config import SwarmManifest
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.membership import (
    CLOCK_SLACK, Admission, TokenError, make_line, make_token, parse_duration, parse_token, token_problem,
)
from coldfusion_p2p.swarm import Identity
from coldfusion_p2p.swarm.gate import EnrollDesk, RefusalLog
from hivemind.utils.crypto import RSAPrivateKey

AUTHORITY = Identity(RSAPrivateKey())
MEMBERS = [Identity(RSAPrivateKey()) for _ in range(3)]


def peer(identity: Identity) -> str:
    return peer_id_of_public_key(identity.public_key.encode())


def test_a_token_admits_its_own_key_only_within_its_life():
    now = time.time()
    token = make_token(AUTHORITY, "lab", "alice", MEMBERS[0].public_key, 3600.0, now)
    assert parse_token(json.dumps(token)) == token
    assert token_problem(token, "lab", peer(AUTHORITY), now, peer=peer(MEMBERS[0])) is None
    # the same token presented by another peer: stolen, useless without the key
    assert "not for this peer" in token_problem(token, "lab", peer(AUTHORITY), now, peer=peer(MEMBERS[1]))
    assert "swarm" in token_problem(token, "other", peer(AUTHORITY), now, peer=peer(MEMBERS[0]))
    assert "authority" in token_problem(token, "lab", peer(MEMBERS[2]), now, peer=peer(MEMBERS[0]))
    # clocks may differ by a few minutes, not more
    assert token_problem(token, "lab", peer(AUTHORITY), now + 3600 + CLOCK_SLACK / 2, peer=peer(MEMBERS[0])) is None
    assert "expired" in token_problem(token, "lab", peer(AUTHORITY), now + 3600 + CLOCK_SLACK * 2, peer=peer(MEMBERS[0]))
    assert "future" in token_problem(token, "lab", peer(AUTHORITY), now - CLOCK_SLACK * 2, peer=peer(MEMBERS[0]))
    assert "revoked" in token_problem(token, "lab", peer(AUTHORITY), now, peer=peer(MEMBERS[0]), revoked=[peer(MEMBERS[0])])


@pytest.mark.parametrize("change", [
    {"name": "mallory"}, {"expires": 9e12}, {"member": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"},
    {"key": MEMBERS[1].public_key}, {"swarm": "lab2"},
])
def test_a_changed_token_is_refused(change):
    token = make_token(AUTHORITY, "lab", "alice", MEMBERS[0].public_key, 3600.0)
    forged = {**token, **change}
    assert token_problem(forged, "lab", peer(AUTHORITY), time.time()) is not None


@pytest.mark.parametrize("junk", [None, "", "{", "[]", json.dumps({"kind": "cfp2p-token/1"}), "x" * 10000, {"a": 1}])
def test_junk_is_not_a_token(junk):
    assert token_problem(junk, "lab", peer(AUTHORITY), time.time()) is not None
    if junk:
        with pytest.raises(TokenError):
            parse_token(junk)


def test_a_token_signed_by_anyone_else_is_refused():
    token = make_token(MEMBERS[2], "lab", "alice", MEMBERS[0].public_key, 3600.0)  # self-made authority
    assert "authority" in token_problem(token, "lab", peer(AUTHORITY), time.time(), peer=peer(MEMBERS[0]))


def test_admission_remembers_checked_tokens_and_honours_revocation():
    adm = Admission("members", "lab", peer(AUTHORITY))
    token = make_token(AUTHORITY, "lab", "alice", MEMBERS[0].public_key, 3600.0)
    assert adm.knows(peer(MEMBERS[0])) is not None  # never presented one
    assert adm.admits(peer(MEMBERS[0]), token)
    assert adm.knows(peer(MEMBERS[0])) is None
    assert not adm.admits(peer(MEMBERS[1]), token)
    adm.revoked = frozenset([peer(MEMBERS[0])])
    assert "revoked" in adm.knows(peer(MEMBERS[0]))
    # an expired token's signatures still count (history stays); a revoked key's do not (it must not help certify)
    old = make_token(AUTHORITY, "lab", "bob", MEMBERS[1].public_key, 60.0, now=time.time() - 3600)
    assert adm.signed_by_member(peer(MEMBERS[1]), old)
    assert not adm.signed_by_member(peer(MEMBERS[2]), old)
    assert not adm.signed_by_member(peer(MEMBERS[0]), make_token(AUTHORITY, "lab", "alice", MEMBERS[0].public_key, 60.0))
    assert Admission().admits(peer(MEMBERS[1]), None)  # an open swarm admits everyone


def test_certificates_count_only_signers_with_tokens_in_a_private_swarm():
    cert = Certificate("lab", 1, "0" * 64, "1" * 64, "ab" * 8, tuple(peer(m) for m in MEMBERS[:2]))
    for m in MEMBERS[:2]:
        cert = cert.with_signature(peer(m), m.public_key, sign_certificate(cert, peer(m), m))
    adm = Admission("members", "lab", peer(AUTHORITY))
    assert check_certificate(cert, "lab", 2).ok
    assert not check_certificate(cert, "lab", 2, adm.signed_by_member).ok  # no tokens
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS[:2])}
    with_tokens = cert.with_tokens(tokens)
    assert check_certificate(with_tokens, "lab", 2, adm.signed_by_member).ok
    assert Certificate.from_dict(json.loads(json.dumps(with_tokens.to_dict()))).tokens == tokens
    swapped = cert.with_tokens({peer(MEMBERS[0]): tokens[peer(MEMBERS[1])], peer(MEMBERS[1]): tokens[peer(MEMBERS[0])]})
    assert not check_certificate(swapped, "lab", 2, adm.signed_by_member).ok


def _signed(version: int, parent: str, signers, tokens: dict, new: str | None = None) -> Certificate:
    """A certificate of (version, parent) signed by ``signers`` (its new hash names the version and its signers)."""
    new = new or (f"{version:02x}{len(signers):02x}".ljust(64, "0") if len(signers) < 3 else f"{version:02x}ff".ljust(64, "0"))
    cert = Certificate("lab", version, parent, new, "ab" * 8, tuple(sorted(peer(m) for m in signers)))
    for m in signers:
        cert = cert.with_signature(peer(m), m.public_key, sign_certificate(cert, peer(m), m))
    return cert.with_tokens({peer(m): tokens[peer(m)] for m in signers})


def _path(versions, parent: str, signers, tokens: dict, tag: str | None = None) -> list[Certificate]:
    """Certificates of ``versions``, each on the one before (the first on ``parent``); ``signers`` is a list, or a
    function of the version; with ``tag``, the new hashes are ``tag`` and the version (else ``_signed``'s)."""
    out = []
    for v in versions:
        who = signers(v) if callable(signers) else signers
        out.append(_signed(v, parent, who, tokens, new=f"{tag}{v:02x}".ljust(64, "0") if tag else None))
        parent = out[-1].hash
    return out


def test_a_revocation_withdraws_signatures_off_its_line_only_and_the_chain_drops_what_needed_them():
    from coldfusion_p2p.certs import CertChain

    ann, bob, cy = MEMBERS
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS)}
    adm = Admission("members", "lab", peer(AUTHORITY))
    chain = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    # v1..v4 made by ann and cy alone (groups of two), a v3 by all three on the side, and v5 on ann+cy's v4
    line = _path(range(1, 6), "0" * 64, [ann, cy], tokens)
    side = _signed(3, line[1].hash, [ann, bob, cy], tokens)
    assert chain.add_many(line) is None and chain.add(side) is None
    # without a line drawn, a revoked key's signatures count on nothing (a stolen key)
    adm.revoked = frozenset([peer(cy)])
    assert not adm.signed_by_member(peer(cy), tokens[peer(cy)], 1) and adm.withdrawn(peer(cy), 0)
    # the line at v2: what cy co-signed on v2's lineage stays certified, nothing else may lean on cy's key
    adm.signed_until = {peer(cy): make_line(2, line[1].hash, lineage_digest("0" * 64, [line[0].hash, line[1].hash]))}
    assert adm.signed_by_member(peer(cy), tokens[peer(cy)], 2) and not adm.signed_by_member(peer(cy), tokens[peer(cy)], 3)
    assert not adm.signed_by_member(peer(cy), tokens[peer(cy)])  # no version: no count
    assert adm.signed_by_member(peer(ann), tokens[peer(ann)], 99)
    revoked_signer = lambda c: any(p in adm.revoked for p in c.signatures)  # noqa: E731
    assert chain.recheck(suspect=revoked_signer, dry_run=True) == [(3, line[2].hash), (4, line[3].hash), (5, line[4].hash)]
    assert chain.accepts(5, line[4].hash)  # a dry run changes nothing
    dropped = chain.recheck(suspect=revoked_signer)
    assert dropped == [(3, line[2].hash), (4, line[3].hash), (5, line[4].hash)]  # v3 needed cy; v4 and v5 build on it
    assert chain.accepts(1, line[0].hash) and chain.accepts(2, line[1].hash)
    assert chain.accepts(3, side.hash) and chain.signers(3, side.hash) == 2  # ann and bob still certify it
    assert chain.recheck() == []  # nothing more to drop
    # cy and an accomplice sign new versions below the line after the revocation: off its lineage, refused
    forged = [_signed(1, "0" * 64, [ann, cy], tokens, new="f1".ljust(64, "0"))]
    forged.append(_signed(2, forged[0].hash, [ann, cy], tokens, new="f2".ljust(64, "0")))
    rival = _signed(2, line[0].hash, [ann, cy], tokens, new="e2".ljust(64, "0"))  # a rival v2 on the real v1
    for cert in (forged[0], rival):
        assert "off the history its revocation kept" in chain.add(cert)
        assert not chain.accepts(cert.version, cert.hash)
    # a newcomer's chain, built after the revocation, draws the same line
    fresh = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    assert fresh.add_many(line[:2] + [side]) is None
    assert all(fresh.accepts(c.version, c.hash) for c in line[:2] + [side])
    assert "1 valid member signature" in fresh.add(line[2])
    # a newcomer that sees the forged branch before the real history: it waits, unaccepted, until the line's
    # version shows up, and is then refused; the real history is accepted
    first = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    assert first.add_many(forged) is None and not any(first.accepts(c.version, c.hash) for c in forged)
    assert first.signers(2, forged[1].hash) == 0 and first.certificate(2, forged[1].hash) is None
    assert "off the history its revocation kept" in first.add_many(line[:2] + [rival])
    assert first.accepts(2, line[1].hash) and not first.accepts(2, rival.hash) and not first.accepts(1, forged[0].hash)
    # without a line, none of cy's signatures counts: ann+cy's history is not certified
    adm.signed_until = {}
    stolen = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    assert "1 valid member signature" in stolen.add(line[0])


def test_a_peer_whose_newest_versions_lose_their_certificate_to_a_revocation_goes_back_and_retires_them(tmp_path):
    """The fork a revocation made: ann and cy fused v3 and v4 before ann saw cy revoked (at v2). Once ann
    sees it, her v3 and v4 are no longer certified for anyone; she goes back to v2 and keeps them under retired/."""
    import torch

    from coldfusion_p2p import model as M
    from coldfusion_p2p.certs import CertChain
    from coldfusion_p2p.contributor import Contributor, JoinOptions
    from coldfusion_p2p.store import VersionInfo, VersionStore
    from coldfusion_p2p.sync import HistorySync

    ann, bob, cy = MEMBERS
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS)}
    lines, announced = [], []
    c = Contributor(JoinOptions(initial_peers=[], data="unused", store=str(tmp_path)), log=lines.append)
    c.store = VersionStore(tmp_path)
    bodies = [{"w": torch.full((3,), float(v))} for v in range(5)]
    hashes = [M.hash_body(b) for b in bodies]
    c.manifest = SwarmManifest.from_dict({"name": "lab", "admission": {"mode": "members"}})
    c.admission = Admission("members", "lab", peer(AUTHORITY))
    chain = CertChain("lab", hashes[0], 2, c.admission.signed_by_member, c.admission.lines)
    c.store.save(bodies[0], VersionInfo(0, hashes[0], None))
    certs = [_signed(v, hashes[v - 1], [ann, cy], tokens, new=hashes[v]) for v in range(1, 5)]
    for v, cert in enumerate(certs, 1):
        c.store.save(bodies[v], VersionInfo(v, hashes[v], hashes[v - 1], sorted(cert.members)))
    c.store.save_certificates([cert.to_dict() for cert in certs])
    c.history = HistorySync(c.store, chain, peer(ann), 0.05, fetch=None, announced=dict, log=lines.append)
    c.history.load_local()
    c.base = c.history.latest_local()
    c.records = type("Records", (), {"announce_base": lambda self, v, h, wait=False: announced.append((v, h))})()
    assert c.base.version == 4 and c._still_certified(c.base)

    c.admission.signed_until = {peer(cy): make_line(2, hashes[2], lineage_digest(hashes[0], hashes[1:3]))}
    c.admission.revoked = frozenset([peer(cy)])
    assert not c._still_certified(c.base)
    c._recheck_history = c._base_withdrawn = True
    c._check_standing()
    assert (c.base.version, c.base.hash) == (2, hashes[2]) and announced == [(2, hashes[2])]
    assert [i.version for i in c.store.list()] == [0, 1, 2] and not c._base_withdrawn
    retired = sorted(p.name for p in (tmp_path / "retired").iterdir())
    assert [n[:7] for n in retired if n.startswith("v")] == ["v000003", "v000004"]  # kept, never deleted
    assert [Certificate.from_dict(d).version for d in c.store.certificates()] == [1, 2]
    assert any("no longer certified" in line for line in lines)
    c._recheck_history = True
    c._check_standing()  # nothing more to drop: stays on v2
    assert c.base.version == 2 and len(announced) == 1
    # a newer line, at a version this peer has not seen: its history waits, kept, and it says so
    c.admission.signed_until = {peer(cy): make_line(5, "5" * 64, "f" * 64)}
    c._recheck_history = True
    c._check_standing()
    assert c.base.version == 2 and [i.version for i in c.store.list()] == [0, 1, 2] and len(announced) == 1
    assert any("waits for the version a revocation's line names" in line for line in lines)


def _records(entries, announced: dict, tokens: dict):
    """History records holding ``entries``, bases records ``announced`` (peer -> key), membership records ``tokens``."""
    from types import SimpleNamespace

    def entry(c):
        return SimpleNamespace(cert=c, v=c.get("version", 0) if isinstance(c.get("version"), int) else 0, hash=str(c.get("hash")))

    return SimpleNamespace(history=lambda: {f"p{i}": SimpleNamespace(entries=[entry(c)]) for i, c in enumerate(entries)},
                           announced=lambda: dict(announced), memberships=lambda: {p: json.dumps(t) for p, t in tokens.items()})


def test_the_bootstrap_peer_draws_the_line_at_the_head_of_the_history_it_follows_not_at_what_records_claim(tmp_path):
    """The bootstrap peer draws a revocation's line from records members wrote: a forged, malformed, foreign or
    unchained entry, or a huge version, must not move it, and an empty read must not lower it."""
    from coldfusion_p2p.bootstrap import lab as L
    from coldfusion_p2p.bootstrap.peer import HistoryFollower, _draw_revocation_line

    ann, bob, cy = MEMBERS
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS)}
    honest = _path(range(1, 5), "0" * 64, lambda v: [ann, bob] if v % 2 else [ann, cy], tokens)
    alone = _signed(5, honest[-1].hash, [cy], tokens)  # one signer: the swarm needs two
    unchained = _signed(2**53 - 1, "9" * 64, [ann, cy], tokens)  # two valid signers, but no chain back to v0
    huge = _signed(2**60, "9" * 64, [ann, cy], tokens)
    outsider = Identity(RSAPrivateKey())
    no_token = _signed(5, honest[-1].hash, [ann], tokens)
    no_token = no_token.with_signature(peer(outsider), outsider.public_key, sign_certificate(no_token, peer(outsider), outsider))
    bad_signature = _signed(5, honest[-1].hash, [ann, bob], tokens)
    bad_signature = bad_signature.with_signature(peer(bob), bob.public_key, bad_signature.signatures[peer(ann)][1])
    foreign = Certificate("other", 5, honest[-1].hash, "6" * 64, "ab" * 8, tuple(sorted(peer(m) for m in (ann, bob))))
    for m in (ann, bob):
        foreign = foreign.with_signature(peer(m), m.public_key, sign_certificate(foreign, peer(m), m))
    junk = [alone.to_dict(), unchained.to_dict(), huge.to_dict(), no_token.to_dict(), bad_signature.to_dict(),
            foreign.with_tokens(tokens).to_dict(), {"version": 99}, {}, {"version": 50, "signatures": "x"}]
    junk_keys = [(c.version, c.hash) for c in (alone, unchained, no_token, bad_signature, foreign)]
    announced = {peer(ann): (4, honest[-1].hash), peer(bob): (4, honest[-1].hash), peer(cy): junk_keys[0],
                 **{f"Qm{'x' * 40}{i}": key for i, key in enumerate(junk_keys)}}  # throwaway writers: not members
    manifest = SwarmManifest.from_dict({"name": "lab", "model": {"v0_hash": "0" * 64}, "admission": {"mode": "members"}})
    admission = Admission("members", "lab", peer(AUTHORITY))
    follower = HistoryFollower(manifest, admission, peer(AUTHORITY))
    assert follower.update(_records(junk + [c.to_dict() for c in honest], announced, tokens)) == (4, honest[-1].hash)
    assert follower.update(_records([], {}, {})) == (4, honest[-1].hash)  # an empty (or withheld) read keeps the head
    (tmp_path / L.REVOKED_FILE).write_text(json.dumps([peer(cy)]))
    logged = []
    assert _draw_revocation_line(str(tmp_path), manifest, follower, {peer(cy)}, logged.append, waited=1.0)
    assert manifest.admission.signed_until == {peer(cy): make_line(4, honest[-1].hash, lineage_digest("0" * 64, [c.hash for c in honest]))}
    assert "v4" in logged[-1] and manifest.validate()
    digest = lineage_digest("0" * 64, [c.hash for c in honest])
    assert [Certificate.from_dict(c).hash for c in follower.paths[digest]] == [c.hash for c in honest]  # kept, to serve
    # restarted with a head from the lab's file and nothing seen yet: the line waits for the members' history
    restarted = HistoryFollower(manifest, admission, peer(AUTHORITY), head=(2, honest[1].hash))
    fresh_manifest = SwarmManifest.from_dict({"name": "lab", "model": {"v0_hash": "0" * 64}, "admission": {"mode": "members"}})
    assert not _draw_revocation_line(str(tmp_path), fresh_manifest, restarted, {peer(cy)}, logged.append, waited=10.0)
    assert fresh_manifest.admission.signed_until == {}
    assert restarted.update(_records([c.to_dict() for c in honest], announced, tokens)) == (4, honest[-1].hash)
    assert _draw_revocation_line(str(tmp_path), fresh_manifest, restarted, {peer(cy)}, logged.append, waited=10.0)
    # nothing ever seen, after the grace period: the key's signatures count on nothing (the line at v0)
    empty_manifest = SwarmManifest.from_dict({"name": "lab", "model": {"v0_hash": "0" * 64}, "admission": {"mode": "members"}})
    blind = HistoryFollower(empty_manifest, admission, peer(AUTHORITY))
    blind.update(_records([], {}, {}))
    assert not _draw_revocation_line(str(tmp_path), empty_manifest, blind, {peer(cy)}, logged.append, waited=10.0)
    assert _draw_revocation_line(str(tmp_path), empty_manifest, blind, {peer(cy)}, logged.append, waited=600.0)
    assert empty_manifest.admission.signed_until == {peer(cy): make_line(0, "0" * 64, lineage_digest("0" * 64, []))}


def test_the_revoked_key_and_an_accomplice_cannot_aim_the_line_at_a_fork_of_their_own():
    """A fork of bare certificates, higher than the real head and announced by the revoked peer and one
    accomplice: the line goes to the version most other members announce."""
    from coldfusion_p2p.bootstrap.peer import HistoryFollower

    ann, bob, cy = MEMBERS
    dan = Identity(RSAPrivateKey())
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS + [dan])}
    honest, decoy = _path(range(1, 5), "0" * 64, [ann, bob], tokens, "a"), _path(range(1, 10), "0" * 64, [cy, dan], tokens, "d")
    manifest = SwarmManifest.from_dict({"name": "lab", "model": {"v0_hash": "0" * 64}, "admission": {"mode": "members"}})
    follower = HistoryFollower(manifest, Admission("members", "lab", peer(AUTHORITY)), peer(AUTHORITY))
    throwaway = {f"Qm{'y' * 40}{i}": (9, decoy[-1].hash) for i in range(5)}  # owner keys with no membership token
    announced = {peer(ann): (4, honest[-1].hash), peer(bob): (4, honest[-1].hash),
                 peer(cy): (9, decoy[-1].hash), peer(dan): (9, decoy[-1].hash), **throwaway}
    follower.update(_records([c.to_dict() for c in honest + decoy], announced, tokens))
    assert follower.chain.accepts(9, decoy[-1].hash)  # a certified fork, as far as certificates go
    assert follower.head_for({peer(cy)}) == (4, honest[-1].hash)
    # with the accomplice revoked as well, the honest members still decide
    assert follower.head_for({peer(cy), peer(dan)}) == (4, honest[-1].hash)
    # the peer being revoked announces an old version to pull its line down: one honest member at v4 is enough
    lone = {peer(ann): (4, honest[-1].hash), peer(cy): (1, honest[0].hash)}
    follower.update(_records([c.to_dict() for c in honest], lone, tokens))
    assert follower.head == (4, honest[-1].hash) and follower.head_for({peer(cy)}) == (4, honest[-1].hash)
    # membership records are the writers' own: junk, someone else's token or none admits nobody, and breaks nothing
    junk_members = _records([c.to_dict() for c in honest + decoy], announced, {})
    junk_members.memberships = lambda: {peer(ann): "{", peer(bob): 5, peer(cy): json.dumps(tokens[peer(ann)]), peer(dan): None}
    blank = HistoryFollower(manifest, Admission("members", "lab", peer(AUTHORITY)), peer(AUTHORITY))
    assert blank.update(junk_members) is None and blank.announcers == {}


def test_a_certificate_forged_for_a_version_on_the_line_does_not_carry_the_revoked_key_onto_a_forged_path():
    """The revoked key and an accomplice sign a path of their own from v0 and a certificate for the line's own
    (version, hash) on top of it. A newcomer that links theirs first must not count the key on that path."""
    from coldfusion_p2p.certs import CertChain

    ann, bob, cy = MEMBERS
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS)}
    honest, forged = _path(range(1, 5), "0" * 64, [ann, cy], tokens), _path(range(1, 4), "0" * 64, [bob, cy], tokens, "b")
    top = _signed(4, forged[-1].hash, [bob, cy], tokens, new=honest[-1].hash)  # the line's (version, hash), forged parent
    adm = Admission("members", "lab", peer(AUTHORITY), frozenset([peer(cy)]),
                    {peer(cy): make_line(4, honest[-1].hash, lineage_digest("0" * 64, [c.hash for c in honest]))})
    newcomer = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    assert newcomer.add_many(forged + [top]) is None
    newcomer.add_many(honest)
    assert not any(newcomer.accepts(c.version, c.hash) for c in forged + honest)  # waits; never the forged path
    member = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)  # holds the real history already
    assert member.add_many(honest) is None and all(member.accepts(c.version, c.hash) for c in honest)
    assert "off the history its revocation kept" in member.add_many(forged)
    assert not any(member.accepts(c.version, c.hash) for c in forged)


def test_a_line_ahead_of_a_peer_keeps_its_history_waiting_not_dropped_and_junk_off_the_target_is_ignored():
    from coldfusion_p2p.certs import CertChain

    ann, bob, cy = MEMBERS
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS)}
    line = _path(range(1, 5), "0" * 64, [ann, cy], tokens)
    adm = Admission("members", "lab", peer(AUTHORITY))
    chain = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    junk = [_signed(1, "0" * 64, [ann, cy], tokens, new=f"e{i:03x}".ljust(64, "0")) for i in range(5)]
    assert chain.add_many(junk + line[:3], target=(3, line[2].hash)) is None
    assert not any(chain.accepts(1, j.hash) or chain.certificate(1, j.hash) for j in junk)  # off the target's lineage
    # cy revoked with its line at v4, which this peer (at v3) has not seen: v1..v3 wait, nothing is dropped
    adm.revoked, adm.signed_until = frozenset([peer(cy)]), {peer(cy): make_line(4, line[3].hash, lineage_digest("0" * 64, [c.hash for c in line]))}
    assert chain.recheck(suspect=lambda c: peer(cy) in c.signatures, dry_run=True) == []
    assert chain.recheck(suspect=lambda c: peer(cy) in c.signatures) == [] and not chain.accepts(3, line[2].hash)
    assert chain.add(line[3]) is None and all(chain.accepts(c.version, c.hash) for c in line)
    # a full waiting room makes way for the lineage asked for, not the other way round
    import coldfusion_p2p.certs as C

    small, saved = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines), C.MAX_PENDING
    C.MAX_PENDING = 4
    try:
        for i, j in enumerate(_signed(1, "0" * 64, [bob, cy], tokens, new=f"c{i:03x}".ljust(64, "0")) for i in range(4)):
            small.add_many([j], target=(1, j.hash))
        assert len(small._pending) == 4
        assert small.add_many(line, target=(4, line[3].hash)) is None and all(small.accepts(c.version, c.hash) for c in line)
        # a line whose own lineage holds more leaning versions than the waiting room: a newcomer still takes it whole
        long_line = _path(range(1, 8), "0" * 64, [ann, cy], tokens, "d")
        parent = long_line[-1].hash
        adm.signed_until = {peer(cy): make_line(7, parent, lineage_digest("0" * 64, [c.hash for c in long_line]))}
        newcomer = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
        assert newcomer.add_many(long_line, target=(7, parent)) is None
        assert all(newcomer.accepts(c.version, c.hash) for c in long_line)
    finally:
        C.MAX_PENDING = saved


def test_a_newcomer_takes_a_history_whose_revocation_line_lies_on_a_branch_that_lost_a_fork(tmp_path):
    """cy co-signed v1 and v2, then branch A (ann+cy) made v3 and v4 while branch B (ann+bob) made v3..v5.
    cy's line was drawn at A's v4; B won the fork rule, so nobody serves A any more. A newcomer fetches
    B's history, finds v1 and v2 waiting for the line, and gets the line's path from the authority."""
    from coldfusion_p2p.certs import CertChain
    from coldfusion_p2p.store import VersionStore
    from coldfusion_p2p.sync import HistorySync

    ann, bob, cy = MEMBERS
    tokens = {peer(m): make_token(AUTHORITY, "lab", f"m{i}", m.public_key, 3600.0) for i, m in enumerate(MEMBERS)}
    shared = _path((1, 2), "0" * 64, [ann, cy], tokens)
    a, b = _path((3, 4), shared[-1].hash, [ann, cy], tokens, "a"), _path((3, 4, 5), shared[-1].hash, [ann, bob], tokens, "b")
    digest = lineage_digest("0" * 64, [c.hash for c in shared + a])
    adm = Admission("members", "lab", peer(AUTHORITY), frozenset([peer(cy)]), {peer(cy): make_line(4, a[-1].hash, digest)})
    served = {"certs": [c.to_dict() for c in shared + b], f"line/{digest}": [c.to_dict() for c in shared + a]}
    asked = []

    def fetch(who, name, dest, max_bytes, timeout=10.0, on_bytes=None):
        asked.append((who, name))
        key = "certs" if name.startswith("certs/") else name
        if key not in served or (key != "certs" and who != peer(AUTHORITY)):
            raise RuntimeError("missing")
        dest.write_text(served[key] if isinstance(served[key], str) else json.dumps(served[key]))

    # the authority's answer is checked like any holder's: junk, or certificates off the line, change nothing
    for junk in ("{", json.dumps({"a": 1}), json.dumps([{"version": "x"}]), json.dumps([c.to_dict() for c in shared + b])):
        served[f"line/{digest}"] = json.loads(junk) if junk.startswith(("[", "{\"")) else junk
        lost = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
        probe = HistorySync(VersionStore(tmp_path / "probe"), lost, peer(ann), 0.05, fetch, lambda: {peer(bob): (5, b[-1].hash)}, log=print)
        probe.line_source = peer(AUTHORITY)
        assert probe.look(None) is None and not lost.accepts(5, b[-1].hash)
    served[f"line/{digest}"] = [c.to_dict() for c in shared + a]
    chain = CertChain("lab", "0" * 64, 2, adm.signed_by_member, adm.lines)
    sync = HistorySync(VersionStore(tmp_path), chain, peer(MEMBERS[0]), 0.05, fetch, lambda: {peer(bob): (5, b[-1].hash)}, log=print)
    assert sync.look(None) is None and chain.links(5, b[-1].hash) and not chain.accepts(5, b[-1].hash)  # waits
    sync.line_source = peer(AUTHORITY)
    sync.skip = type(sync.skip)()
    choice = sync.look(None)
    assert (peer(AUTHORITY), f"line/{digest}") in asked
    assert choice is not None and (choice.version, choice.hash) == (5, b[-1].hash)
    assert all(chain.accepts(c.version, c.hash) for c in shared + a + b)


def test_the_revocation_line_travels_in_the_manifest_and_the_lab(tmp_path):
    cy, other = peer(MEMBERS[2]), "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    line = make_line(7, "a" * 64, "f" * 64)
    m = SwarmManifest.from_dict({"admission": {"mode": "members", "revoked": [cy], "signed_until": {cy: line}}})
    assert m.admission.signed_until == {cy: line} and SwarmManifest.from_dict(m.to_dict()).admission.signed_until == {cy: line}
    bad_lines = [7, {"version": -1}, {"version": 2**53}, {"version": 1.5}, {"version": True}, {"hash": "A" * 64},
                 {"lineage": "xyz"}, {"x": 1}]
    for bad in [{cy: b if not isinstance(b, dict) else {**line, **b}} for b in bad_lines] + [{cy: {"version": 3, "hash": "a" * 64}},
                                                                                          {"alice": line}, [cy]]:
        with pytest.raises(UserError, match="signed_until"):
            SwarmManifest.from_dict({"admission": {"signed_until": bad}})
    state = Admission("members", "lab", peer(AUTHORITY), frozenset([cy]), {cy: line}).state()
    assert json.loads(json.dumps(state)) == state and Admission.from_state(state).lines() == {cy: (7, "a" * 64, "f" * 64)}
    from coldfusion_p2p.bootstrap import lab as L

    (tmp_path / L.REVOKED_FILE).write_text(json.dumps([cy, other, "Qm not a peer id with spaces 0000000"]))
    assert L.revoked(tmp_path) == sorted([cy, other])  # a typo in the file never reaches a signed manifest
    L.record_signed_until(tmp_path, {cy: line})
    L.record_signed_until(tmp_path, {other: make_line(9, "b" * 64, "f" * 64)})
    assert L.signed_until(tmp_path) == {cy: line, other: make_line(9, "b" * 64, "f" * 64)}
    # cy un-revoked, then revoked again later: the new line is the one published and kept, not the old one
    (tmp_path / L.REVOKED_FILE).write_text(json.dumps([other]))
    L.record_signed_until(tmp_path, {})
    assert L.signed_until(tmp_path) == {other: make_line(9, "b" * 64, "f" * 64)}
    (tmp_path / L.REVOKED_FILE).write_text(json.dumps([cy, other]))
    L.record_signed_until(tmp_path, {cy: make_line(50, "c" * 64, "f" * 64)})
    assert L.signed_until(tmp_path)[cy] == make_line(50, "c" * 64, "f" * 64)
    (tmp_path / L.SIGNED_UNTIL_FILE).write_text(json.dumps({cy: 7, other: {"version": 2**60, "hash": "b" * 64, "lineage": "f" * 64}}))
    assert L.signed_until(tmp_path) == {}  # old or out-of-range lines are left out, never signed
    L.record_followed_head(tmp_path, (12, "d" * 64))
    assert L.followed_head(tmp_path) == (12, "d" * 64)
    (tmp_path / L.SIGNED_UNTIL_FILE).write_text("[1, 2")
    assert L.signed_until(tmp_path) == {}


def test_enroll_desk_limits_new_keys_per_address_and_hour_but_renews_known_ones(tmp_path):
    keys = [Identity(RSAPrivateKey()) for _ in range(5)]
    desk = EnrollDesk(AUTHORITY, "lab", "enroll", 86400.0, per_address=2, per_hour=3, registry=tmp_path / "members.json")
    now = time.time()
    ask = lambda k, addr, t=now: desk.decide(peer(k), {"key": k.public_key, "name": None}, addr, t)  # noqa: E731
    assert "token" in ask(keys[0], "10.0.0.1") and "token" in ask(keys[1], "10.0.0.1")
    assert "from 10.0.0.1" in ask(keys[2], "10.0.0.1")["refused"]
    assert "less than a minute ago" in ask(keys[0], "10.0.0.1")["refused"]  # renewals: at most one a minute
    assert "token" in ask(keys[0], "10.0.0.1", now + 61)  # a renewal is not a new key
    assert "token" in ask(keys[2], "10.0.0.2")
    assert "in the last hour" in ask(keys[3], "10.0.0.3")["refused"]
    assert "token" in ask(keys[3], "10.0.0.3", now + 3700)  # an hour later
    assert "not the caller's own" in desk.decide(peer(keys[4]), {"key": keys[0].public_key}, "10.0.0.4", now)["refused"]
    assert set(json.loads((tmp_path / "members.json").read_text())) == {peer(k) for k in keys[:4]}
    members_only = EnrollDesk(AUTHORITY, "lab", "members", 86400.0, 2, 3, None)
    assert "members only" in members_only.decide(peer(keys[4]), {"key": keys[4].public_key}, "x", now)["refused"]


def test_refusals_are_logged_once_a_minute_per_kind_and_caller():
    lines = []
    log = RefusalLog("[x] ", every=60.0, write=lines.append)
    for _ in range(5):
        log("a request to join a group", "QmA…", "no membership token")
    log("a download of 'version/0'", "QmA…", "no membership token")
    log("a download of 'version/1'", "QmA…", "no membership token")
    assert len(lines) == 2 and "refused a request to join a group from QmA…: no membership token" in lines[0]


def test_durations_and_manifest_admission_settings():
    assert parse_duration("30d") == 30 * 86400 and parse_duration("12h") == 43200 and parse_duration("90") == 90
    for bad in ("", "-1d", "soon", "0d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(UserError, match="admission.mode"):
        SwarmManifest.from_dict({"admission": {"mode": "closed"}})
    with pytest.raises(UserError, match="peer ids"):
        SwarmManifest.from_dict({"admission": {"revoked": ["alice"]}})
    assert SwarmManifest.from_dict({"admission": {"mode": "enroll", "enroll_days": 7}}).admission.enroll_days == 7.0


def test_a_member_whose_token_expires_mid_run_is_told_what_to_do(tmp_path):
    from coldfusion_p2p.contributor import Contributor, JoinOptions

    peer_ = Contributor(JoinOptions(initial_peers=[], data="unused", store=str(tmp_path), token="alice.token"), log=lambda _: None)
    peer_.token = make_token(AUTHORITY, "lab", "alice", MEMBERS[0].public_key, 60.0, now=time.time() - 3600)
    with pytest.raises(UserError, match=r"expired at .*cfp2p bootstrap admit.*--token"):
        peer_._check_standing()
    fresh = Contributor(JoinOptions(initial_peers=[], data="unused", store=str(tmp_path), token="alice.token"), log=lambda _: None)
    fresh.token = make_token(AUTHORITY, "lab", "alice", MEMBERS[0].public_key, 3600.0)
    fresh._check_standing()  # valid: nothing to say
    fresh._fatal = "the swarm's authority revoked this peer's membership"
    with pytest.raises(UserError, match="revoked"):
        fresh._check_standing()
