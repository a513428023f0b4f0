"""The leader lookup loop of matchmaking: hivemind's own loop against the paced one this project runs.

The loop runs on hivemind's real ``PotentialLeaders``; only the DHT lookup it makes is a stand-in
that takes 2 ms and counts calls (the real lookups are counted by bench/scale.py)."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
import torch
from hivemind.averaging.matchmaking import PotentialLeaders
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p.swarm.averager import FIRST_LOOKUP_INTERVAL, LEADER_LOOKUP_INTERVAL, _paced_leader_lookups


class CountingKeys:
    current_key = "k"

    def __init__(self):
        self.times: list[float] = []

    async def get_averagers(self, key, only_active):
        self.times.append(time.monotonic())
        await asyncio.sleep(0.002)  # about what a lookup among local peers takes
        return []


async def _lookups_while_leading(loop_fn, seconds: float) -> list[float]:
    """Run a lookup loop for ``seconds`` the way a leader's matchmaking drives it: hivemind's
    ``pop_next_leader`` asks for a new look whenever it has none (a leader never has an earlier one)."""
    me = PeerID(b"\x00\x04test")  # any id: nobody dials it
    leaders, keys = PotentialLeaders(me, 3.0, None), CountingKeys()
    leaders.running.set()
    leaders.search_end_time = float("inf")
    task = asyncio.create_task(loop_fn(leaders, keys))
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await leaders.update_finished.wait()
        leaders.update_finished.clear()
        leaders.update_triggered.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return [t - t0 for t in keys.times]


def test_hivemind_alone_looks_up_back_to_back_and_the_paced_loop_does_not():
    unpaced = asyncio.run(_lookups_while_leading(PotentialLeaders._update_queue_periodically, 1.0))
    paced = asyncio.run(_lookups_while_leading(_paced_leader_lookups, 1.0))
    assert len(unpaced) > 50, f"hivemind's loop made only {len(unpaced)} lookups in a second: is the stand-in too slow?"
    # the pauses grow from FIRST_LOOKUP_INTERVAL, doubling, to LEADER_LOOKUP_INTERVAL: a few more looks
    # in the first tenths of a second (peers ready together find each other), then the steady pace
    assert len(paced) <= 1.0 / LEADER_LOOKUP_INTERVAL + 4, f"{len(paced)} lookups in a second"
    assert paced[0] < 0.05, "the first look must not wait"
    gaps = [b - a for a, b in zip(paced, paced[1:])]
    schedule = [min(FIRST_LOOKUP_INTERVAL * 2**k, LEADER_LOOKUP_INTERVAL) for k in range(len(gaps))]
    assert gaps and all(g >= 0.9 * want for g, want in zip(gaps, schedule)), (gaps, schedule)
    assert gaps[-1] >= 0.9 * LEADER_LOOKUP_INTERVAL, gaps


# --- the early start, with real averagers (DHT, averager process, p2pd) on loopback -------------------
MATCHMAKING = 8.0  # long, so that a group that waits out the whole time is told apart from one that begins early


def _step(averagers, expects: dict[int, list[str]], prefix: str, late: dict[int, float] | None = None):
    """One step on every averager, each told whom its round waits for: seconds to each one's result, and its group."""
    late = late or {}
    for i, av in enumerate(averagers):
        av.set_round(prefix, None, 2, expect=expects[i])
    t0, controls = time.monotonic(), {}
    for i in sorted(range(len(averagers)), key=lambda i: late.get(i, 0.0)):
        time.sleep(max(0.0, t0 + late.get(i, 0.0) - time.monotonic()))
        controls[i] = averagers[i].step(weight=1.0, gather={"expect": expects[i]}, timeout=3 * MATCHMAKING, wait=False)
    done, results = {}, {}
    while len(done) < len(controls):
        for i, c in controls.items():
            if i not in done and c.done():
                done[i] = time.monotonic() - t0
                results[i] = c.result()
        time.sleep(0.02)
    _step.leaders = [results[i]["leader"] for i in sorted(results)]  # whom each member says formed its group
    return [done[i] for i in sorted(done)], [sorted(results[i]["group"]) for i in sorted(results)]


def test_a_leader_begins_once_its_group_holds_every_peer_that_any_member_waits_for(tmp_path):
    from tests.test_allreduce import three_averagers
    from coldfusion_p2p.swarm.node import peer_str

    inputs = [[torch.full((1000,), float(i))] for i in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_early_warmup", None, matchmaking_time=MATCHMAKING) as (_, averagers):
        ids = [peer_str(av.peer_id) for av in averagers]
        everyone = {i: sorted(ids) for i in range(3)}

        # every member waits for the same three peers: the leader begins as soon as they are in
        times, groups = _step(averagers, everyone, "t_early_same_view")
        assert all(g == sorted(ids) for g in groups), groups
        assert len(set(_step.leaders)) == 1 and _step.leaders[0] in ids, _step.leaders  # one leader, named alike by all
        assert max(times) < MATCHMAKING * 0.6, f"a complete group waited {max(times):.1f}s of the {MATCHMAKING}s matchmaking time"

        # one member waits for a peer that never comes (a made-up id): the group waits out the whole time
        phantom = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
        times, groups = _step(averagers, {**everyone, 1: sorted(ids + [phantom])}, "t_early_phantom")
        assert all(g == sorted(ids) for g in groups), groups
        assert min(times) > MATCHMAKING * 0.7, f"a group began after {min(times):.1f}s although a member still waited for a peer"

        # the first peer saw only itself and the second ready; the second also saw the third, which comes
        # 2.5 s later: whoever leads, the group waits for the third (the union of its members' views)
        views = {0: sorted(ids[:2]), 1: sorted(ids), 2: sorted(ids)}
        times, groups = _step(averagers, views, "t_early_wider_view", late={2: 2.5})
        assert all(g == sorted(ids) for g in groups), groups
        assert max(times) < MATCHMAKING, times


def test_whom_a_member_waits_for_counts_only_as_a_short_list_of_ids():
    """A join request's ``expect`` is any member's word: anything but a list of at most MAX_GROUP strings
    counts as saying nothing (and so brings back the whole matchmaking time), and never raises."""
    from hivemind.utils.serializer import MSGPackSerializer as S

    from coldfusion_p2p.swarm.averager import MAX_GROUP, FusionAverager

    class Reader:
        serializer = S
        _user_in = FusionAverager._user_in
        _expect_in = FusionAverager._expect_in

    def blob(user):
        return S.dumps([1.0, 0, S.dumps(user)])

    reader, a, b = Reader(), "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmZDr8wSWRTkTqZ7k6GytPPUBvDx4LfU3GrpVtRfSX3sDd"
    assert reader._expect_in(blob({"expect": [a, b], "examples": 3})) == {a, b}
    for junk in ({"expect": "ab"}, {"expect": [1, 2]}, {"expect": []}, {"expect": [a] * (MAX_GROUP + 1)},
                 {"expect": [a, "x" * 10**6]}, {"expect": [a, "not a peer id"]}, {"expect": {a: 1}}, {}, [1, 2], None, "expect"):
        assert reader._expect_in(blob(junk)) is None, junk
    for raw in (b"", b"\xff\x00junk", S.dumps([1.0]), S.dumps([1.0, 0, b"\xc1"])):
        assert reader._expect_in(raw) is None


@pytest.mark.parametrize("hostile", ["outside_loop", "ready_hold"])
def test_a_leader_that_sends_members_round_in_a_loop_or_holds_them_past_its_start_holds_up_no_group(tmp_path, monkeypatch, hostile):
    """A node declares itself the earliest leader of the round at every look and takes in every member that asks.

    ``outside_loop``: a node outside the round's ready peers that at once sends the member back to itself as the
    leader to follow. hivemind's follower asks whomever it is sent to from inside the same request: before the
    guard every member's step failed with a RecursionError within seconds. A member now follows no redirect to a
    leader outside the round's ready peers, nor to one it was sent from already.

    ``ready_hold``: one of the round's ready peers (every member waits for it) that keeps each member until just
    before the member's own start would end the wait, and forms no group. hivemind's follower waits for its own
    start, so such a leader held every member at every attempt. A member now waits for the start the leader
    declared (and a request's timeout), and asks a leader that held it past that no more this round.

    Either way the two members form their group without it, each asking it once."""
    import threading
    from collections import Counter

    from coldfusion_p2p.swarm import start_dht
    from coldfusion_p2p.swarm.averager import FusionAverager, make_averager
    from coldfusion_p2p.swarm.node import peer_str
    from tests.outsider import _declare, _hostile_leader
    from tests.test_allreduce import three_averagers

    joins = tmp_path / "joins.txt"
    inputs = [[torch.full((1000,), float(i))] for i in range(2)]
    with three_averagers(tmp_path, inputs, "none", "t_hostile_warmup", None, matchmaking_time=MATCHMAKING) as (dhts, averagers):
        ids = sorted(peer_str(av.peer_id) for av in averagers)
        hostile_dht = start_dht([str(a) for a in dhts[0].get_visible_maddrs()], ["/ip4/127.0.0.1/tcp/0"])
        leader, stop = None, threading.Event()
        try:
            monkeypatch.setattr(FusionAverager, "rpc_join_group", _hostile_leader(joins, redirect_every=1 if hostile == "outside_loop" else 0))
            leader = make_averager(hostile_dht, "t", [torch.zeros(4)], tmp_path / "hostile", "none", 3.0, 30.0, 2)
            monkeypatch.undo()  # forked with the hostile handler; the members' averagers forked before it
            view = ids if hostile == "outside_loop" else sorted(ids + [peer_str(hostile_dht.peer_id)])

            def declare():  # earlier than any member's declaration, at every look
                subkey = hostile_dht.peer_id.to_bytes()
                while not stop.is_set():
                    hostile_dht.run_coroutine(functools.partial(_declare, key="t_hostile.0b", subkey=subkey,
                                                                expiration=get_dht_time() + 0.6), return_future=True).result(timeout=5)
                    stop.wait(0.2)

            thread = threading.Thread(target=declare, daemon=True)
            thread.start()
            time.sleep(1.0)  # declared before the members look
            times, groups = _step(averagers, {0: view, 1: view}, "t_hostile")
        finally:
            stop.set()
            if leader is not None:
                leader.shutdown()
            hostile_dht.shutdown()
    asked = Counter(joins.read_text().split()) if joins.is_file() else Counter()
    assert asked, "no member asked the hostile leader: the attack was not tried"
    assert max(asked.values()) == 1, f"a member asked the hostile leader more than once: {dict(asked)}"
    assert groups == [ids, ids], groups
    # a group that waits for a ready peer that never joins it begins at its leader's start (MATCHMAKING)
    limit = MATCHMAKING * 0.6 if hostile == "outside_loop" else MATCHMAKING + 2.0
    assert max(times) < limit, f"the group formed after {max(times):.1f}s (limit {limit}s)"
