"""Membership tokens, admission and enrollment rules, without a network."""

from __future__ import annotations

import json
import time

import pytest

from coldfusion_p2p.certs import Certificate, check_certificate, peer_id_of_public_key, sign_certificate
from coldfusion_p2p.config import SwarmManifest
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.membership import (
    CLOCK_SLACK, Admission, TokenError, make_token, parse_duration, parse_token, token_problem,
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
