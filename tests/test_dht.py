"""The DHT process survives a client that dies mid-request (hivemind 1.1.12 crashed on it)."""

import contextlib
import multiprocessing as mp
import os
import sys
import time

from coldfusion_p2p import swarm


def test_dht_survives_a_request_whose_sender_exited():
    dht = swarm.start_dht()
    try:
        def send_and_die():
            # what an averager does when it declares itself for matchmaking and is shut down at once:
            # the request's MPFuture carries a pipe handle that only the (now dead) sender can hand over
            dht._outer_pipe.send(("_get", [], dict(key="k", latest=False, future=swarm.MPFuture())))
            os._exit(0)

        child = mp.get_context("fork").Process(target=send_and_die)
        child.start()
        child.join(10)
        time.sleep(2.0)  # the DHT reads the request and fails to fetch the handle
        assert dht.is_alive()
        assert dht.store("still.here", True, swarm.dht_time() + 30, subkey=b"peer")  # a matchmaking record's shape
        assert dht.get("still.here", latest=True).value[b"peer"].value is True
    finally:
        swarm.stop_process(dht)


def test_a_child_dying_while_fetching_a_handle_prints_no_traceback():
    # the reverse case: our resource-sharer thread serves a handle to a child that dies mid-handshake
    # (a group-wide Ctrl+C or SIGTERM); multiprocessing hands the reset to sys.excepthook
    import socket
    from multiprocessing import resource_sharer

    seen = []
    previous = sys.excepthook
    sys.excepthook = lambda kind, value, tb: seen.append(kind)
    try:
        swarm.quiet_hivemind()
        read, write = os.pipe()
        try:
            resource_sharer.DupFd(read)  # starts the sharer thread with a handle on offer
            address = resource_sharer._resource_sharer._address
            with socket.socket(socket.AF_UNIX) as s:  # a "child" that connects, then dies before answering
                s.connect(address)
            time.sleep(0.5)  # the sharer thread reads the handshake and fails
            assert seen == []  # dropped, not printed
            sys.excepthook(ValueError, ValueError("other"), None)
            assert seen == [ValueError]  # every other error still reaches the previous hook
        finally:
            os.close(read)
            os.close(write)
    finally:
        sys.excepthook = previous


@contextlib.contextmanager
def _victim_and_outsider():
    """A peer's DHT node (``swarm.start_dht``: its validators, budgets and bounds) and a plain hivemind node joined to
    it (hivemind's own, with fresh keys: what an outsider runs); both ended on the way out."""
    import hivemind

    victim = swarm.start_dht()
    outsider = None
    try:
        outsider = hivemind.DHT(initial_peers=[str(a) for a in victim.get_visible_maddrs()], start=True)
        yield victim, outsider
    finally:
        if outsider is not None:
            outsider.shutdown()
        swarm.stop_process(victim)


async def _store_at(victim, _dht, node):
    """Run in a plain hivemind node's DHT process: ask ``victim`` to keep records at keys that are not the protocol's."""
    from hivemind.dht.routing import DHTID
    from hivemind.proto import dht_pb2
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    now, looking = get_dht_time(), MSGPackSerializer.dumps(True)  # what hivemind's matchmaking keeps at such keys

    async def store(names, values, expiration, subkeys=None):
        keys = [DHTID.generate(source=name) for name in names]
        answer = await node.protocol.call_store(victim, keys, values, [expiration] * len(keys), subkeys)
        return None if answer is None else list(answer)  # None: no answer at all

    async def raw(request):  # the answer's store_ok, or the error's name: hivemind raises on bytes it cannot parse
        try:
            return list((await node.protocol.get_stub(victim).rpc_store(request, timeout=10)).store_ok)
        except Exception as e:  # noqa: BLE001 - what the caller sees
            return type(e).__name__

    # 1,200 records that make hivemind's rpc_store raise (a key that is no DHT ID), between two good ones: counted
    # as 1 KB each, they would fill the 1 MiB budget while storing nothing
    good = [DHTID.generate(source=name).to_bytes() for name in ("before_junk", "after_junk")]
    peer = MSGPackSerializer.dumps(b"peer-z")
    said = {"junk": await raw(dht_pb2.StoreRequest(
        keys=[good[0], *[b"\xff" * 21] * 1200, good[1]], subkeys=[peer] * 1202, values=[looking] * 1202,
        expiration_time=[now + 300] * 1202, in_cache=[False] * 1202, peer=node.protocol.node_info))}
    said["matchmaking"] = await store(["a_round.0b"], [looking], now + 15, [b"peer-1"])
    said["a day"] = await store(["for_a_day"], [looking], now + 86400, [b"peer-1"])
    said["not a bool"] = await store(["long"], [b"x" * (10 << 10)], now + 15, [b"peer-1"])
    said["plain"] = await store(["plain"], [looking], now + 15)
    from hivemind.dht.storage import DictionaryDHTValue

    whole = DictionaryDHTValue()
    whole.store(b"sub", looking, now + 1e7)  # a whole dictionary whose entry asks for four months, sent as if for 15 s
    said["dictionary"] = await store(["whole"], [whole], now + 15)
    said["flood"] = []
    for i in range(8):  # 8 x 256 records, each counted as 1 KB: 2 MiB, for five minutes
        said["flood"] += await store([f"flood_{i}_{j}" for j in range(256)], [looking] * 256, now + 300, [b"peer-2"] * 256)
    said["after"] = await store(["b_round.0b"], [looking], now + 15, [b"peer-2"])
    odd = dht_pb2.StoreRequest(keys=[DHTID.generate(source="odd").to_bytes()], subkeys=[peer] * 2, values=[looking],
                               expiration_time=[now + 60], in_cache=[False], peer=node.protocol.node_info)
    said["one more subkey"] = list((await node.protocol.get_stub(victim).rpc_store(odd, timeout=10)).store_ok)
    return said


async def _kept(names, _dht, node):
    """Run in the victim's DHT process: which of these keys its own storage holds."""
    from hivemind.dht.routing import DHTID

    return {name: node.protocol.storage.get(DHTID.generate(source=name)) is not None for name in names}


def test_a_plain_hivemind_node_cannot_fill_a_peers_dht_with_records_at_other_keys(monkeypatch):
    """hivemind keeps whatever another node asks it to store, at any key, as long and as large as asked: a
    plain hivemind node could grow a peer's DHT process until the system ended it. A record at a key that
    is not the protocol's is now refused unless it is shaped as hivemind's matchmaking keeps it (a peer id's
    bytes as subkey, True or False, for at most ``FOREIGN_TTL``), or when it is a whole dictionary (whose
    entries name their own expirations), and once those taken and not yet expired reach ``FOREIGN_BYTES``
    (1 MiB here, each record counted as at least 1 KB): the flood is cut at the budget, later records at
    such keys are refused until it expires, and the peer's DHT goes on serving its own records."""
    import functools

    from coldfusion_p2p.swarm import validation

    monkeypatch.setattr(validation, "FOREIGN_BYTES", 1 << 20)  # before the fork: the victim's DHT process keeps it
    with _victim_and_outsider() as (victim, outsider):
        said = outsider.run_coroutine(functools.partial(_store_at, victim.peer_id))
        assert victim.is_alive()
        kept = victim.run_coroutine(functools.partial(
            _kept, ["a_round.0b", "flood_0_0", "flood_7_255", "long", "whole", "before_junk", "after_junk"]))
        assert victim.store("still.here", True, swarm.dht_time() + 30, subkey=b"peer")
        assert victim.get("still.here", latest=True).value[b"peer"].value is True
    assert said["matchmaking"] == [True] and said["a day"] == said["not a bool"] == said["plain"] == [False], said
    assert said["dictionary"] == [False] and said["one more subkey"] == [False], said  # hivemind zips the columns
    taken = sum(said["flood"])
    assert len(said["flood"]) == 2048 and 1000 <= taken <= 1024, taken  # 1 MiB of records counted as 1 KB, then no more
    assert said["flood"][:taken] == [True] * taken and said["after"] == [False], said["after"]
    assert said["junk"] == [True] + [False] * 1200 + [True], said["junk"]  # each record judged alone, none fills the budget
    assert kept == {"a_round.0b": True, "flood_0_0": True, "flood_7_255": False, "long": False, "whole": False,
                    "before_junk": True, "after_junk": True}, kept


async def _find_at(victim, big_key, _dht, node):
    """Run in a plain hivemind node's DHT process: ask ``victim`` to find keys, as a red-team node did."""
    import os
    import time

    from hivemind.dht.routing import DHTID
    from hivemind.proto import dht_pb2

    async def find(keys):
        started = time.monotonic()
        answer = await node.protocol.get_stub(victim).rpc_find(dht_pb2.FindRequest(keys=keys, peer=node.protocol.node_info), timeout=60)
        return [(r.type, len(r.value), len(r.nearest_peer_ids)) for r in answer.results], time.monotonic() - started

    said = {"90,000 random keys": await find([os.urandom(20) for _ in range(90_000)])}
    said["257 keys"] = await find([DHTID.generate().to_bytes() for _ in range(257)])
    said["a key that is no DHT ID"] = await find([DHTID.generate().to_bytes(), b"\xff" * 21])  # hivemind raised on it
    big = DHTID.generate(source=big_key).to_bytes()
    said["one value 200 times"] = await find([big] * 200 + [DHTID.generate().to_bytes()])
    return said


async def _keep_locally(_dht, node):
    from hivemind.dht.routing import DHTID
    from hivemind.utils.timed_storage import get_dht_time

    return node.protocol.storage.store(DHTID.generate(source="big.one"), node.protocol.serializer.dumps(b"v" * 50_000),
                                       get_dht_time() + 60)


def test_a_find_request_answers_a_bounded_number_of_keys_and_each_value_once():
    """hivemind answers every key of a find request, with the value it holds and 20 nearest neighbours each, before
    a byte is sent: 90,000 random keys a request from a red-team node grew a peer's DHT process to 1.8 GiB and held
    its event loop for seconds (median 6.5 s for a local read meanwhile). A request past ``FIND_KEYS`` (256) keys
    now gets an empty answer, and a value asked for many times in one request is sent once."""
    import functools

    with _victim_and_outsider() as (victim, outsider):
        assert victim.run_coroutine(_keep_locally)  # a value this node holds (its own storage: no network in the way)
        said = outsider.run_coroutine(functools.partial(_find_at, victim.peer_id, "big.one"))
        assert victim.is_alive() and victim.get("big.one", latest=True).value == b"v" * 50_000  # still served
    answers, seconds = said["90,000 random keys"]
    assert answers == [] and seconds < 5, (len(answers), seconds)
    assert said["257 keys"][0] == [] and said["a key that is no DHT ID"][0] == []
    answers, _ = said["one value 200 times"]
    assert len(answers) == 201 and answers[0][0] != 0 and answers[0][1] > 50_000, answers[:2]  # found, its bytes
    assert all(t == 0 and size == 0 for t, size, _ in answers[1:]), answers[1:3]  # the repeats: not found (neighbours only)


async def _store_again(victim, _dht, node):
    """Run in a plain hivemind node's DHT process: one tiny record sent again and again, and a record's older copy."""
    import asyncio

    from hivemind.dht.routing import DHTID
    from hivemind.utils.timed_storage import get_dht_time

    from hivemind.utils.serializer import MSGPackSerializer

    now, again, short = get_dht_time(), DHTID.generate(source="again"), DHTID.generate(source="short")
    yes, no = MSGPackSerializer.dumps(True), MSGPackSerializer.dumps(False)  # matchmaking records
    said = []
    for _ in range(4):  # 20,000 stores of the same record
        said += await node.protocol.call_store(victim, [again] * 5000, [yes] * 5000, [now + 300] * 5000, [b"peer-x"] * 5000)
    said += await node.protocol.call_store(victim, [short], [yes], [now + 60], [b"peer-y"])
    said += await node.protocol.call_store(victim, [short], [no], [now + 1], [b"peer-y"])  # an older copy: refused
    await asyncio.sleep(2.0)  # past the older copy's expiration
    return said


async def _heaps(_dht, node):
    """Run in the victim's DHT process: its storage's heap, the dictionary's heap, and whether "short" is still held."""
    from hivemind.dht.routing import DHTID

    storage = node.protocol.storage
    again, short = storage.get(DHTID.generate(source="again")), storage.get(DHTID.generate(source="short"))
    return len(storage.expiration_heap), len(again.value.expiration_heap), short is not None and len(short.value) == 1


def test_a_record_sent_again_and_again_leaves_no_trace_and_an_older_copy_cuts_no_record_short():
    """hivemind's storage pushed an entry on its expiration heap at every store, also one it refused, kept until that
    entry's expiration (a red-team node grew a peer's DHT process by about 200 MiB a minute with one tiny record sent
    again and again), and pointed the key at the refused entry: the record held was deleted at the older copy's
    expiration. In our DHT processes a refused store now leaves storage as it was."""
    import functools

    with _victim_and_outsider() as (victim, outsider):
        said = outsider.run_coroutine(functools.partial(_store_again, victim.peer_id))
        heap, entries, short_held = victim.run_coroutine(_heaps)
    assert said[0] and not any(said[1:20_000]) and said[20_000] and not said[20_001], said[:3]
    assert entries <= 2 and heap <= 8, (heap, entries)  # was 20,000 entries for one record
    assert short_held  # the refused older copy did not take the record with it at its expiration


async def _hold_junk(_dht, node):
    """Run in a plain hivemind node's DHT process: hold 2,000 entries at a matchmaking-like key, expiring in three
    years, and a matchmaking record at another, to answer other nodes' lookups with."""
    from hivemind.dht.routing import DHTID
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    now, looking = get_dht_time(), MSGPackSerializer.dumps(True)
    junk = DHTID.generate(source="a_round.0b")
    for i in range(2000):
        node.protocol.storage.store_subkey(junk, f"junk-{i}".encode(), b"j" * 100, now + 3 * 365 * 86400)
    return node.protocol.storage.store_subkey(DHTID.generate(source="b_round.0b"), b"peer-1", looking, now + 30)


async def _held(names, _dht, node):
    """Run in the victim's DHT process: the entries its storage and cache hold at these keys."""
    from hivemind.dht.routing import DHTID

    out = {}
    for name in names:
        key = DHTID.generate(source=name)
        out[name] = sum(len(found.value) for found in (node.protocol.storage.get(key), node.protocol.cache.get(key))
                        if found is not None and hasattr(found.value, "__len__"))
    return out


def test_answers_to_a_peers_own_lookups_at_other_keys_take_only_matchmaking_records():
    """A peer's lookups at hivemind's matchmaking keys merged whatever the answering node sent into what the peer
    holds, unchecked (a red-team node answered each with 20,000 new entries expiring in three years: +200 MiB in a
    minute). Now a record at a key that is not the protocol's is refused, stored or found, unless it is shaped as
    matchmaking keeps it, and hivemind drops such an answer whole."""
    import functools

    with _victim_and_outsider() as (victim, outsider):
        assert outsider.run_coroutine(_hold_junk)
        junk = victim.get("a_round.0b", latest=True)
        honest = victim.get("b_round.0b", latest=True)
        held = victim.run_coroutine(functools.partial(_held, ["a_round.0b", "b_round.0b"]))
    assert junk is None and held["a_round.0b"] == 0, (None if junk is None else len(junk.value), held)
    assert honest is not None and honest.value[b"peer-1"].value is True  # a matchmaking record is still found


async def _ping_as_many(victim, _dht, node):
    """Run in a plain hivemind node's DHT process: 2,000 matchmaking records for the victim to hold, then 500 pings,
    each naming a fresh node id for the same peer."""
    from hivemind.dht.routing import DHTID
    from hivemind.proto import dht_pb2
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    keys = [DHTID.generate(source=f"held_{i}") for i in range(2000)]
    stored = await node.protocol.call_store(victim, keys, [MSGPackSerializer.dumps(True)] * 2000, [get_dht_time() + 300] * 2000,
                                            [b"peer-h"] * 2000)
    stub = node.protocol.get_stub(victim)
    for _ in range(500):
        await stub.rpc_ping(dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=DHTID.generate().to_bytes()), validate=False), timeout=10)
    return sum(stored)


async def _table(_dht, node):
    """Run in the victim's DHT process: node ids in its routing table, and how often it offered a peer its records."""
    from coldfusion_p2p.swarm import node as N

    return len(node.protocol.routing_table.uid_to_peer_id), getattr(N, "_offers", None)


def test_one_peer_holds_one_place_in_a_routing_table_and_is_offered_records_once_in_a_while():
    """A request names its sender's node id, and hivemind took every id a peer named as a new node: a red-team node
    pinging with a fresh id each time grew a peer's routing table by 40,842 entries (about 65 MiB a minute), and for
    each new id hivemind walked the whole of its storage to offer the newcomer records (with 15,000 records held, the
    peer's DHT answered 20 to 30 s late). Now a peer id holds one node id, and is offered records once in a while."""
    import functools

    with _victim_and_outsider() as (victim, outsider):
        held = outsider.run_coroutine(functools.partial(_ping_as_many, victim.peer_id))
        entries, offers = victim.run_coroutine(_table)
        assert victim.is_alive()
    assert held >= 1000, held  # the records the walk would go over were there
    assert entries <= 2 and offers is not None and offers <= 2, (entries, offers)  # was 501 node ids, and 501 walks


def test_a_store_budget_counts_what_is_held_gives_back_what_was_refused_and_frees_what_expired():
    from coldfusion_p2p.swarm.validation import FOREIGN_RECORD_COST, StoreBudget

    budget = StoreBudget(lambda: 8500)
    a, b, c = (b"a", b""), (b"b", b""), (b"c", b"")
    assert budget.take(a, 4000, 100.0, 0.0) and budget.take(b, 4000, 200.0, 0.0)
    assert not budget.take(c, 4000, 50.0, 0.0) and budget.used == 8000  # full
    count = budget.take(a, 4400, 150.0, 0.0)
    assert count and budget.used == 8400  # a record that replaces one replaces its count
    budget.restore(*count[1:])  # hivemind refused it: the count before comes back
    assert budget.used == 8000
    for _ in range(5000):  # the same record again and again costs no room, and the heap stays small
        assert budget.take(b, 4000, 200.0, 0.0)
    assert budget.used == 8000 and len(budget._expiring) < 3000
    assert budget.take(c, 4000, 160.0, 101.0) and budget.used == 8000  # a (expiring at 100) freed its room
    assert budget.take((b"d", b""), 0, 160.0, 101.0) is None  # an empty one counts FOREIGN_RECORD_COST: no room left
    assert FOREIGN_RECORD_COST > 8500 - 8000


def test_a_store_budget_takes_no_expiration_that_is_not_a_number():
    """A NaN expiration compares false with everything: at the top of the budget's heap it stopped every later
    record from ever expiring there, so the budget filled for good (a store request may carry any double)."""
    from coldfusion_p2p.swarm.validation import StoreBudget

    budget = StoreBudget(lambda: 4096)
    assert budget.take((b"n", b""), 10, float("nan"), 0.0) is None
    assert budget.take((b"i", b""), 10, float("inf"), 0.0) is None
    assert budget.take((b"a", b""), 3000, 10.0, 0.0) and not budget.take((b"b", b""), 3000, 20.0, 0.0)
    assert budget.take((b"b", b""), 3000, 20.0, 11.0)  # a expired at 10 and gave its room back
