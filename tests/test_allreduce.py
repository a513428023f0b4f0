"""The all-reduce itself, with real averagers (DHT, averager process, p2pd) in this process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os

import pytest
import torch

from coldfusion_p2p.fusion import mean_delta
from coldfusion_p2p.swarm import make_averager, start_dht


@contextlib.contextmanager
def three_averagers(tmp_path, inputs, compression: str, group_prefix: str, target: int | None, rules: dict | None = None,
                    matchmaking_time: float = 5.0, lanes: list[bool] | None = None, clients: list[bool] | None = None,
                    before=None, chunk_timeout: float = 10.0):
    """Real peers (DHT, averager process, p2pd) on loopback, one per input list (three unless more
    inputs are given); all shut down after. A group that reaches its target size begins at once, so the
    matchmaking time only matters when a member is late: with 2 s, one averager that began its step late
    on a loaded CI machine found the other two already gone as a group of two ("could not find a group"). ``lanes[i]`` False: peer i serves and uses no direct lane;
    ``clients[i]`` True: peer i is a client (it sends its parts and reduces none). ``before(dhts)`` runs
    before the averager processes fork (a test patches one peer's runner there)."""
    dhts, averagers = [], []
    try:
        first = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        dhts.append(first)
        peers = [str(a) for a in first.get_visible_maddrs()]
        dhts += [start_dht(peers, ["/ip4/127.0.0.1/tcp/0"]) for _ in range(len(inputs) - 1)]
        if before is not None:
            before(dhts)
        for i, (dht, tensors) in enumerate(zip(dhts, inputs)):
            av = make_averager(dht, "t", [t.clone() for t in tensors], tmp_path, compression, matchmaking_time, 60.0, 2,
                               chunk_timeout=chunk_timeout, lane=True if lanes is None else lanes[i],
                               client_mode=bool(clients and clients[i]))
            av.set_round(group_prefix, target, 2, rules=rules)
            averagers.append(av)
        yield dhts, averagers
    finally:
        for av in averagers:
            av.shutdown()
        for dht in dhts:
            dht.shutdown()


def step_all(averagers, result_timeout: float) -> tuple[list[dict], list[list[torch.Tensor]]]:
    """One all-reduce step on every averager at once: each one's result and its tensors after it."""
    controls = [av.step(weight=1.0, gather={"i": i}, timeout=30, wait=False) for i, av in enumerate(averagers)]
    results = [c.result(timeout=result_timeout) for c in controls]
    outputs = []
    for av in averagers:
        with av.get_tensors() as ts:
            outputs.append([t.clone() for t in ts])
    return results, outputs


@pytest.mark.parametrize("compression", ["none", "float16", "8bit"])
def test_all_reduce_is_bit_identical_on_every_member_and_reports_clean(tmp_path, compression):
    g = torch.Generator().manual_seed(7)
    shapes = [(384, 384), (1000,), (3, 5, 7)]
    inputs = [[torch.randn(s, generator=g) * (i + 1) for s in shapes] for i in range(3)]
    with three_averagers(tmp_path, inputs, compression, "t_r0_test_a1", 3) as (dhts, averagers):
        results, outputs = step_all(averagers, 60)
        ids = [dht.peer_id.to_base58() for dht in dhts]
    reducers = {me for me, r in zip(ids, results) if r["reduced_parts"] > 0}  # hivemind may leave a member no slice
    assert len(reducers) >= 2, [r["reduced_parts"] for r in results]
    for r, me in zip(results, ids):
        assert r["clean"] and r["failed_size"] == 0 and not r["banned"] and len(r["group"]) == 3, {k: r.get(k) for k in ("error", "failure_reasons", "offenders", "banned", "failed_size")}
        assert sorted(v["i"] for v in r["gathered"].values()) == [0, 1, 2]
        # every part to another member's reducer went over a direct lane
        assert r["lanes"] == sorted(reducers - {me}), (me, r["lanes"], reducers)
    for k in range(len(shapes)):
        assert torch.equal(outputs[0][k], outputs[1][k]) and torch.equal(outputs[0][k], outputs[2][k])
        mean = torch.stack([inp[k] for inp in inputs]).mean(0)
        if compression == "8bit":  # quantization error is spread over the tensor: measure it relative to the norm
            assert float((outputs[0][k] - mean).norm()) <= 0.05 * float(mean.norm()), float((outputs[0][k] - mean).norm() / mean.norm())
        else:
            tolerance = {"none": 1e-6, "float16": 1e-2}[compression]
            assert (outputs[0][k] - mean).abs().max() <= tolerance * mean.abs().max()
    if compression == "none":  # the all-reduce is exactly the network-free average, whatever the arrival order
        for out, expected in zip(outputs[0], mean_delta(inputs)):
            assert torch.equal(out, expected)
    if compression == "float16":  # every member's part (its own too) and the average cross the wire as float16
        def wire(t):
            return t.half().float()

        for out, expected in zip(outputs[0], mean_delta([[wire(t) for t in inp] for inp in inputs])):
            assert torch.equal(out, wire(expected))


@pytest.mark.parametrize("strategy", ["filtered_mean", "trimmed_mean", "mean"])
def test_the_robust_strategy_in_the_reducers_bounds_a_bad_member_and_names_it(tmp_path, strategy):
    """Five real members, one sending noise 20x an honest delta's norm (inside the part bound): with a
    robust strategy every reducer reduces its parts with it, so every member holds exactly the central
    computation, close to the honest members' mean (filtered_mean: exactly it), and the bad member is
    named; with mean the same deltas pull the result far away."""
    from coldfusion_p2p.strategies import strategy_for
    from coldfusion_p2p.swarm.averager import part_values

    g = torch.Generator().manual_seed(13)
    shapes = [(600, 512), (3000,)]  # four parts of the all-reduce (131,072 values at most each)
    honest = [[torch.randn(s, generator=g) * 1e-3 + 1e-3 for s in shapes] for _ in range(4)]
    honest_norm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in honest[0])))
    noise = [torch.randn(s, generator=g) for s in shapes]
    scale = 20 * honest_norm / float(torch.sqrt(sum(n.double().pow(2).sum() for n in noise)))
    inputs = honest + [[n * scale for n in noise]]
    chosen = strategy_for(strategy)
    rules = {"min_weight": 1.0, "max_weight": 1.0, "part_bound": 100.0, "strategy": chosen}
    with three_averagers(tmp_path, inputs, "none", f"t_r0_{strategy}", 5, rules=rules) as (dhts, averagers):
        results, outputs = step_all(averagers, 90)
        bad = dhts[4].peer_id.to_base58()
    expected = chosen.reduce_all(inputs, part_values=part_values("none"))
    honest_mean = mean_delta(honest)
    for out in outputs:
        assert all(torch.equal(o, e) for o, e in zip(out, expected))  # p2p = central, bit for bit
    off = float(torch.sqrt(sum((o - h).double().pow(2).sum() for o, h in zip(outputs[0], honest_mean))))
    if strategy == "filtered_mean":
        assert all(torch.equal(o, h) for o, h in zip(outputs[0], honest_mean))
    if strategy != "mean":
        assert off < 0.5 * honest_norm, (off, honest_norm)
        reducers = [r for r in results if r["reduced_parts"] > 0]
        assert reducers and all(list(r["outliers"]) == [bad] for r in reducers), [r["outliers"] for r in results]
    else:
        assert off > 3 * honest_norm, (off, honest_norm)


# the claimed-weight rule (22 s here) runs with -m slow: the NaN ban goes the same way, from the reducer to the verdicts
@pytest.mark.parametrize("fault", [pytest.param("weight", marks=pytest.mark.slow), "nan", pytest.param("inside", marks=pytest.mark.slow)])
def test_reducers_ban_a_member_that_breaks_the_rounds_rules(tmp_path, fault):
    """Every honest reducer checks each member's claimed weight and part: a weight of the member's
    choosing, noise inside the old fixed bound (990 < 1000), or NaN is banned and the member named."""
    g = torch.Generator().manual_seed(11)
    shapes = [(1024, 256), (5000,)]  # large enough that every member reduces a slice, as in any real model
    inputs = [[torch.randn(s, generator=g) * 0.001 for s in shapes] for _ in range(3)]
    if fault == "inside":
        noise = [torch.randn(s, generator=g) for s in shapes]
        scale = 990.0 / float(torch.sqrt(sum((n.double() ** 2).sum() for n in noise)))
        inputs[2] = [n * scale for n in noise]
    elif fault == "nan":
        for t in inputs[2]:  # NaN in every slice, so that every reducer receives some
            t.view(-1)[::1000] = float("nan")
    rules = {"min_weight": 1.0, "max_weight": 1.0, "part_bound": 5.0}  # honest deltas here have norm ~0.5
    with three_averagers(tmp_path, inputs, "none", "t_r0_rules", 3, rules=rules) as (dhts, averagers):
        weights = [1.0, 1.0, 1000.0 if fault == "weight" else 1.0]
        controls = [av.step(weight=w, gather={"i": i}, timeout=30, wait=False) for i, (av, w) in enumerate(zip(averagers, weights))]
        results = [c.result(timeout=60) for c in controls]
        bad = dhts[2].peer_id.to_base58()
        # the cheater is refused from then on: an honest leader turns its join request down
        for av, tensors in zip(averagers, inputs):  # a redo starts from the same deltas
            with av.get_tensors() as ts:
                for t, x in zip(ts, tensors):
                    t.copy_(x)
        for av in averagers[:2]:
            av.set_round("t_r0_rules_x1", None, 2, rules=rules, excluded=[bad])
        averagers[2].set_round("t_r0_rules_x1", None, 2, rules=rules)
        # (the cheater, refused, finds no group: it gives up after 8 s, past the others' 5 s matchmaking time)
        controls = [av.step(weight=1.0, gather={"i": i}, timeout=20 if i < 2 else 8, wait=False) for i, av in enumerate(averagers)]
        again = [c.result(timeout=60) if i < 2 else None for i, c in enumerate(controls)]
        with contextlib.suppress(Exception):
            controls[2].result(timeout=30)
        outputs = []
        for av in averagers[:2]:
            with av.get_tensors() as ts:
                outputs.append([t.clone() for t in ts])
    # every honest member that reduces a slice (hivemind's load balancing may give one none) bans it and names it
    reducers = [r for r in results[:2] if r["reduced_parts"] > 0]
    assert reducers, results
    for r in reducers:
        assert not r["clean"] and list(r["offenders"]) == [bad], (bad, r["group"], r["clean"], r["offenders"], r["banned"], r["error"])
        reason = r["offenders"][bad]
        assert {"weight": "claimed weight 1000", "inside": "beyond the round's bound", "nan": "NaN"}[fault] in reason
        # the ban says why: the offender's exchange was cut off before its last part
        assert bad in r["banned"] and "its exchange ended after" in r["ban_reasons"][bad], r["ban_reasons"]
        assert set(r["banned"]) <= set(r["ban_reasons"]), (r["banned"], r["ban_reasons"])
    for r in again[:2]:  # the redo among the honest members: clean, without the cheater
        assert r["clean"] and bad not in r["group"] and len(r["group"]) == 2, (bad, r["group"], r["error"], r["banned"], r["offenders"])
    for k in range(len(shapes)):
        assert torch.equal(outputs[0][k], outputs[1][k])
        assert torch.equal(outputs[0][k], mean_delta([inputs[0], inputs[1]])[k])


@pytest.mark.parametrize("handler", ["ours", "hivemind"])
def test_a_caller_hanging_up_early_cannot_cancel_the_groups_all_reduce(handler):
    """A part that arrives while the group is still being set up waits for it; if its caller hangs up
    then, the group's future must stay usable: hivemind 1.1.12 awaits it bare, so the caller's
    cancellation cancelled the future and this peer's own all-reduce then failed on ``set_result``."""
    import asyncio

    from hivemind.averaging import DecentralizedAverager
    from hivemind.proto import averaging_pb2

    from coldfusion_p2p.membership import Admission
    from coldfusion_p2p.swarm.averager import FusionAverager

    async def scenario():
        here = object.__new__(FusionAverager)  # only the state the handler reads; no process, no network
        group_future = asyncio.get_running_loop().create_future()
        here._running_groups = {b"g1": group_future}
        here._pending_groups_registered = asyncio.Event()
        here._allreduce_timeout = 30.0
        here.allreduce_kwargs = {"sender_timeout": 5.0}
        here._admission = Admission()
        here._parent_pid = -1  # not a started averager: nothing for __del__ to shut down

        async def hangs_after_one_part():
            yield averaging_pb2.AveragingData(group_id=b"g1")
            await asyncio.sleep(3600)

        method = FusionAverager.rpc_aggregate_part if handler == "ours" else DecentralizedAverager.rpc_aggregate_part
        call = asyncio.ensure_future(anext_of(method(here, hangs_after_one_part(), None)))
        await asyncio.sleep(0.2)  # the handler now waits for the group's runner
        call.cancel()  # the caller hangs up
        with contextlib.suppress(asyncio.CancelledError):
            await call
        return group_future.cancelled()

    async def anext_of(generator):
        return await generator.__anext__()

    cancelled = asyncio.run(scenario())
    assert cancelled == (handler == "hivemind")


def test_a_member_without_a_lane_takes_part_over_p2pd_and_the_result_is_the_same(tmp_path, monkeypatch):
    """Peer 0 serves and uses no lane (as an older peer, or one that turned lanes off): the others
    ask it for a grant, get none, and send their parts over p2pd; between themselves they use lanes,
    encrypted here as between machines. The average is still exactly the network-free one on every member."""
    from coldfusion_p2p.swarm import lane

    monkeypatch.setattr(lane, "SEAL_LOOPBACK", True)  # the averager processes fork from here and keep it
    g = torch.Generator().manual_seed(5)
    shapes = [(1024, 384), (777,)]  # enough parts for every member to reduce a slice
    inputs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_r0_mixed", 3, lanes=[False, True, True]) as (dhts, averagers):
        results, outputs = step_all(averagers, 60)
        ids = [dht.peer_id.to_base58() for dht in dhts]
    for r in results:
        assert r["clean"] and r["failed_size"] == 0 and len(r["group"]) == 3 and r["reduced_parts"] > 0, r
    assert results[0]["lanes"] == []
    assert results[1]["lanes"] == [ids[2]] and results[2]["lanes"] == [ids[1]], (ids, [r["lanes"] for r in results])
    # each member that uses lanes says whose it could not use (`cfp2p status` counts them); 0 tried none
    assert results[0]["lane_missed"] == [] and results[1]["lane_missed"] == results[2]["lane_missed"] == [ids[0]], results
    expected = mean_delta(inputs)
    for out in outputs:
        for got, want in zip(out, expected):
            assert torch.equal(got, want)


def test_a_group_of_fast_members_uses_wide_parts_and_one_older_member_keeps_the_usual_ones(tmp_path):
    """Every member says its last all-reduce rate in its gathered data: a group whose slowest rate brings a
    wide part in well within the senders' timeout uses ``WIDE_PART_BYTES``, and the result is still exactly
    the network-free mean, over lanes and over p2pd. A member that says nothing (an older peer: hivemind's
    own step) keeps the whole group at ``PART_SIZE_BYTES``, also for the members that did say a rate."""
    from hivemind.averaging import DecentralizedAverager

    from coldfusion_p2p.swarm.averager import PART_SIZE_BYTES, WIDE_PART_BYTES

    g = torch.Generator().manual_seed(23)
    shapes = [(2048, 1100), (5000,)]  # 2.3M values: several wide parts, every member reduces a slice
    inputs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_r0_wide", 3, lanes=[False, True, True]) as (dhts, averagers):
        for av in averagers:
            av.link_rate = 1e9  # as after a fast all-reduce (``run_step`` measures it)
        results, outputs = step_all(averagers, 60)
        for av in averagers:
            av.set_round("t_r1_wide", 3, 2)
            with av.get_tensors() as ts:
                for t, x in zip(ts, inputs[averagers.index(av)]):
                    t.copy_(x)
        controls = [av.step(weight=1.0, gather={"i": i}, timeout=30, wait=False) for i, av in enumerate(averagers[:2])]
        controls.append(DecentralizedAverager.step(averagers[2], weight=1.0, gather={"i": 2}, timeout=30, wait=False))
        older = [c.result(timeout=60) for c in controls]
        with averagers[0].get_tensors() as ts:
            older_out = [t.clone() for t in ts]
    expected = mean_delta(inputs)
    for rs, outs in ((results, outputs), (older, [older_out])):
        for r in rs:
            assert r["clean"] and r["failed_size"] == 0 and len(r["group"]) == 3 and r["reduced_parts"] > 0, r
        for out in outs:
            assert all(torch.equal(got, want) for got, want in zip(out, expected))
    assert [r["part_bytes"] for r in results] == [WIDE_PART_BYTES] * 3
    assert [r["part_bytes"] for r in older] == [PART_SIZE_BYTES] * 3
    assert results[0]["reduced_parts"] < older[0]["reduced_parts"]


def test_members_that_cut_the_vector_otherwise_fail_that_exchange_and_name_no_one(tmp_path, monkeypatch):
    """A leader relays the members' gathered data, and one that shows followers different versions of it
    can make them choose different part sizes. The first message of a wide group's exchange names how its
    member cut the vector (``LAYOUT_MARK``): a reducer that cut it otherwise answers BAD_GROUP_ID and judges
    none of its parts, so the exchanges across the split fail, the round is unclean, and no member is named
    an offender for a part of another shape. Nothing crashes."""
    from coldfusion_p2p.swarm import averager as A

    g = torch.Generator().manual_seed(29)
    shapes = [(2048, 1100), (5000,)]
    inputs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    odd = {}

    def split(dhts):
        odd["peer"] = dhts[2].peer_id
        honest_init = A.CanonicalAllReduceRunner.__init__

        def init(self, *args, **kwargs):
            if kwargs["p2p"].peer_id == odd["peer"]:  # as if the leader had shown it fast rates only
                kwargs["part_size_bytes"] = A.WIDE_PART_BYTES
            honest_init(self, *args, **kwargs)

        monkeypatch.setattr(A.CanonicalAllReduceRunner, "__init__", init)

    with three_averagers(tmp_path, inputs, "none", "t_r0_split", 3, lanes=[True, False, True], before=split) as (dhts, averagers):
        results, _ = step_all(averagers, 90)
        assert all(av.is_alive() for av in averagers)
        ids = [dht.peer_id.to_base58() for dht in dhts]
    assert [r["part_bytes"] for r in results] == [A.PART_SIZE_BYTES, A.PART_SIZE_BYTES, A.WIDE_PART_BYTES]
    for i, r in enumerate(results):  # without the layout's name each reducer judged the other side's parts: offenders
        assert not r["clean"] and r["offenders"] == {}, (i, r["offenders"])
        # its exchange with each member across the split failed (refused: BAD_GROUP_ID, or the refusal's
        # end cut off while this member was still sending), and no other exchange did
        assert set(r["failure_reasons"]) == ({ids[2]} if i < 2 else set(ids[:2])), (i, r["failure_reasons"])
    assert any(f"sent code {A.averaging_pb2.BAD_GROUP_ID}" in why for r in results for why in r["failure_reasons"].values()), \
        [r["failure_reasons"] for r in results]


@pytest.mark.parametrize("lie,lanes", [("order", [True, False, True]), ("client", [True, False, True]),
                                       ("forged cut", [True, False, True]), ("order", [True, True, True])],
                         ids=["order", "client", "forged cut", "order over lanes"])
def test_members_shown_another_view_of_the_group_fail_those_exchanges_and_name_no_one(tmp_path, monkeypatch, lie, lanes):
    """A hostile leader can show one follower the group in another order, or another member as a client.
    Its slices are then other members' slices: as a reducer it would take parts meant for someone else,
    as a sender it would send its parts to the wrong reducers, and parts of another shape would be judged
    misshapen. Each sender says how it cut the vector in the first message of every exchange
    (``CUT_MARK``, in a field older peers never read), usual 512 KiB parts included, whatever the leader
    relayed: each exchange across the difference is refused without blame, the round is unclean
    everywhere, no member is named an offender, and no part of another slice reaches a sum. A member
    that says 64 KiB of garbage there instead fares the same, and nothing crashes.

    Each refused member reads the reducer's refusal itself, over p2pd (peer 1 has no lane) and over a
    lane: a reducer that closed at once, with the member's parts still coming, reset the connection, and
    the reset overtook the code in 17 of 44 refusals here (0 of 33 since) ("Connection reset by peer",
    "Broken pipe": a refusal that looked like a broken link)."""
    from coldfusion_p2p.swarm import averager as A

    g = torch.Generator().manual_seed(31)
    inputs = [[torch.randn(1000, 1200, generator=g), torch.randn(999, generator=g)] for _ in range(3)]  # parts for every pair
    odd = {}

    def shuffle(dhts):
        odd["peer"], odd["other"] = dhts[1].peer_id, dhts[2].peer_id
        honest_init = A.CanonicalAllReduceRunner.__init__

        def init(self, *args, **kwargs):
            if kwargs["p2p"].peer_id == odd["peer"] and lie == "order":  # as if the leader had shown it the group reversed
                kwargs["ordered_peer_ids"] = tuple(reversed(kwargs["ordered_peer_ids"]))
            elif kwargs["p2p"].peer_id == odd["peer"] and lie == "client":  # as if it had been shown the third member as a client
                k = list(kwargs["ordered_peer_ids"]).index(odd["other"])  # (hivemind's runner makes a member of
                kwargs["peer_fractions"] = tuple(0.0 if i == k else 0.5 for i in range(3))  # no share a client)
            honest_init(self, *args, **kwargs)

        monkeypatch.setattr(A.CanonicalAllReduceRunner, "__init__", init)
        honest_cut = A.CanonicalAllReduceRunner.cut.func

        def forged_cut(self):
            return os.urandom(1 << 16) if self.peer_id == odd["peer"] and lie == "forged cut" else honest_cut(self)

        monkeypatch.setattr(A.CanonicalAllReduceRunner, "cut", functools.cached_property(forged_cut))
        A.CanonicalAllReduceRunner.cut.__set_name__(A.CanonicalAllReduceRunner, "cut")

    with three_averagers(tmp_path, inputs, "none", "t_r0_order", 3, lanes=lanes, before=shuffle) as (dhts, averagers):
        results, _ = step_all(averagers, 90)
        assert all(av.is_alive() for av in averagers)
    assert [r["part_bytes"] for r in results] == [A.PART_SIZE_BYTES] * 3, [r["error"] for r in results]
    for i, r in enumerate(results):
        assert not r["clean"] and r["offenders"] == {} and r["outliers"] == {}, (i, r["offenders"], r["outliers"])
        # each one's exchanges across the difference failed (with a vector this small, a pair could have none)
        assert r["failure_reasons"], (i, [(k, r.get(k)) for k in ("banned", "failed_size", "failed_reducers", "reduced_parts")])
    # every failure is what the reducer said (its refusal, or parts another cut made too many or too few), never a reset
    reasons = [why for r in results for why in r["failure_reasons"].values()]
    assert all(why.startswith("AllreduceException: ") for why in reasons), reasons
    assert any(f"sent code {A.averaging_pb2.BAD_GROUP_ID}" in why for why in reasons), reasons


def test_a_second_exchange_from_the_same_sender_is_refused_and_costs_the_honest_members_nothing(tmp_path, monkeypatch):
    """hivemind's reducer counts the parts that arrive, not who sent them. A member that opened a second
    stream to each reducer with copies of its parts (found by a red-team helper) completed parts without
    the other honest member's, whose late part then got it banned by the reducer and left out of the
    round's redos on both sides. A reducer takes one exchange per sender: whichever of its two streams
    comes second is refused, the honest members never ban, fail or name each other, and they end with
    the same values (the mean, or without the member that had its own stream refused)."""
    from hivemind.averaging.allreduce import AllReduceRunner

    from coldfusion_p2p.swarm import averager as A

    g = torch.Generator().manual_seed(37)
    inputs = [[torch.randn(1000, 1200, generator=g)] for _ in range(3)]
    hostile = {}

    def before(dhts):
        hostile["id"] = dhts[2].peer_id
        honest = A.CanonicalAllReduceRunner._communicate_with_peer

        async def communicate(self, peer_id):
            if self.peer_id == hostile["id"] and peer_id != self.peer_id:
                container = self.tensor_part_container
                parts = [(p.clone(), info) for p, info in container._input_parts_by_peer[self.ordered_peer_ids.index(peer_id)]]

                async def copies():
                    for i, (p, info) in enumerate(parts):
                        first = {"code": A.averaging_pb2.PART_FOR_AVERAGING, "group_id": self.group_id + self.layout,
                                 "peer_id": self.cut} if i == 0 else {}
                        yield A.averaging_pb2.AveragingData(tensor_part=container.compression.compress(p, info), weight=self.weight, **first)

                async def second():
                    with contextlib.suppress(Exception):  # whatever the reducer answers
                        async for _ in await AllReduceRunner._get_peer_stub(self, peer_id).rpc_aggregate_part(copies()):
                            pass

                asyncio.create_task(second())
            return await honest(self, peer_id)

        monkeypatch.setattr(A.CanonicalAllReduceRunner, "_communicate_with_peer", communicate)

    with three_averagers(tmp_path, inputs, "none", "t_r0_twice", 3, before=before) as (dhts, averagers):
        results, outputs = step_all(averagers, 90)
        assert all(av.is_alive() for av in averagers)
        honest = {dht.peer_id.to_base58() for dht in dhts[:2]}
    for i, r in enumerate(results[:2]):
        blamed = (set(r["banned"]) | set(r["failed_reducers"]) | set(r["offenders"])) & honest
        assert not blamed and r["failed_size"] == 0, f"member {i}: " + json.dumps(  # every member's view, in full
            [{k: r[k] for k in ("banned", "ban_reasons", "failed_reducers", "failure_reasons", "offenders")} for r in results])
    assert torch.equal(outputs[0][0], outputs[1][0])


def test_a_member_that_never_reads_its_averages_holds_up_no_reducer(tmp_path, monkeypatch):
    """p2pd writes have no timeout. A reducer's handler that waited to write an average to a member that
    does not read it (a hostile one, or one frozen mid-round) read none of that member's next parts, so
    the reducer's slice waited for them, and every other member with it, until the all-reduce's timeout:
    the reducer then banned everyone (a flaky test here showed it: a member banned both of its honest
    groupmates after 60 s). Here member 2 sends its whole share to each reducer over p2pd and reads no
    answer for 14 s, past the honest members' 12 s patience with a reducer. The honest members end long
    before that, with the exact mean of all three (its parts all arrived), banning and failing no one."""
    import time

    from coldfusion_p2p.swarm import averager as A

    g = torch.Generator().manual_seed(41)
    inputs = [[torch.randn(4096, 4096, generator=g)] for _ in range(3)]  # slices of ~22 MB: more than any buffer holds
    hostile, released = {}, tmp_path / "released"

    def before(dhts):
        hostile["id"] = dhts[2].peer_id
        honest = A.CanonicalAllReduceRunner._communicate_with_peer

        async def communicate(self, peer_id):
            if self.peer_id != hostile["id"] or peer_id == self.peer_id:
                return await honest(self, peer_id)
            index = self.ordered_peer_ids.index(peer_id)
            stream = await A.AllReduceRunner._get_peer_stub(self, peer_id).rpc_aggregate_part(
                A._as_messages(self._generate_input_for_peer(index)))
            try:
                await asyncio.sleep(14.0)  # every part goes out (hivemind writes them in a task of their own); no answer is read
            finally:
                released.write_text("released")
                with contextlib.suppress(Exception):
                    await stream.aclose()
            self.tensor_part_container.register_failed_reducer(index)  # as hivemind's own exchange does on failure
            raise A.AllreduceException("this member read no average")

        monkeypatch.setattr(A.CanonicalAllReduceRunner, "_communicate_with_peer", communicate)

    with three_averagers(tmp_path, inputs, "none", "t_r0_mute", 3, lanes=[True, True, False], before=before,
                         chunk_timeout=6.0) as (dhts, averagers):
        start = time.monotonic()
        controls = [av.step(weight=1.0, gather={"i": i}, timeout=30, wait=False) for i, av in enumerate(averagers)]
        results = [c.result(timeout=90) for c in controls[:2]]
        took, early = time.monotonic() - start, not released.exists()
        outputs = []
        for av in averagers[:2]:
            with av.get_tensors() as ts:
                outputs.append([t.clone() for t in ts])
        controls[2].result(timeout=90)
    assert early, f"the honest members ended only after the silent member let go ({took:.1f} s)"
    for i, r in enumerate(results):
        assert r["clean"] and not r["banned"] and not r["failed_reducers"] and r["failed_size"] == 0 and len(r["group"]) == 3, (
            f"member {i}: " + json.dumps({k: r[k] for k in ("banned", "ban_reasons", "failed_reducers", "failure_reasons", "error")}))
    expected = mean_delta(inputs)
    for out in outputs:
        assert torch.equal(out[0], expected[0])


def test_the_part_size_follows_the_slowest_member_and_only_where_it_changes_no_value():
    from hivemind.proto import runtime_pb2

    from coldfusion_p2p.strategies import strategy_for
    from coldfusion_p2p.swarm.averager import PART_SIZE_BYTES, WIDE_MARGIN, WIDE_PART_BYTES, group_part_bytes, link_rate

    none, half, eight = (runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16,
                         runtime_pb2.CompressionType.UNIFORM_8BIT)
    enough = WIDE_MARGIN * WIDE_PART_BYTES * 3 / 10.0 * 1.001  # bytes/s that bring a wide part over each of 3 streams in 10/4 s
    mean = strategy_for("mean")
    assert group_part_bytes([enough] * 4, 4, 10.0, mean, none) == WIDE_PART_BYTES
    assert group_part_bytes([enough] * 4, 4, 10.0, strategy_for("trimmed_mean"), half) == WIDE_PART_BYTES
    assert group_part_bytes([enough * 100, enough * 0.9, enough, enough], 4, 10.0, mean, none) == PART_SIZE_BYTES  # the slowest decides
    assert group_part_bytes([enough] * 4, 4, 5.0, mean, none) == PART_SIZE_BYTES  # a shorter timeout needs a faster link
    assert group_part_bytes([enough] * 5, 5, 10.0, mean, none) == PART_SIZE_BYTES  # more streams share the same uplink
    assert group_part_bytes([enough] * 4, 4, 10.0, strategy_for("filtered_mean"), none) == PART_SIZE_BYTES  # decides per part
    assert group_part_bytes([enough] * 4, 4, 10.0, mean, eight) == PART_SIZE_BYTES  # a codebook per part
    assert group_part_bytes([], 0, 10.0, mean, none) == PART_SIZE_BYTES
    # a first message's group id: hivemind's ids are 20 bytes; a layout's name is a fixed-length suffix
    from coldfusion_p2p.swarm.averager import LAYOUT_BYTES, LAYOUT_MARK, split_layout

    plain, named = bytes(range(20)), LAYOUT_MARK + bytes(LAYOUT_BYTES - len(LAYOUT_MARK))
    assert split_layout(plain) == (plain, b"") and split_layout(plain + named) == (plain, named)
    assert split_layout(named) == (named, b"")  # nothing left of a group id: not a layout's name
    assert split_layout(plain + named[:-1]) == (plain + named[:-1], b"")
    # what a member says is taken only as a plain positive finite number
    assert link_rate({"rate": 5}) == 5.0 and link_rate({"rate": 2.5e8}) == 2.5e8
    for said in ({}, {"rate": -1}, {"rate": float("nan")}, {"rate": float("inf")}, {"rate": "1e12"}, {"rate": True},
                 {"rate": [1e12]}, None, [("rate", 1e12)]):
        assert link_rate(said) == 0.0, said


def test_over_p2pd_members_hang_up_once_they_have_every_average_and_reducers_wait_for_that(tmp_path, monkeypatch):
    """Over p2pd a reducer keeps each stream open after its last answer until the member hangs up (closing
    at once lost the end of the last average about once in 70 two-peer all-reduces here: "sent 86 parts,
    but we expected 87"). Here a reducer would wait 60 s: every wait must end within seconds because the
    member hung up, and the round is clean and exact. A member that read on until the reducer closed
    its end would leave every wait running for the whole minute."""
    import time

    from coldfusion_p2p.swarm.averager import FusionAverager

    waits = tmp_path / "waits.txt"

    async def timed_wait(self, seconds: float) -> None:  # the averager processes fork from here and keep it
        start = time.monotonic()
        try:
            await asyncio.sleep(60.0)
        finally:
            with open(waits, "a") as fh:
                fh.write(f"{time.monotonic() - start:.3f}\n")

    monkeypatch.setattr(FusionAverager, "_wait_for_hang_up", timed_wait)
    g = torch.Generator().manual_seed(11)
    shapes = [(1024, 384), (777,)]  # enough parts for every member to reduce a slice
    inputs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_r0_hangup", 3, lanes=[False, False, False]) as (dhts, averagers):
        results, outputs = step_all(averagers, 50)
        deadline = time.monotonic() + 15.0  # each reducer waits on its two p2pd streams with averages in them
        while time.monotonic() < deadline and (not waits.exists() or len(waits.read_text().split()) < 6):
            time.sleep(0.2)
        ended = [float(x) for x in waits.read_text().split()] if waits.exists() else []
    for r in results:
        assert r["clean"] and r["failed_size"] == 0 and not r["banned"] and r["lanes"] == [] and r["reduced_parts"] > 0, r
    assert len(ended) >= 6 and max(ended[:6]) < 5.0, ended
    expected = mean_delta(inputs)
    for out in outputs:
        for got, want in zip(out, expected):
            assert torch.equal(got, want)


def test_a_lane_is_granted_only_to_a_member_of_a_running_group(tmp_path):
    """``rpc_open_lane`` over real libp2p: a peer that is not in a group this averager runs (or names a
    malformed group) gets no grant, within a bounded time; nothing is left waiting on the averager."""
    import asyncio
    import time

    from hivemind.proto import averaging_pb2

    from coldfusion_p2p.swarm.averager import FusionAverager, averager_prefix

    g = torch.Generator().manual_seed(3)
    inputs = [[torch.randn(300, generator=g)] for _ in range(2)]
    with three_averagers(tmp_path, inputs, "none", "t_r0_grants", 2) as (dhts, averagers):
        member = dhts[0].peer_id
        outsider = start_dht([str(a) for a in dhts[0].get_visible_maddrs()], ["/ip4/127.0.0.1/tcp/0"])
        try:
            async def ask(group_ids: list[bytes]):
                p2p = await outsider.replicate_p2p()  # one for all calls: hivemind's unary calls hang on a second replica
                try:
                    stub = FusionAverager.get_stub(p2p, member, namespace=averager_prefix("t"))
                    out = []
                    for group_id in group_ids:
                        started = time.monotonic()
                        answer = await asyncio.wait_for(stub.rpc_open_lane(averaging_pb2.DownloadData(metadata=group_id)), 20)
                        out.append((answer.metadata, time.monotonic() - started))
                    return out
                finally:
                    await p2p.shutdown()

            answers = asyncio.run(ask([b"no such group", b"", b"x" * 65]))
            results, _ = step_all(averagers, 60)  # the averager still runs rounds afterwards
        finally:
            outsider.shutdown()
    for grant, seconds in answers:
        assert grant == b"" and seconds < 10, (grant, seconds)
    assert all(r["clean"] for r in results)


def test_a_client_member_sends_its_parts_over_lanes_before_it_reads_an_answer(tmp_path):
    """A client (a peer behind NAT) sends all its parts before it reads any average, as hivemind has it:
    the lane must start sending as soon as it is open. It did not at first, and the client waited for
    its own unsent parts until the all-reduce timed out (60 s) while the reducers banned it after 10 s."""
    import time

    g = torch.Generator().manual_seed(9)
    shapes = [(1024, 384)]
    inputs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    with three_averagers(tmp_path, inputs, "none", "t_r0_client", 3, clients=[False, False, True]) as (dhts, averagers):
        started = time.monotonic()
        results, outputs = step_all(averagers, 60)
        took = time.monotonic() - started
        ids = [dht.peer_id.to_base58() for dht in dhts]
    assert took < 10, took  # the reducers' patience with a silent sender
    for r in results:
        assert r["clean"] and not r["banned"] and not r["failed_reducers"], r
    assert results[2]["reduced_parts"] == 0 and results[2]["lanes"] == sorted(ids[:2])
    for out in outputs:
        for got, want in zip(out, mean_delta(inputs)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("lie", ["shape", "dtype", "gradients", "reducer's shape", "reducer's NaN"])
def test_a_part_or_average_that_is_not_what_its_slice_holds_is_refused(tmp_path, monkeypatch, lie):
    """What a member sends must be a float32 part of its slice's shape: one value where a part belongs
    would be broadcast over the whole part in the reducer's sum (a pull on every coordinate, past the
    norm bound: one value's norm is tiny), and complex values broke the sum for every sender (red team).
    Reducers ban it and name it. A part that asks for gradients is an honest part otherwise: the round
    is clean (that it arrives without them is tests/test_lane.py's to check: the flag lives in the
    averager processes, out of this test's sight). A reducer that
    answers with averages of another shape is named by the members, who keep their own values for its
    slice, as they do for one that sends NaN. Nothing crashes."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    from coldfusion_p2p.swarm import averager as A
    from coldfusion_p2p.swarm.lane import LanePart, raw_part

    g = torch.Generator().manual_seed(5)
    shapes = [(1024, 1024), (5000,)]  # every member of three reduces a few parts (with smaller tensors one may reduce none)
    inputs = [[torch.randn(s, generator=g) * 0.001 for s in shapes] for _ in range(3)]
    rules = {"min_weight": 1.0, "max_weight": 1.0, "part_bound": 5.0}
    bad = {}

    def cheat(dhts):
        bad["peer"] = dhts[2].peer_id
        if not lie.startswith("reducer"):
            honest = A.CanonicalAllReduceRunner._generate_input_for_peer

            async def lying_parts(self, peer_index):
                async for message in honest(self, peer_index):
                    if self.peer_id == bad["peer"]:
                        values = A.part_tensor(message)
                        fields = {"weight": message.weight, "code": message.code, "group_id": message.group_id, "peer_id": message.peer_id}
                        if lie == "shape":
                            message = raw_part(values.reshape(-1)[:1] * 4.0, **fields)
                        elif lie == "dtype":
                            message = A.averaging_pb2.AveragingData(
                                tensor_part=serialize_torch_tensor(values.to(torch.complex64), runtime_pb2.CompressionType.NONE), **fields)
                        else:
                            message = raw_part(values, **fields)
                            message.meta.tensor_part.requires_grad = True
                            assert isinstance(message, LanePart)
                    yield message

            monkeypatch.setattr(A.CanonicalAllReduceRunner, "_generate_input_for_peer", lying_parts)
        else:
            honest = A.CanonicalAllReduceRunner._average_answer

            def one_value_averages(self, part_index, averaged_part, compression):
                if self.peer_id == bad["peer"]:
                    lying = averaged_part.reshape(-1)[:1].clone() if lie == "reducer's shape" else torch.full_like(averaged_part, float("nan"))
                    return raw_part(lying, code=A.averaging_pb2.AVERAGED_PART)
                return honest(self, part_index, averaged_part, compression)

            monkeypatch.setattr(A.CanonicalAllReduceRunner, "_average_answer", one_value_averages)

    with three_averagers(tmp_path, inputs, "none", f"t_r0_{lie[:5]}", 3, rules=rules, before=cheat) as (dhts, averagers):
        results, outputs = step_all(averagers, 60)
        assert all(av.is_alive() for av in averagers)
    liar = bad["peer"].to_base58()
    assert all(r["reduced_parts"] > 0 for r in results), [r["reduced_parts"] for r in results]
    for r in results[:2]:
        if lie == "gradients":
            assert r["clean"] and not r["offenders"], r["offenders"]
        else:
            assert not r["clean"] and list(r["offenders"]) == [liar], r["offenders"]
            assert (r["failed_size"] > 0) == lie.startswith("reducer"), r["failed_size"]  # its averages refused: counted
            assert {"shape": "sent a part of shape [1] where", "dtype": "sent a part of torch.complex64 where torch.float32",
                    "reducer's shape": "as a reducer, sent a part of shape [1] where", "reducer's NaN": "as a reducer, sent NaN"}[lie] in r["offenders"][liar]
    for mine, out in zip(inputs[:2], outputs[:2]):  # every tensor keeps its shape and dtype, finite, without gradients
        assert [(o.shape, o.dtype) for o in out] == [(t.shape, t.dtype) for t in mine]
        assert all(torch.isfinite(o).all() and not o.requires_grad for o in out)


def test_a_step_is_not_retried_once_its_all_reduce_changed_the_tensors(tmp_path, monkeypatch):
    """The runner writes averages into the averager's tensors as they come (no copy of the model per
    step), so hivemind must not retry a step whose all-reduce began: the retry would average those
    averages again as if they were the member's delta, in a new group. Each member's first try ends
    with CancelledError after a clean all-reduce (what hivemind retries, and an exception that is no
    Exception): each member's step ends there with no result and says why, and nothing crashes."""
    import threading

    from coldfusion_p2p.swarm import averager as A

    g = torch.Generator().manual_seed(11)
    shapes = [(512, 512), (3000,)]
    inputs = [[torch.randn(s, generator=g) * 0.01 for s in shapes] for _ in range(3)]
    real = A.FusionAverager._aggregate_with_group

    def interrupt_every_try(_dhts):
        async def interrupted(self, group_info, min_vector_size, **kwargs):
            result = await real(self, group_info, min_vector_size, **kwargs)
            assert result["clean"], result["error"]
            raise asyncio.CancelledError()  # hivemind's _step retries on this, if it may

        monkeypatch.setattr(A.FusionAverager, "_aggregate_with_group", interrupted)

    with three_averagers(tmp_path, inputs, "none", "t_r0_retry", 3, before=interrupt_every_try) as (dhts, averagers):
        results = [None] * 3

        def one(i):
            results[i] = averagers[i].run_step(1.0, {"i": i}, timeout=20)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outputs = []
        for av in averagers:
            with av.get_tensors() as ts:
                outputs.append([t.clone() for t in ts])
        assert all(av.is_alive() for av in averagers)
    mean = [torch.stack([inp[k] for inp in inputs]).mean(0) for k in range(len(shapes))]
    for (result, _, _, error), out in zip(results, outputs):
        assert result is None and error.startswith("CancelledError"), error  # a retry would have come back clean
        assert all(torch.allclose(o, m, atol=1e-6) for o, m in zip(out, mean))  # the one try's average, nothing more


def test_an_average_out_of_turn_is_refused_before_it_is_written():
    """Averages are written into the local tensor as they are registered: one out of turn (a hostile
    leader that names a reducer twice gets two exchanges serving one slice) is refused before its
    values reach the tensor, as hivemind refuses it; one in turn lands in the part it averages."""
    from hivemind.p2p import PeerID

    from coldfusion_p2p.strategies import Strategy
    from coldfusion_p2p.swarm.averager import CanonicalAllReduceRunner, FusionAverager

    me, other = (PeerID.from_base58(p) for p in ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
                                                   "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"))

    class Local:
        peer_id = me

    async def scenario():
        local = torch.arange(96, dtype=torch.float32)
        runner = CanonicalAllReduceRunner(p2p=Local(), servicer_type=FusionAverager, prefix="x", group_id=b"g" * 20, tensors=[local],
                                          ordered_peer_ids=[me, other], peer_fractions=(1.0, 1.0), part_size_bytes=64,
                                          sender_timeout=1.0, reducer_timeout=2.0, rules={"part_bound": 1e9, "strategy": Strategy()})
        container, before = runner.tensor_part_container, local.clone()
        with pytest.raises(ValueError, match="out of turn"):
            container.register_processed_part(1, 1, torch.full((16,), 9.0))
        assert torch.equal(local, before)
        container.register_processed_part(1, 0, torch.full((16,), 9.0))
        first = container._input_parts_by_peer[1][0][0]  # the view of the local tensor that part was cut from
        changed = (local != before).nonzero().flatten().tolist()
        assert (first == 9.0).all() and len(changed) == first.numel() == 16 and local[changed[0]:changed[-1] + 1].data_ptr() == first.data_ptr()

    asyncio.run(scenario())


def test_a_sender_that_hangs_up_while_its_part_waits_breaks_the_part_for_no_one():
    """hivemind's reducer awaits a part's future bare, and every sender of that part awaits the same one:
    a sender whose handler was cancelled while it waited (it hung up, or crashed) cancelled the future,
    and the part's last sender then failed on ``set_result`` ("InvalidStateError: invalid state"), was
    banned, and the slice waited until the all-reduce's timeout (a flaky test here showed it: an honest
    member banned with that reason, 60 s lost). The part ends as usual for the senders still waiting,
    with the values of every sender that sent it, and the reducer goes on to the next part."""
    from coldfusion_p2p.strategies import Strategy
    from coldfusion_p2p.swarm.averager import StrategyPartReducer

    async def scenario():
        reducer = StrategyPartReducer([torch.Size([4]), torch.Size([4])], 3, Strategy())
        first = [asyncio.create_task(reducer.accumulate_part(i, 0, torch.full((4,), float(i)))) for i in (0, 1)]
        await asyncio.sleep(0.01)
        first[0].cancel()  # sender 0 hangs up while its part waits for sender 2's
        with contextlib.suppress(asyncio.CancelledError):
            await first[0]
        last = await reducer.accumulate_part(2, 0, torch.full((4,), 2.0))
        waited = await first[1]
        nxt = [asyncio.create_task(reducer.accumulate_part(i, 1, torch.full((4,), 10.0 * i))) for i in range(3)]
        return last, waited, await asyncio.gather(*nxt)

    last, waited, nxt = asyncio.run(scenario())
    assert torch.equal(last, torch.full((4,), 1.0)) and torch.equal(waited, last)  # (0 + 1 + 2) / 3: sender 0's part counts
    assert all(torch.equal(n, torch.full((4,), 10.0)) for n in nxt)


def test_a_reducer_does_not_ban_a_sender_whose_whole_share_it_took():
    """hivemind bans a sender whenever its handler ends in an exception; over p2pd a member hangs up as
    soon as it has every average, which may reach the reducer before its handler returns. A sender whose
    every part this reducer took is therefore never banned (a ban would change no value, only name an
    honest member as failed); one whose share is short still is."""
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    from coldfusion_p2p.strategies import Strategy
    from coldfusion_p2p.swarm.averager import CanonicalAllReduceRunner, FusionAverager
    from coldfusion_p2p.swarm.lane import raw_part

    me, other = (PeerID.from_base58(p) for p in ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
                                                   "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"))

    class Local:
        peer_id = me

    def runner():
        return CanonicalAllReduceRunner(p2p=Local(), servicer_type=FusionAverager, prefix="x", group_id=b"g" * 20,
                                        tensors=[torch.arange(96, dtype=torch.float32)], ordered_peer_ids=[me, other],
                                        peer_fractions=(1.0, 1.0), part_size_bytes=64, sender_timeout=2.0, reducer_timeout=4.0,
                                        rules={"part_bound": 1e9, "strategy": Strategy()})

    async def parts_of_other(r, count):
        for i, mine in enumerate(r.parts_for_local_averaging[:count]):
            first = {"code": averaging_pb2.PART_FOR_AVERAGING, "group_id": r.group_id} if i == 0 else {}
            yield raw_part(torch.ones_like(mine), weight=1.0, **first)

    async def scenario(count):
        r = runner()
        own = asyncio.create_task(r._communicate_with_peer(me))  # this reducer's own parts, locally
        answers = [a async for a in r._accumulate_parts_streaming(parts_of_other(r, count), r.sender_peer_ids.index(other))]
        await r._ban_sender(other)  # what hivemind does when the handler ends in an exception
        banned = other in r.banned_senders
        own.cancel()
        with contextlib.suppress(BaseException):
            await own
        return len(answers), len(r.parts_for_local_averaging), banned

    answered, share, banned = asyncio.run(scenario(10))
    assert answered == share == 3 and not banned
    answered, share, banned = asyncio.run(scenario(2))  # a sender one part short is banned, as before
    assert answered == 2 and banned


def test_a_step_whose_averager_process_died_ends_with_one_clear_error(tmp_path):
    """A step waits for its averager process; if that process dies (the OOM killer), the step ends
    with a WorkError within seconds instead of waiting for an answer that never comes."""
    import os
    import signal
    import threading
    import time

    from coldfusion_p2p.errors import WorkError

    with three_averagers(tmp_path, [[torch.randn(1000)]], "none", "dead", None, matchmaking_time=30.0) as (_, (av,)):
        killer = threading.Timer(1.0, os.kill, (av.pid, signal.SIGKILL))  # while it looks for a group
        killer.start()
        start = time.monotonic()
        try:
            with pytest.raises(WorkError, match="averager process ended unexpectedly"):
                av.run_step(1.0, {"i": 0}, timeout=60.0)
        finally:
            killer.cancel()
        assert time.monotonic() - start < 10.0  # not the step's 60 s, nor forever


def test_a_reducer_that_sends_one_member_other_averages_is_found_by_the_slice_digests(tmp_path, monkeypatch):
    """A reducer that sends one member of four slightly other averages than the rest (inside the round's bound,
    so no check catches them) leaves that member with another result. Every member's slice digests differ
    exactly at that reducer's slice. ``protocol.blame``: the member lied to sees the three others hold
    another digest for that slice and leaves out the reducer alone; the others, who cannot tell the lie from
    a liar, leave out that member, as before the digests."""
    from coldfusion_p2p.fusion import slice_digests
    from coldfusion_p2p.protocol import blame
    from coldfusion_p2p.swarm import averager as A
    from coldfusion_p2p.swarm.lane import raw_part

    g = torch.Generator().manual_seed(9)
    shapes = [(1024, 1024), (5000,)]
    inputs = [[torch.randn(s, generator=g) * 0.001 for s in shapes] for _ in range(4)]
    rules = {"min_weight": 1.0, "max_weight": 1.0, "part_bound": 5.0}
    who = {}

    def cheat(dhts):
        who["liar"], who["victim"] = dhts[3].peer_id, dhts[0].peer_id
        honest = A.CanonicalAllReduceRunner._accumulate_parts_streaming

        async def equivocating(self, stream, sender_index):
            async for answer in honest(self, stream, sender_index):
                if self.peer_id == who["liar"] and self.sender_peer_ids[sender_index] == who["victim"]:
                    answer = raw_part(A.part_tensor(answer) + 1e-4, code=A.averaging_pb2.AVERAGED_PART)
                yield answer

        monkeypatch.setattr(A.CanonicalAllReduceRunner, "_accumulate_parts_streaming", equivocating)

    with three_averagers(tmp_path, inputs, "none", "t_r0_equiv", 4, rules=rules, before=cheat) as (dhts, averagers):
        results, outputs = step_all(averagers, 60)
        ids = [dht.peer_id.to_base58() for dht in dhts]
    victim, liar = ids[0], ids[3]
    assert all(r["clean"] for r in results), [r.get("offenders") for r in results]  # nothing a check could catch
    total = sum(t.numel() for t in inputs[0])
    for r in results:
        assert [p for p, _ in r["slices"]] == r["group"]
        assert sum(n for _, n in r["slices"]) == total and all(n > 0 for _, n in r["slices"]), r["slices"]
    digests = {me: slice_digests(out, r["slices"]) for me, out, r in zip(ids, outputs, results)}
    assert set(digests[victim]) == set(ids)
    assert [p for p in ids if digests[victim][p] != digests[ids[1]][p]] == [liar]  # only the liar's slice differs
    assert digests[ids[1]] == digests[ids[2]] == digests[liar]  # the liar reports what it sent the others
    assert not torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[1][0], outputs[3][0])
    others = lambda me: {p: d for p, d in digests.items() if p != me}  # noqa: E731
    assert blame(victim, digests[victim], ids[1:], others(victim)) == {liar}
    for me in ids[1:3]:
        assert blame(me, digests[me], [victim], others(me), agree=[p for p in ids[1:] if p != me]) == {victim}


def test_stopping_an_averager_while_its_groups_run_cancels_them_without_an_error():
    """hivemind 1.1.12's shutdown calls ``finalize`` on each running group, but keeps futures of runners there, not
    runners: a peer stopped while its group ran printed an AttributeError traceback (red team 6)."""
    from types import SimpleNamespace

    from coldfusion_p2p.swarm.averager import FusionAverager

    async def main():
        loop = asyncio.get_running_loop()
        finalized = []
        runner = SimpleNamespace(finalize=lambda cancel=False: finalized.append(cancel))
        running, waiting, failed = loop.create_future(), loop.create_future(), loop.create_future()
        running.set_result(runner)
        failed.set_exception(RuntimeError("its all-reduce failed"))
        averager = SimpleNamespace(client_mode=True, _lane_server=None, _running_groups={b"a": running, b"b": waiting, b"c": failed})
        await FusionAverager._shutdown(averager, timeout=1.0)
        return finalized, waiting.cancelled()

    assert asyncio.run(main()) == ([True], True)
