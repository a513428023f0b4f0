"""Watching a swarm: signed metrics in the DHT, ``cfp2p status`` and the live views."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from rich.console import Console

from coldfusion_p2p import records as R
from coldfusion_p2p import swarm as S
from coldfusion_p2p.swarm.board import METRICS_TTL
from coldfusion_p2p.procs import child_env, cli_command
from coldfusion_p2p.status import render
from coldfusion_p2p.store import VersionStore


def _status(initial_peer: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("status", "--initial-peers", initial_peer, *extra), capture_output=True, text=True,
                          env=child_env(), timeout=90, check=False)


def _joined_peer(swarm, name: str) -> str:
    return next(e["peer"] for e in swarm.events(name) if e["event"] == "joined")


@pytest.mark.slow  # the suite's 15 minutes on 2 cores: ~50 s of it; other real swarms cover the default run
def test_status_reads_a_live_four_peer_swarm_and_forgets_peers_that_left(swarm, tmp_path):
    boot = swarm.start_bootstrap("tiny-bert", min_group_size=3)
    names = ("ann", "bob", "cy")
    procs = {n: swarm.join(n, d, rounds=2) for n, d in zip(names, ("sms_spam", "rotten_tomatoes", "trec6"))}
    swarm.wait_for(lambda: all(VersionStore(tmp_path / n).read_info(1) for n in names), 180, "v1 on every peer")

    got = _status(boot, "--once", "--json")
    assert got.returncode == 0, got.stderr
    snap = json.loads(got.stdout)
    assert snap["swarm"] == "test" and snap["model"] == "tiny-bert" and snap["min_group_size"] == 3
    peers = {p["name"]: p for p in snap["peers"]}
    assert set(peers) == {"bootstrap", *names}, peers.keys()
    assert snap["peers_online"] == 4 and snap["contributors_online"] == 3
    for name, p in peers.items():
        assert R.parse(R.KINDS[R.METRICS_KEY], {k: v for k, v in p.items() if k not in ("age_s", "lane_missed_by")}).peer == p["peer"]
        assert 0 <= p["age_s"] < METRICS_TTL and p["uptime"] > 0
    for n in names:
        p = peers[n]
        assert p["peer"] == _joined_peer(swarm, n) and p["role"] == "contributor" and p["device"] == "cpu"
        assert p["phase"] in ("training", "matchmaking", "averaging", "idle", "syncing") and p["version"] >= 1
        assert p["rounds"] >= 1 and p["last_round_seconds"] > 0  # it committed v1
        assert p["lane_missed"] == [] and p["lane_missed_by"] == 0  # every member's lane reached over loopback
        assert VersionStore(tmp_path / n).read_info(p["version"]).hash == p["hash"]
    assert peers["bootstrap"]["role"] == "bootstrap" and peers["bootstrap"]["phase"] == "serving"
    newest = snap["newest"]
    assert newest["version"] >= 1 and snap["rounds_completed"] == newest["version"]
    assert any(VersionStore(tmp_path / n).read_info(newest["version"]) and
               VersionStore(tmp_path / n).read_info(newest["version"]).hash == newest["hash"] for n in names)
    v1 = next(r for r in snap["rounds"] if r["version"] == 1)
    assert v1["hash"] == VersionStore(tmp_path / "ann").read_info(1).hash and v1["contributors"] == 3 and v1["round_s"] > 0
    # the heartbeat re-publishes the history from the stores: the round's duration must be kept there
    assert all(VersionStore(tmp_path / n).read_info(1).round_stats["round_s"] > 0 for n in names)

    for n, proc in procs.items():
        assert swarm.wait(proc, n, 180) == 0, swarm.log(n)
    # the contributors stopped publishing: they drop out once their records expire; the history stays
    deadline = time.monotonic() + METRICS_TTL + 30
    while True:
        later = json.loads(_status(boot, "--json").stdout)
        if later["peers_online"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert [p["name"] for p in later["peers"]] == ["bootstrap"]
    assert later["newest"]["version"] == 2 and later["newest"]["holders"] == 0  # committed, but its makers left
    assert {r["version"] for r in later["rounds"]} == {1, 2} and later["rounds_completed"] == 2
    assert all(r["contributors"] == 3 for r in later["rounds"])

    text = _status(boot, "--once")  # not a terminal: one rendering of the view, then exit
    assert text.returncode == 0 and "newest base v2" in text.stdout and "bootstrap" in text.stdout, text.stdout + text.stderr


def _metrics(records: S.SwarmRecords, name: str, **changes) -> dict:
    base = {"swarm": "s", "peer": records.peer_id, "name": name, "role": "contributor", "version": 0, "hash": "0" * 64,
            "phase": "training", "step": 1, "total": 10, "loss": 0.5, "examples_per_second": 3.0, "device": "cpu",
            "uptime": 1.0, "last_round_seconds": None, "rounds": 0, "reach": "direct", "t": S.dht_time()}
    return {**base, **changes}


def test_metrics_records_are_signed_and_schema_checked():
    from hivemind import DHT

    dhts = []
    try:
        ada = S.start_dht()
        dhts.append(ada)
        first = [str(a) for a in ada.get_visible_maddrs()]
        mallory = S.start_dht(first)
        dhts.append(mallory)
        reader = S.start_dht(first, client_mode=True)
        dhts.append(reader)
        a, m, r = S.SwarmRecords(ada, "s"), S.SwarmRecords(mallory, "s"), S.SwarmRecords(reader, "s")

        assert a.publish_metrics(_metrics(a, "ada"), wait=True)
        # mallory signs with its own key but claims ada's peer id: the key does not hash to that id
        assert not m.publish_metrics(_metrics(m, "evil", peer=a.peer_id), wait=True)
        # records that break the schema: an unknown phase, a loose type, an extra field
        assert not m.publish_metrics(_metrics(m, "m", phase="dancing"), wait=True)
        assert not m.publish_metrics(_metrics(m, "m", step=1.0), wait=True)
        assert not m.publish_metrics(_metrics(m, "m", secret="x"), wait=True)
        # a node without our validators, that stores whatever it is given (so, from now on, a
        # store "succeeds" on it: what counts is what validating readers see)
        raw = DHT(initial_peers=first, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        dhts.append(raw)
        m.publish_metrics(_metrics(m, "evil", peer=a.peer_id), wait=True)  # the raw node may keep this one
        # a node that validates nothing writes under ada's own subkey, without ada's signature:
        # it keeps its copy, but no validating node stores or returns it
        raw.store(R.METRICS_KEY, _metrics(a, "evil"), S.dht_time() + 10, subkey=ada.owner_subkey)
        assert m.publish_metrics(_metrics(m, "mallory"), wait=True)  # honest records of its own are fine

        deadline = time.monotonic() + 10
        seen: dict = {}
        while time.monotonic() < deadline:
            seen = {peer: x.name for peer, x in r.metrics().items()}
            if len(seen) == 2:
                break
            time.sleep(0.5)
        assert seen == {a.peer_id: "ada", m.peer_id: "mallory"}
    finally:
        for d in reversed(dhts):
            S.stop_process(d)


SNAPSHOT = {
    "swarm": "lab", "model": "all-MiniLM-L6-v2", "v0_hash": "ab" * 32, "min_group_size": 4, "time": 1_800_000_000.0,
    "newest": {"version": 3, "hash": "cd" * 32, "holders": 3}, "rounds_completed": 3, "peers_online": 4, "contributors_online": 3,
    "peers": [
        {"swarm": "lab", "peer": "QmBootBootBootBootBootBootBootBootBootBootBoot12", "name": "bootstrap", "role": "bootstrap",
         "version": 0, "hash": "ab" * 32, "phase": "serving", "step": 0, "total": 0, "loss": None, "examples_per_second": None,
         "device": "-", "uptime": 7200.0, "last_round_seconds": None, "rounds": 0, "t": 1_800_000_000.0, "age_s": 1.0},
        {"swarm": "lab", "peer": "QmAdaAdaAdaAdaAdaAdaAdaAdaAdaAdaAdaAdaAdaAdaAda1", "name": "ada", "role": "contributor",
         "version": 3, "hash": "cd" * 32, "phase": "training", "step": 12, "total": 24, "loss": 0.4321, "examples_per_second": 15.5,
         "device": "NVIDIA H100", "uptime": 600.0, "last_round_seconds": 41.0, "rounds": 3, "t": 1_800_000_000.0, "age_s": 2.0},
        {"swarm": "lab", "peer": "QmBenBenBenBenBenBenBenBenBenBenBenBenBenBenBen1", "name": None, "role": "contributor",
         "version": 2, "hash": "ef" * 32, "phase": "syncing", "step": 0, "total": 0, "loss": None, "examples_per_second": None,
         "device": "cpu", "uptime": 30.0, "last_round_seconds": None, "rounds": 0, "t": 1_800_000_000.0, "age_s": 3.0},
    ],
    "rounds": [
        {"version": 3, "hash": "cd" * 32, "parent": "12" * 32, "contributors": 3, "time": 1_800_000_000.0, "round_s": 41.0, "interval_s": 45.5},
        {"version": 2, "hash": "12" * 32, "parent": "34" * 32, "contributors": 2, "time": 1_799_999_950.0, "round_s": 5400.0, "interval_s": None},
    ],
}


def test_the_status_view_shows_the_swarm_at_a_glance():
    console = Console(record=True, width=150, color_system=None)
    console.print(render(SNAPSHOT))
    text = console.export_text()
    assert "swarm 'lab'" in text and "newest base v3 (cdcdcdcdcdcd) held by 3 online peer(s)" in text
    assert "4 peer(s) online (3 contributing)" in text and "3 round(s) completed" in text
    assert "fewer contributors online than the minimum group size (4)" in text
    cells = [line.strip("│ ") for line in text.splitlines()]
    lines = {c.split()[0]: c for c in cells if c.split() and c.split()[0] in ("ada", "bootstrap", "-")}
    assert "training" in lines["ada"] and "12/24" in lines["ada"] and "0.4321" in lines["ada"] and "15.5" in lines["ada"]
    assert "NVIDIA H100" in lines["ada"] and "10.0m" in lines["ada"] and "41s" in lines["ada"]
    assert "serving" in lines["bootstrap"] and "2.0h" in lines["bootstrap"]
    assert "syncing" in lines["-"] and "v2" in lines["-"]  # the peer with no display name, behind the newest base
    assert "no lane" not in text  # no one says it could not use a peer's lane
    history = [c for c in cells if c.startswith(("v3 ", "v2 "))]
    assert "cdcdcdcdcdcd" in history[0] and "46s" in history[0] and "1.5h" in history[1]


def test_status_counts_the_peers_that_could_not_use_a_peers_lane():
    """Each contributor says in its metrics whose lane it could not use in its last committed round; the view counts
    them for each peer (once per saying peer, its own word about itself ignored), so that a lane port others cannot
    reach shows before anyone reads a log."""
    from coldfusion_p2p.status import peer_rows
    from coldfusion_p2p.swarm import metrics_record

    def record(lane_missed):
        return R.parse(R.KINDS[R.METRICS_KEY], metrics_record(swarm="s", peer=SNAPSHOT["peers"][1]["peer"], role="contributor",
                                                              version=1, hash="a" * 64, phase="idle", uptime=1.0, lane_missed=lane_missed))

    ids = [p["peer"] for p in SNAPSHOT["peers"]]
    assert record(ids).lane_missed == ids and record(None).lane_missed is None  # the schema takes peer ids, at most 16
    assert record(["not a peer"]) is None and record(ids * 6).lane_missed == (ids * 6)[:16]  # the writer keeps 16
    too_long = {**record(ids).dict(), "lane_missed": ids * 6}
    assert R.parse(R.KINDS[R.METRICS_KEY], too_long) is None  # a reader refuses more

    ada, ben, boot = (SNAPSHOT["peers"][i]["peer"] for i in (1, 2, 0))
    metrics = {
        ada: {**SNAPSHOT["peers"][1], "lane_missed": [ben, ben, ada]},
        ben: {**SNAPSHOT["peers"][2], "rounds": 2, "lane_missed": []},
        boot: {**SNAPSHOT["peers"][0], "lane_missed": None},
    }
    peers = peer_rows(metrics, boot, now=1_800_000_001.0)
    by = {p["peer"]: p["lane_missed_by"] for p in peers}
    assert by == {ada: 0, ben: 1, boot: 0}, by
    console = Console(record=True, width=150, color_system=None)
    console.print(render({**SNAPSHOT, "peers": peers}))
    lines = [line for line in console.export_text().splitlines() if "no lane" in line]
    assert len(lines) == 1 and "no lane ×1" in lines[0] and "syncing" in lines[0], lines  # ben's row (no name: "-")


def test_other_peers_words_are_never_read_as_markup():
    evil = {**SNAPSHOT["peers"][1], "name": "[/x][link=https://example.invalid]click", "device": "[bold red]cpu[/"}
    console = Console(record=True, width=150, color_system=None)
    console.print(render({**SNAPSHOT, "peers": [evil]}))
    text = console.export_text()
    assert "[/x]" in text and "[bold red]" in text  # shown as typed, not interpreted (and no MarkupError)


def test_the_empty_view_says_so():
    console = Console(record=True, width=120, color_system=None)
    console.print(render({**SNAPSHOT, "newest": None, "peers": [], "rounds": [], "peers_online": 0, "contributors_online": 0}))
    text = console.export_text()
    assert "no base announced yet" in text and "(no peer is publishing metrics)" in text and "(no round committed yet)" in text


def test_join_progress_bars_follow_the_round():
    from coldfusion_p2p.cli.progress import JoinProgress

    console = Console(record=True, width=140, force_terminal=True, color_system=None)
    with JoinProgress(console) as bars:
        bars.log("joined swarm 'lab'")
        for done in (1 << 20, 3 << 20):
            bars("download_bytes", name="version/3", done=done, total=3 << 20)
        for step in range(1, 25):
            bars("train_step", step=step, total=24, loss=1.0 / step, version=3)
        bars("phase", state="ready", version=3)
        bars("waiting", ready=2, training=1)
        bars("allreduce")
        bars("committed", version=4, hash="ef" * 32, contributors=["a", "b", "c"])
    text = console.export_text()
    final = text[text.rindex("download"):]  # the last frame
    assert "joined swarm 'lab'" in text
    assert "download version/3" in final and "3.0/3.0 MiB" in final
    assert "train on v3" in final and "24/24" in final and "loss 0.0417" in final
    assert "committed v4" in final and "efefefefefef, 3 contributor(s)" in final
