"""What a plain hivemind node's stores cost a peer's DHT process: records taken, and its memory.

It starts one peer's DHT node (``coldfusion_p2p.swarm.start_dht``, with its store budgets) and one plain
``hivemind.DHT`` on localhost; the plain node calls ``rpc_store`` on the peer directly, ``--calls`` times
with 16 records of ``--record-bytes`` each at keys that are not the protocol's, each asking to be kept
``--keep`` seconds. It prints how many the peer took and its DHT process's resident memory before and
after. ``--uncapped`` runs the peer's node without its checks at such keys (hivemind as it comes), to
compare; ``--matchmaking`` sends records shaped as hivemind's matchmaking keeps them (a peer id's bytes
and True: the only ones a peer keeps at such keys), the flood that the store budget is left to stop.

    python bench/dht_flood.py                           # 300 calls of 16 x 60 KB records for 5 minutes
    python bench/dht_flood.py --uncapped
    python bench/dht_flood.py --matchmaking --calls 4096
"""

from __future__ import annotations

import argparse
import functools
import time


async def _flood(victim, calls: int, record_bytes: int, keep: float, matchmaking: bool, _dht, node):
    from hivemind.dht.routing import DHTID
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    now, taken, started = get_dht_time(), 0, time.monotonic()
    value = MSGPackSerializer.dumps(True) if matchmaking else b"y" * record_bytes
    subkeys = [b"\x12\x20" + b"p" * 32] * 16 if matchmaking else None
    for i in range(calls):
        keys = [DHTID.generate(source=f"flood_{i}_{j}") for j in range(16)]
        answer = await node.protocol.call_store(victim, keys, [value] * 16, [now + keep] * 16, subkeys)
        taken += sum(answer or [])
    return taken, time.monotonic() - started


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--record-bytes", type=int, default=60_000)
    parser.add_argument("--keep", type=float, default=300.0, help="seconds each record asks to be kept")
    parser.add_argument("--uncapped", action="store_true", help="the peer's node without its checks at other keys")
    parser.add_argument("--matchmaking", action="store_true", help="records shaped as hivemind's matchmaking keeps them")
    args = parser.parse_args()

    import hivemind

    from coldfusion_p2p import swarm
    from coldfusion_p2p.swarm import node as N
    from coldfusion_p2p.swarm import validation as V

    if args.uncapped:  # read when the DHT process starts
        N._bound_dht_handlers = lambda: None
        V._matchmaking_shaped = lambda record: True
    victim = swarm.start_dht()
    outsider = None
    try:
        outsider = hivemind.DHT(initial_peers=[str(a) for a in victim.get_visible_maddrs()], start=True)
        before = _rss_mib(victim.pid)
        taken, took = outsider.run_coroutine(functools.partial(_flood, victim.peer_id, args.calls, args.record_bytes, args.keep,
                                                                       args.matchmaking))
        time.sleep(1.0)
        after = _rss_mib(victim.pid)
        sent = 16 * args.calls
        what = "matchmaking records" if args.matchmaking else f"records of {args.record_bytes} bytes"
        print(f"{'uncapped' if args.uncapped else 'with its checks'}: {taken} of {sent} {what} "
              f"taken in {took:.1f} s; the peer's DHT process {before:.0f} -> {after:.0f} MiB resident; alive: {victim.is_alive()}")
    finally:
        if outsider is not None:
            outsider.shutdown()
        swarm.stop_process(victim)


if __name__ == "__main__":
    main()
