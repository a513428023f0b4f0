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


def _step(averagers, expects: dict[int, list[str]], prefix: str, late: dict[int, float] | None = None,
          left_out: dict[int, list[str]] | None = None, timeouts: dict[int, float] | None = None,
          known: dict[int, list[str]] | None = None):
    """One step on every averager, each told whom its round waits for (and leaves out): seconds to each one's result,
    and its group. ``timeouts[i]``: averager i gives up after that many seconds (3 matchmaking times unless given);
    ``known[i]``: the recent signers of the base's line in averager i's view (none unless given)."""
    late, left_out, timeouts, known = late or {}, left_out or {}, timeouts or {}, known or {}
    for i, av in enumerate(averagers):
        av.set_round(prefix, None, 2, expect=expects[i], left_out=left_out.get(i, []), known=known.get(i, []))
    t0, controls = time.monotonic(), {}
    for i in sorted(range(len(averagers)), key=lambda i: late.get(i, 0.0)):
        time.sleep(max(0.0, t0 + late.get(i, 0.0) - time.monotonic()))
        gather = {"expect": expects[i], "left_out": left_out.get(i, [])}
        controls[i] = averagers[i].step(weight=1.0, gather=gather, timeout=timeouts.get(i, 3 * MATCHMAKING), wait=False)
    done, results = {}, {}
    while len(done) < len(controls):
        for i, c in controls.items():
            if i not in done and c.done():
                done[i] = time.monotonic() - t0
                try:
                    results[i] = c.result()
                except Exception:  # noqa: BLE001 - no group for this one
                    results[i] = {"leader": None, "group": None}
        time.sleep(0.02)
    _step.leaders = [results[i]["leader"] for i in sorted(results)]  # whom each member says formed its group
    return [done[i] for i in sorted(done)], [results[i]["group"] and sorted(results[i]["group"]) for i in sorted(results)]


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


def test_a_leader_takes_in_only_the_ready_peers_of_its_round_and_those_its_ready_followers_wait_for(tmp_path):
    """hivemind's leader took in any peer that knew the round's key, and a stranger in a group spoiled its all-reduce
    (red team: 17 commits a minute down to 8). A peer that neither member saw ready now gets into no group; one that
    only a member saw ready (the wider view in the test above) still does."""
    from tests.test_allreduce import three_averagers
    from coldfusion_p2p.swarm.node import peer_str

    inputs = [[torch.full((1000,), float(i))] for i in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_stranger_warmup", None, matchmaking_time=4.0) as (_, averagers):
        ids = [peer_str(av.peer_id) for av in averagers]
        # the stranger steps last, so that the others declared themselves earlier: it asks one of them to lead it
        # (one that declared itself first would lead no one: a member follows only a ready peer it saw); a member
        # that waits for a made-up peer keeps the group open for the whole matchmaking time, as a stranger's view could
        phantom = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
        views = {0: sorted(ids[:2] + [phantom]), 1: sorted(ids[:2]), 2: sorted(ids)}
        # (it finds no group: it gives up after 6 s, once the others' 4 s matchmaking time is over)
        times, groups = _step(averagers, views, "t_stranger", late={2: 0.5}, timeouts={2: 6.0})
        assert groups[0] == groups[1] == sorted(ids[:2]), groups
        assert groups[2] in (None, [ids[2]]), groups


def test_a_leader_takes_in_no_peer_that_a_follower_it_took_in_leaves_out(tmp_path):
    """A peer's guard against newcomers is its own (``protocol.Newcomers``): a leader whose guard was down took in a
    newcomer that its guarded followers left out, and the newcomer spoiled the group (red team). A follower now says
    whom it leaves out, and its leader takes none of the newcomers among them in (nor a follower that leaves out a
    member it took); but not two rounds in a row, not where the known ready peers cannot form a group alone (v0),
    and never a known peer: a member that named every other ready peer and asked first split rounds (red team)."""
    from tests.test_allreduce import three_averagers
    from coldfusion_p2p.swarm.node import peer_str

    inputs = [[torch.full((1000,), float(i))] for i in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_left_out_warmup", None, matchmaking_time=4.0) as (_, averagers):
        ids = [peer_str(av.peer_id) for av in averagers]
        two_known = {i: ids[:2] for i in range(3)}  # 0 and 1 signed the base's line lately; 2 is a newcomer
        # 0 leads with its guard down and waits for everyone; 1 follows it, leaving 2 (a newcomer) out; 2 asks last
        views = {0: sorted(ids), 1: sorted(ids[:2]), 2: sorted(ids)}
        # 2 is refused, so it finds no group: it gives up after 6 s (past 0's 4 s matchmaking time, so it asks
        # while 0's group is open) instead of waiting out three matchmaking times in each step
        times, groups = _step(averagers, views, "t_left_out_x0", late={1: 0.3, 2: 1.0}, left_out={1: [ids[2]]},
                              timeouts={2: 6.0}, known=two_known)
        assert groups[0] == groups[1] == sorted(ids[:2]), groups
        assert groups[2] in (None, [ids[2]]), groups
        assert max(times[:2]) < 4.0, times  # 2 is not waited for: the group began once it held 0 and 1
        # the round's redo: 0 also waits for a peer that never comes; its group stays open, and 2 asks while it is
        phantom = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
        views = {0: sorted(ids + [phantom]), 1: sorted(ids[:2]), 2: sorted(ids)}
        times, groups = _step(averagers, views, "t_left_out_x1", late={1: 0.3, 2: 1.0}, left_out={1: [ids[2]]},
                              timeouts={2: 6.0}, known=two_known)
        assert groups[0] == groups[1] == sorted(ids[:2]), groups
        assert groups[2] in (None, [ids[2]]), groups
        everyone = {i: sorted(ids) for i in range(3)}
        # the next round: kept out on a follower's word in the round before, 2 is taken in (a member that left a
        # newcomer out of every round would keep it from ever signing a version, so a newcomer for ever)
        # where no peer is known (v0), no follower's word keeps anyone out: the known ready peers could form no group alone
        # and a known peer is taken in, whether it asks after the follower that leaves it out or before
        for step, late, known in (("t_next_x0", {1: 0.3, 2: 1.0}, two_known), ("t_v0_x0", {1: 0.3, 2: 1.0}, {}),
                                  ("t_known_after_x0", {1: 0.3, 2: 1.0}, {i: ids for i in range(3)}),
                                  ("t_known_before_x0", {2: 0.3, 1: 1.0}, {i: ids for i in range(3)})):
            times, groups = _step(averagers, everyone, step, late=late, left_out={1: [ids[2]]}, known=known)
            assert groups == [sorted(ids)] * 3, (step, groups)
            assert max(times) < 4.0, (step, times)  # one complete group, begun without waiting out the matchmaking time


def test_whom_a_member_waits_for_counts_only_as_a_short_list_of_ids():
    """A join request's ``expect`` is any member's word: anything but a list of at most MAX_GROUP strings
    counts as saying nothing (and so brings back the whole matchmaking time), and never raises."""
    from hivemind.utils.serializer import MSGPackSerializer as S

    from coldfusion_p2p.swarm.averager import MAX_GROUP, FusionAverager

    class Reader:
        serializer = S
        _user_in = FusionAverager._user_in
        _peers_in = FusionAverager._peers_in
        _expect_in = FusionAverager._expect_in
        _left_out_in = FusionAverager._left_out_in

    def blob(user):
        return S.dumps([1.0, 0, S.dumps(user)])

    reader, a, b = Reader(), "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmZDr8wSWRTkTqZ7k6GytPPUBvDx4LfU3GrpVtRfSX3sDd"
    assert reader._expect_in(blob({"expect": [a, b], "examples": 3})) == {a, b}
    for junk in ({"expect": "ab"}, {"expect": [1, 2]}, {"expect": []}, {"expect": [a] * (MAX_GROUP + 1)},
                 {"expect": [a, "x" * 10**6]}, {"expect": [a, "not a peer id"]}, {"expect": {a: 1}}, {}, [1, 2], None, "expect"):
        assert reader._expect_in(blob(junk)) is None, junk
    for raw in (b"", b"\xff\x00junk", S.dumps([1.0]), S.dumps([1.0, 0, b"\xc1"])):
        assert reader._expect_in(raw) is None
    # whom a member leaves out (``left_out``, binding its leader) is read the same way: anything else leaves out no one
    assert reader._left_out_in(blob({"left_out": [a], "expect": [a, b]})) == {a} and reader._left_out_in(blob({})) == frozenset()
    for junk in ({"left_out": "ab"}, {"left_out": [1]}, {"left_out": [a] * (MAX_GROUP + 1)}, {"left_out": [a, "not a peer id"]},
                 {"left_out": {a: 1}}, [1, 2], None):
        assert reader._left_out_in(blob(junk)) == frozenset(), junk
    for raw in (b"", b"\xff\x00junk", S.dumps([1.0])):
        assert reader._left_out_in(raw) == frozenset()


HOSTILE_LEADERS = {  # case -> (whether members count it among the round's ready peers, what it does with each join)
    "stranger": (False, ("loop", "hold", "alone")),
    "ready_hold": (True, ("hold",)),
    "ready_loop": (True, ("loop",)),
    "ready_alone": (True, ("alone",)),
    "ready_without": (True, ("without",)),
    "ready_silent": (True, ("silent",)),
    "ready_slow_no": (True, ("slow_no",)),
}


# the suite's 15 minutes on 2 cores: three kinds (11 s each) run with -m slow; the guards they hit are the ones the
# others hit too (a leader refused for the round: held past its start, a loop, a group without the member)
_SLOW_LEADERS = {"ready_alone", "ready_silent", "ready_slow_no"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_LEADERS else c for c in sorted(HOSTILE_LEADERS)])
def test_a_hostile_leader_of_any_kind_holds_up_no_group(tmp_path, monkeypatch, case):
    """A node declares itself the earliest leader of the round at every look (so every member asks it first),
    and does what ``tests.outsider._hostile_leader`` says with each member it takes in. Before the guards,
    a stranger (not a ready peer of the round) that sent members back to itself crashed every member's step
    with a RecursionError within seconds, one that began a group of the member alone had every round end
    with each member in a group of its own, and a ready peer that held members until their own start, or sent
    them a group without them (a hivemind assert, retried at once), held every attempt until the step's timeout.

    Now members follow only ready peers of their round, a leader no longer than the start it declared, and a
    leader that holds them past it, sends them round a loop, a group that is not theirs, no answer at all or a
    slow no (red team: a no just before the request timeout held every step to the whole matchmaking time),
    not again that round. The two members form their group without it, each asking it at most once."""
    import threading
    from collections import Counter

    from coldfusion_p2p.swarm import start_dht
    from coldfusion_p2p.swarm.averager import FusionAverager, make_averager
    from coldfusion_p2p.swarm.node import peer_str
    from tests.outsider import _declare, _hostile_leader
    from tests.test_allreduce import three_averagers

    ready, behaviours = HOSTILE_LEADERS[case]
    joins = tmp_path / "joins.txt"
    inputs = [[torch.full((1000,), float(i))] for i in range(2)]
    with three_averagers(tmp_path, inputs, "none", "t_hostile_warmup", None, matchmaking_time=MATCHMAKING) as (dhts, averagers):
        ids = sorted(peer_str(av.peer_id) for av in averagers)
        hostile_dht = start_dht([str(a) for a in dhts[0].get_visible_maddrs()], ["/ip4/127.0.0.1/tcp/0"])
        leader, stop = None, threading.Event()
        try:
            monkeypatch.setattr(FusionAverager, "rpc_join_group", _hostile_leader(joins, behaviours))
            leader = make_averager(hostile_dht, "t", [torch.zeros(4)], tmp_path / "hostile", "none", 3.0, 30.0, 2)
            monkeypatch.undo()  # forked with the hostile handler; the members' averagers forked before it
            view = sorted(ids + [peer_str(hostile_dht.peer_id)]) if ready else ids

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
            refused = {peer_str(av.peer_id): av.refused_leaders() for av in averagers}  # what the contributor reports
        finally:
            stop.set()
            if leader is not None:
                leader.shutdown()
            hostile_dht.shutdown()
    asked = Counter(joins.read_text().split()) if joins.is_file() else Counter()
    hostile = peer_str(hostile_dht.peer_id)
    assert groups == [ids, ids], groups
    assert all(set(r) <= {hostile} for r in refused.values()), f"an honest leader was refused: {refused}"
    if ready:
        assert asked, "no member asked the hostile leader: the attack was not tried"
        assert max(asked.values()) == 1, f"a member asked the hostile leader more than once: {dict(asked)}"
        for member in asked:  # and it says why it asks no more (the contributor's ``leader_refused`` event)
            assert refused[member].get(hostile), f"{member[:12]} asked the hostile leader and did not refuse it: {refused}"
        # a group that waits for a ready peer that never joins it begins at its leader's start (MATCHMAKING)
        assert max(times) < MATCHMAKING + 2.0, f"the group formed after {max(times):.1f}s"
    else:
        assert not asked, f"members asked a leader that is not a ready peer of their round: {dict(asked)}"
        assert not any(refused.values()), f"a stranger is never asked, so never refused: {refused}"
        assert max(times) < MATCHMAKING * 0.6, f"the group formed after {max(times):.1f}s"


def test_a_leader_refuses_a_follower_whose_gathered_data_would_spoil_its_group(tmp_path):
    """A member's gathered data travels to every member of its group, and each parses it before the all-reduce:
    malformed, it spoiled the all-reduce of every group it was in and no one was blamed (red team). A leader now
    refuses such a request to join (over real libp2p), and a follower refuses a group that carries such data."""
    from hivemind.proto import averaging_pb2
    from hivemind.utils.serializer import MSGPackSerializer as S

    from coldfusion_p2p.swarm import start_dht
    from coldfusion_p2p.swarm.averager import FusionAverager, averager_prefix, gather_problem, peer_id_bytes_ok
    from tests.test_allreduce import three_averagers

    good = S.dumps([None, 0, S.dumps({"expect": ["QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]})])
    junk = [b"\xc1\xc1junk", S.dumps([1.0, 0]), S.dumps([1.0, 9, S.dumps({})]), S.dumps([float("nan"), 0, S.dumps({})]),
            S.dumps([1.0, 0, b"\xc1"]), S.dumps(["fast", 0, S.dumps({})]), b""]
    assert gather_problem(good) is None and gather_problem(S.dumps([2.5, 1, S.dumps(None)])) is None
    assert all(gather_problem(blob) for blob in junk)
    assert peer_id_bytes_ok(b"\x12\x20" + bytes(32)) and not peer_id_bytes_ok(b"\x12\x20" + bytes(31))
    assert not peer_id_bytes_ok(b"") and not peer_id_bytes_ok(bytes(37))

    inputs = [[torch.full((100,), float(i))] for i in range(2)]
    with three_averagers(tmp_path, inputs, "none", "t_gather", 2) as (dhts, averagers):
        asker = start_dht([str(a) for a in dhts[0].get_visible_maddrs()], ["/ip4/127.0.0.1/tcp/0"])
        try:
            async def ask(gathers: list[bytes]) -> list[int]:
                p2p = await asker.replicate_p2p()
                try:
                    stub = FusionAverager.get_stub(p2p, dhts[0].peer_id, namespace=averager_prefix("t"))
                    codes = []
                    for gather in gathers:
                        stream = await stub.rpc_join_group(averaging_pb2.JoinRequest(
                            schema_hash=b"x", expiration=get_dht_time() + 5, gather=gather, group_key="t_gather.0b"))
                        codes.append((await asyncio.wait_for(stream.__anext__(), 10)).code)
                        await stream.aclose()
                    return codes
                finally:
                    await p2p.shutdown()

            codes = asyncio.run(ask([good] + junk))
        finally:
            asker.shutdown()
    assert codes[0] != averaging_pb2.PROTOCOL_VIOLATION, codes  # refused for what it is (not looking for a group now)
    assert all(code == averaging_pb2.PROTOCOL_VIOLATION for code in codes[1:]), codes
