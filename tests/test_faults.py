"""Faults with real peers on localhost: kills, restarts, late joiners, corrupt holders, liars."""

from __future__ import annotations

import json
import shutil
import signal
import sys

from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.procs import child_env
from coldfusion_p2p.store import VersionStore


def _peer_id(swarm, name: str) -> str:
    """The peer id of the latest run of ``name`` (a restarted peer has a new id)."""
    return [e["peer"] for e in swarm.events(name) if e["event"] == "joined"][-1]


def _hashes(tmp_path, names, version):
    return {VersionStore(tmp_path / n).read_info(version).hash for n in names if VersionStore(tmp_path / n).read_info(version)}


def test_restart_after_sigkill_late_joiner_and_corrupt_holder(swarm, tiny_model_dir, tmp_path):
    model = tmp_path / "lab-model"
    shutil.copytree(tiny_model_dir, model)
    swarm.start_bootstrap(str(model), min_group_size=3)
    shutil.rmtree(model)  # every contributor gets the model from the swarm
    stores = {n: VersionStore(tmp_path / n) for n in ("ann", "bob", "xia", "cat")}

    # phase 1: three peers; xia is SIGKILLed between rounds and restarted on the same store
    ann, bob = swarm.join("ann", "sms_spam", rounds=3), swarm.join("bob", "rotten_tomatoes", rounds=3)
    xia = swarm.join("xia", "trec6", rounds=3)
    swarm.wait_for(lambda: stores["xia"].read_info(2) is not None, 180, "v2 on xia")
    swarm.children.signal_group(xia, signal.SIGKILL)
    xia.wait(10)
    del swarm.peers["xia"]  # its non-zero exit is expected
    assert stores["ann"].read_info(3) is None  # two peers cannot fuse without the third (min group 3)
    xia = swarm.join("xia", "trec6", rounds=1)
    for name, proc in (("ann", ann), ("bob", bob), ("xia", xia)):
        assert swarm.wait(proc, name, 180) == 0, swarm.log(name)
    assert any(e["event"] == "resume" and e["version"] == 2 for e in swarm.events("xia"))
    assert len(_hashes(tmp_path, ("ann", "bob", "xia"), 3)) == 1

    # phase 2: ann and bob restart from v3; one of them holds a corrupted copy on disk; cat joins late
    ann, bob = swarm.join("ann", "sms_spam", rounds=1), swarm.join("bob", "rotten_tomatoes", rounds=1)
    swarm.wait_for(lambda: all(any(e["event"] == "resume" for e in swarm.events(n)) for n in ("ann", "bob")), 120, "ann and bob to resume")
    first_holder = min(("ann", "bob"), key=lambda n: _peer_id(swarm, n))
    body = stores[first_holder].body_path(3)
    raw = bytearray(body.read_bytes())
    raw[-100] ^= 0x55
    body.write_bytes(bytes(raw))
    cat = swarm.join("cat", "trec6", rounds=1)
    for name, proc in (("ann", ann), ("bob", bob), ("cat", cat)):
        assert swarm.wait(proc, name, 180) == 0, swarm.log(name)
    assert "served a bad version/3" in swarm.log("cat")
    assert [i.version for i in stores["cat"].list()] == [3, 4]
    stores["cat"].load(3)  # the copy it kept is the verified one
    assert len(_hashes(tmp_path, ("ann", "bob", "cat"), 4)) == 1
    assert len(stores["cat"].read_info(4).contributors) == 3


def test_alone_peer_waits_visibly_and_forks_nothing(swarm, tmp_path):
    swarm.start_bootstrap("tiny-bert")
    proc = swarm.join("solo", "sms_spam", "--max-wait", "12")
    assert swarm.wait(proc, "solo", 120) == 1
    log = swarm.log("solo")
    assert "waiting for peers: 1 ready on v0, the swarm needs 2" in log
    assert "error: waited 12s for a group on v0" in log
    assert [i.version for i in VersionStore(tmp_path / "solo").list()] == [0]
    del swarm.peers["solo"]


def _start_liar(swarm, tmp_path, mode: str):
    store = tmp_path / "liar"
    store.mkdir()
    opts = {"initial_peers": [swarm.initial_peer], "data": str(DEMO_DATA / "trec6.jsonl"), "store": str(store), "rounds": 1,
            "host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "model": "tiny-bert", "threads": 1}
    return swarm.children.start([sys.executable, "-m", "tests.liar", mode, json.dumps(opts)], tmp_path / "liar.log", env=child_env())


def _poisoned_round(swarm, tmp_path, mode: str, reason: str):
    swarm.start_bootstrap("tiny-bert", min_group_size=3)  # the liar must be in the group, however late it starts
    _start_liar(swarm, tmp_path, mode)
    swarm.join("ann", "sms_spam", rounds=1)
    swarm.join("bob", "rotten_tomatoes", rounds=1)

    def rejected(name):
        return any(e["event"] == "unverified" and any(reason in r for r in e["reasons"]) for e in swarm.events(name))

    swarm.wait_for(lambda: rejected("ann") and rejected("bob"), 180, "both honest peers to reject the poisoned average")
    for name in ("ann", "bob"):
        assert [i.version for i in VersionStore(tmp_path / name).list()] == [0], f"{name} committed a poisoned base"
        assert not any(e["event"] == "committed" for e in swarm.events(name))


def test_nan_delta_is_rejected_by_every_honest_peer(swarm, tmp_path):
    _poisoned_round(swarm, tmp_path, "nan", "NaN or Inf")


def test_delta_beyond_the_norm_bound_is_rejected(swarm, tmp_path):
    _poisoned_round(swarm, tmp_path, "huge", "exceeds the bound")
