"""Private swarms with real peers on loopback: only members read, write, average or download."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from coldfusion_p2p.certs import Certificate
from coldfusion_p2p.membership import make_token
from coldfusion_p2p.procs import child_env, cli_command
from coldfusion_p2p.store import VersionStore
from coldfusion_p2p.swarm import peer_of_maddr

PATHS = ("dht-read", "dht-write", "join", "part", "download")
EXPLICIT = {"join": "PROTOCOL_VIOLATION", "part": "PROTOCOL_VIOLATION", "download": "refused"}  # the gate's own answers


def _certs(store_root):
    return [Certificate.from_dict(c) for c in VersionStore(store_root).certificates()]


def _newest(store: VersionStore) -> int:
    return max((i.version for i in store.list()), default=0)


def test_members_only_swarm_refuses_an_intruder_on_every_path_and_cuts_a_revoked_member(swarm, tmp_path):
    boot = swarm.start_lab("tiny-bert")
    creds = {n: swarm.member(n) for n in ("ann", "bob", "cy")}
    tokens = {n: json.loads(t.read_text()) for n, (_, t) in creds.items()}
    # an intruder with a key of its own: a token the authority issued it that expired an hour ago,
    # and ann's token (stolen, without ann's key)
    subprocess.run(cli_command("id", "--identity", str(tmp_path / "intruder.key")), check=True, capture_output=True, env=child_env())
    from coldfusion_p2p.bootstrap import lab as L

    intruder_key = subprocess.run(cli_command("id", "--identity", str(tmp_path / "intruder.key")), check=True, capture_output=True,
                                  text=True, env=child_env()).stdout.strip()
    expired = make_token(L.authority(str(swarm.lab)), "test", "former", intruder_key, 3600.0, now=time.time() - 7200)
    (tmp_path / "expired.token").write_text(json.dumps(expired))
    targets = tmp_path / "targets.txt"
    targets.write_text("\n".join([peer_of_maddr(boot)] + [t["member"] for t in tokens.values()]) + "\n")

    procs = {n: swarm.join(n, ds, "--identity", str(creds[n][0]), "--token", str(creds[n][1]), rounds=100)
             for n, ds in (("ann", "sms_spam"), ("bob", "rotten_tomatoes"), ("cy", "trec6"))}
    intruder = swarm.children.start([sys.executable, "-m", "tests.intruder", boot, "test", str(tmp_path), str(targets),
                                     str(creds["ann"][1]), str(tmp_path / "expired.token")], tmp_path / "intruder.log", env=child_env())
    stores = {n: VersionStore(tmp_path / n) for n in procs}
    swarm.wait_for(lambda: min(_newest(stores[n]) for n in procs) >= 1, 240, "a version by three members under attack")

    # revoke cy: the bootstrap peer signs a new manifest; every peer cuts cy, and cy stops with one line
    out = subprocess.run(cli_command("bootstrap", "revoke", "cy", "--lab", str(swarm.lab)), capture_output=True, text=True, env=child_env())
    assert out.returncode == 0 and tokens["cy"]["member"] in out.stdout, out.stderr
    cy = swarm.peers.pop("cy")
    assert cy.wait(90) == 2, swarm.log("cy")
    assert "revoked this peer's membership" in swarm.log("cy", tail=None) and "Traceback" not in swarm.log("cy", tail=None)

    swarm.wait_for(lambda: swarm.logged("ann", "more revoked peer(s)") and swarm.logged("bob", "more revoked peer(s)"), 60,
                   "the members to see the new manifest")
    seen = time.time()

    def made_after_revocation() -> list[Certificate]:
        """Certificates of versions whose round began after the members saw the revocation (their parent came later)."""
        created = {i.hash: i.created for i in stores["ann"].list()}
        return [c for c in _certs(tmp_path / "ann") if created.get(c.parent, 0) > seen]

    swarm.wait_for(lambda: made_after_revocation() and _newest(stores["bob"]) >= _newest(stores["ann"]), 150,
                   "a version of a round after the revocation")
    assert all(tokens["cy"]["member"] not in c.members for c in made_after_revocation())  # cut from the next round
    # the bootstrap peer drew the revocation's line at the members' newest certified version: cy's signatures
    # count up to it and no further, and the members' whole history checks out under it, for a newcomer too
    from coldfusion_p2p.certs import CertChain
    from coldfusion_p2p.config import SwarmManifest
    from coldfusion_p2p.membership import Admission

    line = L.signed_until(swarm.lab).get(tokens["cy"]["member"])
    assert line is not None and line["version"] >= 1, L.signed_until(swarm.lab)
    assert f"their signatures count on v{line['version']} ({line['hash'][:12]}) and its ancestors" in (
        tmp_path / "bootstrap.log").read_text(errors="replace")
    kept = json.loads((swarm.lab / L.STORE_DIR / "lines" / f"{line['lineage']}.json").read_text())  # served as line/<digest>
    assert [c["hash"] for c in kept][-1] == line["hash"] and len(kept) == line["version"]
    settings = SwarmManifest.from_toml(swarm.lab / L.CONFIG_FILE)
    newcomer = Admission("members", "test", peer_of_maddr(boot), frozenset([tokens["cy"]["member"]]), {tokens["cy"]["member"]: line})
    for name in ("ann", "bob"):
        chain = CertChain("test", stores[name].read_info(0).hash, settings.round.min_group_size, newcomer.signed_by_member,
                          newcomer.lines)
        certs = _certs(tmp_path / name)
        assert chain.add_many(certs) is None and all(chain.accepts(c.version, c.hash) for c in certs)
    assert all(p.poll() is None for n, p in procs.items() if n != "cy")  # no member process exited
    # a member's view of the swarm: the intruder's metrics never reached it; members are listed with their expiry
    key, token = swarm.member("watcher")
    intruder_peer = json.loads((tmp_path / "expired.token").read_text())["member"]
    seen = set()
    for _ in range(3):  # one look may miss a peer whose metrics record is being refreshed
        status = subprocess.run(cli_command("status", "--initial-peers", boot, "--json", "--identity", str(key), "--token", str(token)),
                                capture_output=True, text=True, timeout=120, env=child_env())
        assert status.returncode == 0, status.stderr
        view = json.loads(status.stdout)
        assert not any(p["peer"] == intruder_peer or p.get("name") == "intruder" for p in view["peers"]), view["peers"]
        seen |= {p.get("name") for p in view["peers"]}
        if {"ann", "bob"} <= seen:
            break
    assert {"ann", "bob"} <= seen
    members = {m["name"]: m for m in view["members"]}
    assert view["admission"] == "members" and {"ann", "bob"} <= set(members)
    assert members["ann"]["expires"] == tokens["ann"]["expires"] and not members["ann"]["revoked"]
    assert "cy" not in members or members["cy"]["revoked"]
    assert intruder.poll() is None, swarm.log("intruder")
    for name in ("ann", "bob"):
        swarm.children.signal_group(procs[name], 15)
        assert procs[name].wait(30) in (0, 130), swarm.log(name)

    # every path, with every credential, was tried and refused
    attempts = [json.loads(line) for line in (tmp_path / "intruder.json").read_text().splitlines()]
    for path in PATHS:
        for credential in ("none", "stolen", "expired"):
            tried = [a for a in attempts if a["path"] == path and a["credential"] == credential]
            assert tried, (path, credential)
            assert not any(a["admitted"] for a in tried), [a for a in tried if a["admitted"]][:3]
            if path in EXPLICIT:  # refused by the gate itself, not by a failed connection
                assert any(EXPLICIT[path] in a["detail"] for a in tried), (path, credential, tried[:3])
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace") for n in ("bootstrap", "ann", "bob")}
    assert "refused a DHT call" in logs["bootstrap"] + logs["ann"] + logs["bob"]
    assert "expired" in "".join(logs.values()) and "a token works only with its own key" in "".join(logs.values())
    for what in ("a request to join a group", "a part of an all-reduce", "a download of"):
        assert f"refused {what}" in logs["ann"] + logs["bob"], what
    assert "Traceback" not in "".join(logs.values())
    # certificates carry their signers' tokens, and one history
    hashes = {}
    for name in ("ann", "bob"):
        for cert in _certs(tmp_path / name):
            assert set(cert.signatures) <= set(cert.tokens)
        for info in stores[name].list():
            hashes.setdefault(info.version, set()).add(info.hash)
    assert all(len(h) == 1 for h in hashes.values()), hashes


def test_a_peer_without_a_token_is_told_how_to_get_one(swarm, tmp_path):
    boot = swarm.start_lab("tiny-bert")
    proc = swarm.join("eve", "sms_spam", rounds=1)
    assert swarm.wait(proc, "eve", 90) == 2
    log = swarm.log("eve", tail=None)
    assert "admits members only" in log and "cfp2p id" in log and "Traceback" not in log
    assert boot


@pytest.mark.slow
def test_enroll_mode_admits_new_keys_within_the_rate_limit(swarm, tmp_path):
    from coldfusion_p2p.swarm.gate import ask_to_enroll
    from coldfusion_p2p.identity import load_identity, new_identity_file

    boot = swarm.start_lab("tiny-bert", admission="enroll", extra_toml="[admission]\nenroll_per_address = 3\n")
    procs = {n: swarm.join(n, ds, rounds=1) for n, ds in (("ann", "sms_spam"), ("bob", "rotten_tomatoes"))}
    for name, proc in procs.items():
        assert swarm.wait(proc, name, 180) == 0, swarm.log(name)
        assert "enrolled in swarm 'test'" in swarm.log(name, tail=None)
        assert (tmp_path / name / "membership.token").is_file()
    answers = []
    for i in range(3):  # one more new key is within the limit of 3 an hour from this address; the next is not
        key = tmp_path / f"new{i}.key"
        new_identity_file(str(key))
        answers.append(ask_to_enroll([boot], str(key), peer_of_maddr(boot), f"new{i}", load_identity(str(key)).public_key))
    assert "token" in answers[0]
    assert "token" not in answers[1] and "in the last hour" in answers[1]["refused"]
    assert "refused an enrollment" in swarm.log("bootstrap", tail=None)
