"""A history no single node can rewrite, freeze or crash: real peers, a real outsider, loopback.

The outsider (``tests/outsider.py``) is a plain hivemind DHT node with fresh keys that knows the
bootstrap peer's address; the bad members (``tests/fault_peers.py``) run the honest code with one
deliberate fault. In each test the honest peers keep committing, no honest store holds a version
without a valid certificate chain, and no honest process exits early.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from coldfusion_p2p import model as M
from coldfusion_p2p.certs import max_drift
from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.fusion import delta_norm
from coldfusion_p2p.procs import child_env, cli_command
from coldfusion_p2p.store import VersionStore

ALL_OUTSIDER_ATTACKS = ("replace", "unservable", "nexthash", "plain", "phantoms", "levels", "verdicts", "manifest", "history",
                        "malformed", "leader")


def _verified_versions(store) -> list[dict]:
    got = subprocess.run(cli_command("versions", "--store", str(store), "--json", "--verify"), capture_output=True, text=True,
                         env=child_env(), timeout=60, check=False)
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)


def _assert_certified_and_bounded(store_dir, ratio: float = 0.05) -> list[int]:
    """Every version in the store has a valid certificate chain and moved at most one round's bound."""
    rows = _verified_versions(store_dir)
    assert rows and all(r["valid"] for r in rows), rows
    store = VersionStore(store_dir)
    versions = [r["version"] for r in rows]
    for v in versions[1:]:
        if v - 1 in versions:
            parent, _ = store.load(v - 1)
            child, _ = store.load(v)
            names = M.averaged_names(parent)
            moved = delta_norm([child[n].float() - parent[n].float() for n in names])
            assert moved <= max_drift(delta_norm([parent[n].float() for n in names]), ratio, 1) * 1.001, (v, moved)
    return versions


def test_an_outsider_with_forged_records_cannot_replace_freeze_or_crash_the_swarm(swarm, tmp_path):
    boot = swarm.start_bootstrap("tiny-bert", round_window=10.0)
    outsider = swarm.children.start([sys.executable, "-m", "tests.outsider", boot, "test", str(tmp_path), *ALL_OUTSIDER_ATTACKS],
                                    tmp_path / "outsider.log", env=child_env())
    swarm.wait_for(lambda: (tmp_path / "outsider.json").is_file() and "replace" in (tmp_path / "outsider.json").read_text(), 60,
                   "the outsider's first attacks")
    started, began = time.monotonic(), time.time()
    # peers that keep going (a peer that leaves right after its last commit could strand a slower one)
    procs = {"ann": swarm.join("ann", "sms_spam", rounds=100), "bob": swarm.join("bob", "rotten_tomatoes", rounds=100)}
    stores = {n: VersionStore(tmp_path / n) for n in ("ann", "bob", "cy")}
    swarm.wait_for(lambda: stores["ann"].read_info(1) is not None, 150, "v1 under attack")
    # a newcomer, under attack from its first look: it must find the certified history and contribute
    procs["cy"] = swarm.join("cy", "trec6", rounds=100)

    def newest(name):
        return max((i.version for i in stores[name].list()), default=0)

    swarm.wait_for(lambda: min(newest(n) for n in ("ann", "bob")) >= 5 and newest("cy") >= 3, 240,
                   "five versions under attack, and the newcomer's contributions")
    elapsed, ended = time.monotonic() - started, time.time()
    print(f"five versions under attack took {elapsed:.0f} s")
    assert all(p.poll() is None for p in procs.values())  # no honest process exited
    for name, proc in procs.items():
        swarm.children.signal_group(proc, 15)
        assert proc.wait(30) in (0, 130), swarm.log(name)
    assert outsider.poll() is None, swarm.log("outsider")  # the attacks went on the whole time

    attacks = json.loads((tmp_path / "outsider.json").read_text())
    replaced = [a["t"] for a in attacks if a["attack"] == "replace"]
    # it kept attacking the whole time: from before the first peer joined to the last round
    assert len(replaced) >= 3 and min(replaced) <= began and max(replaced) >= ended - 30, (began, ended, replaced)
    forged = {a["hash"] for a in attacks if a["attack"] == "replace" and "hash" in a}
    # the forged bases were really in the DHT while the peers ran: most of the outsider's stores took (on a
    # loaded CI machine one of its DHT stores can time out, which says nothing about the peers' defence)
    stores_of_forged = [bool(a.get("stored")) for a in attacks if a["attack"] == "replace" and "hash" in a]
    assert forged and sum(stores_of_forged) >= max(3, len(stores_of_forged) // 2), stores_of_forged
    hashes = {}
    for name in ("ann", "bob", "cy"):
        versions = _assert_certified_and_bounded(tmp_path / name)
        assert max(versions) >= 3, (name, versions)
        for info in stores[name].list():
            assert info.hash not in forged
            hashes.setdefault(info.version, set()).add(info.hash)
    assert all(len(h) == 1 for h in hashes.values()), hashes  # one history
    logs = swarm.log("ann", tail=None) + swarm.log("bob", tail=None) + swarm.log("cy", tail=None)
    assert "Traceback" not in logs
    # refused: for what its chain says when its server could be dialled, else for serving nothing
    # (tests/test_sync.py checks the content path deterministically, without a network)
    assert "not accepting the announced v" in logs, logs
    # liveness: 5 rounds of tiny-bert take ~30 s here without an attacker; phantoms may cost one window (the outsider's
    # matchmaking leader alone, before members followed only ready peers: no commit at all while it ran)
    assert elapsed < 150, f"5 rounds under attack took {elapsed:.0f}s"
    leader = [a for a in attacks if a["attack"] == "leader"]
    declared, taken = max((a.get("declared", 0) for a in leader), default=0), max((a.get("joins", 0) for a in leader), default=0)
    assert declared >= 20, f"the outsider declared itself a leader {declared} times: its attack was not tried"
    assert taken == 0, f"members asked the outsider's leader to take them in {taken} times: only ready peers lead"
    levels = [a for a in attacks if a["attack"] == "levels"]
    assert sum(bool(a.get("stored")) for a in levels) >= 3, levels  # its ready records at high redo levels were in the DHT
    # ready keys that never join: each honest peer stops waiting for them (and following their levels) once a group
    # formed without them
    phantoms = {p for a in levels for p in a["peers"]}
    for name in ("ann", "bob"):
        absent = {p for e in swarm.events(name) if e["event"] == "absent" for p in e["peers"]}
        assert phantoms <= absent, (name, phantoms, absent)

    status = subprocess.run(cli_command("status", "--initial-peers", boot, "--json"), capture_output=True, text=True,
                            env=child_env(), timeout=90, check=False)
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    assert snap["model"] == "tiny-bert" and snap["v0_hash"] == stores["ann"].read_info(0).hash  # not the forged manifest
    assert all(r["hash"] in hashes.get(r["version"], ()) for r in snap["rounds"]), snap["rounds"]
    assert [p["peer"] for p in snap["peers"] if p["role"] == "bootstrap"] == [snap["authority"]]


def _fault(swarm, tmp_path, name: str, fault: str, dataset: str, rounds: int) -> subprocess.Popen:
    store = tmp_path / name
    store.mkdir(exist_ok=True)
    opts = {"initial_peers": [swarm.initial_peer], "data": str(DEMO_DATA / f"{dataset}.jsonl"), "store": str(store), "rounds": rounds,
            "host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "threads": 1, "events": str(store / "events.jsonl"), "name": name}
    proc = swarm.children.start([sys.executable, "-m", "tests.fault_peers", fault, json.dumps(opts)], tmp_path / f"{name}.log", env=child_env())
    return proc


@pytest.mark.slow  # the reducers' weight and bound checks run in the default suite: tests/test_allreduce.py
def test_members_with_a_weight_or_a_delta_of_their_choosing_cannot_move_the_base(swarm, tmp_path):
    swarm.start_bootstrap("tiny-bert", round_window=20.0)
    honest = {n: swarm.join(n, d, rounds=100) for n, d in (("ann", "sms_spam"), ("bob", "rotten_tomatoes"), ("cy", "trec6"))}
    bad = {"heavy": _fault(swarm, tmp_path, "heavy", "weight", "sms_spam", 100), "wiper": _fault(swarm, tmp_path, "wiper", "scaled", "trec6", 100)}
    swarm.wait_for(lambda: all(VersionStore(tmp_path / n).read_info(2) for n in honest), 300, "v2 on every honest peer")
    assert all(p.poll() is None for p in honest.values())  # no honest process exited
    for name, proc in honest.items():
        swarm.children.signal_group(proc, 15)
        assert proc.wait(30) in (0, 130), swarm.log(name)
    bad_ids = {}
    for name in bad:
        joined = [e["peer"] for e in swarm.events(name) if e["event"] == "joined"]
        assert joined, swarm.log(name)
        bad_ids[name] = joined[-1]
    v0, _ = VersionStore(tmp_path / "ann").load(0)
    hashes = set()
    for name in honest:
        versions = _assert_certified_and_bounded(tmp_path / name)
        assert max(versions) >= 2
        store = VersionStore(tmp_path / name)
        for v in (1, 2):
            info = store.read_info(v)
            hashes.add((v, info.hash))
            assert not set(bad_ids.values()) & set(info.contributors), (v, info.contributors)  # the cheaters were cut out
        body, _ = store.load(2)
        names = M.averaged_names(body)
        assert delta_norm([body[n].float() for n in names]) > 0.9 * delta_norm([v0[n].float() for n in names])  # not wiped out
        offenders = {e["peer"]: e["reason"] for e in swarm.events(name) if e["event"] == "offender"}
        assert set(offenders) <= set(bad_ids.values())
    named = {e["peer"]: e["reason"] for n in honest for e in swarm.events(n) if e["event"] == "offender"}
    assert "claimed weight 1000" in named.get(bad_ids["heavy"], ""), named
    assert "beyond the round's bound" in named.get(bad_ids["wiper"], ""), named
    assert len({h for v, h in hashes if v == 2}) == 1
    for proc in bad.values():  # the bad members are not our concern here: stop them
        swarm.children.signal_group(proc, 15)


def test_a_newcomer_that_joins_groups_and_stalls_them_is_left_out_after_its_first_spoil(swarm, tmp_path):
    """A peer new to the swarm's history (a fresh key, as an outsider's) that is ready each round, joins the group and
    stalls its all-reduce spoiled an attempt of every round it was in: the members left it out of that round's redos
    only, and the next key was as fresh (red team: 12.7 commits a minute down to 4.1). Now a group that a newcomer
    spoiled leaves newcomers out of the next version (then 4, then 16): that round commits at its first attempt.
    (cy trains slowly on purpose, so that the spoiler is ready again before the next round starts.)"""
    swarm.start_bootstrap("tiny-bert", round_window=30.0)
    honest = {n: swarm.join(n, d, rounds=100) for n, d in (("ann", "sms_spam"), ("bob", "rotten_tomatoes"))}
    honest["cy"] = _fault(swarm, tmp_path, "cy", "slow", "trec6", 100)
    spoiler = _fault(swarm, tmp_path, "spoiler", "stall", "trec6", 100)
    swarm.wait_for(lambda: all(VersionStore(tmp_path / n).read_info(2) for n in ("ann", "bob")), 240, "v2 on ann and bob")
    assert all(p.poll() is None for p in honest.values())
    for name, proc in honest.items():
        swarm.children.signal_group(proc, 15)
        assert proc.wait(30) in (0, 130) or name == "cy", swarm.log(name)  # (cy and the spoiler run without the CLI)
    swarm.children.signal_group(spoiler, 15)
    spoiler.wait(30)
    spoiler_id = next(e["peer"] for e in swarm.events("spoiler") if e["event"] == "joined")
    stalled = [line for line in swarm.log("spoiler").splitlines() if line.startswith("stall: holding group")]
    assert stalled, swarm.log("spoiler")  # it did get into a group (v0's, where every peer is new)
    for name in ("ann", "bob"):
        events = swarm.events(name)
        infos = [VersionStore(tmp_path / name).read_info(v) for v in (1, 2)]
        assert all(spoiler_id not in i.contributors for i in infos), [i.contributors for i in infos]
        said = [e for e in events if e["event"] == "newcomers" and spoiler_id in e.get("peers", [])]
        assert said[0]["why"] == "spoiled" and said[0]["until"] >= 1, events  # v0's spoiled group: v1 leaves newcomers out
        committed = {e["version"]: e for e in events if e["event"] == "committed"}
        # on v1 the spoiler was ready (it was waited for on v0, and is again once it synced): left out, not waited for
        left_out = [e for e in said if e["t"] > committed[1]["t"] and e["why"] == "left out"]
        assert left_out and left_out[0]["t"] < committed[2]["t"], events
        tries_v1 = [e for e in events if e["event"] == "averaging" and committed[1]["t"] < e["t"] < committed[2]["t"]]
        assert [e["redo"] for e in tries_v1] == [0], tries_v1  # v2 at the first attempt
        assert not [e for e in events if e["event"] == "unverified" and committed[1]["t"] < e["t"] < committed[2]["t"]]
