"""The fusion phase at link speed: this project's all-reduce against torch.distributed's gloo, same tensors.

For each group size and vector size it runs, in one process tree on this machine:

- gloo: P processes (``torch.distributed``, backend gloo, TCP on 127.0.0.1) all-reduce the same
  float32 vector; the figure is the slowest rank's ``all_reduce`` time, median over the repeats.
- cfp2p: P real averagers (DHT, averager process, p2pd each, on loopback) run one round's fusion
  as ``cfp2p join`` does: matchmaking (group forming, each member told the round's ready peers as
  ``join`` reads them from the records, no target size), the verifying all-reduce with the
  round's rules and strategy, and verify (copying and checking the result, adding it to the base and
  hashing the new base, and beside that the digest of each reducer's slice, as each member does before
  it signs).

    python bench/allreduce.py --peers 2 4 8 --values 22.7e6 110e6 --repeats 2

Each size runs twice: parts over the direct lane (``swarm/lane.py``, what ``cfp2p join`` uses) and
over hivemind's p2pd streams (``--transports`` picks); ``lanes`` is the share of member-to-reducer
exchanges that went over a lane. Before the timed repeats the averagers run one all-reduce untimed, as
a swarm's peers have from their second round on: it tells each member its link rate, and the group
then picks its part size from the members' rates (``averager.group_part_bytes``); ``part KiB`` is the
part size the timed all-reduces used.

Figures are printed, one row per (P, values), and written as JSON with ``--out``. On a shared
machine every process competes for the same cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

LAYER = 1 << 20  # values per tensor: a model is many tensors, and the all-reduce splits each into parts


def tensors_for(rank: int, values: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    sizes = [LAYER] * (values // LAYER) + ([values % LAYER] if values % LAYER else [])
    return [torch.randn(n, generator=g) * 1e-3 for n in sizes]


def fix_part_size(parts: str) -> None:
    """``--parts``: "usual" or "wide" makes every group of the averagers forked after this use 512 KiB or
    2 MiB parts, whatever its members' rates; "auto" leaves the choice to the groups."""
    if parts == "auto":
        return
    from coldfusion_p2p.swarm import averager

    fixed = averager.WIDE_PART_BYTES if parts == "wide" else averager.PART_SIZE_BYTES
    averager.group_part_bytes = lambda *_args, **_kwargs: fixed


def _gloo_rank(rank: int, size: int, port: int, values: int, repeats: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    flat = torch.cat(tensors_for(rank, values))
    times = []
    for _ in range(repeats):
        x = flat.clone()
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        x.div_(size)
        times.append(time.perf_counter() - start)
    out.put((rank, times))
    dist.barrier()
    dist.destroy_process_group()


def gloo(size: int, values: int, repeats: int) -> float:
    """The slowest rank's all_reduce seconds, median over repeats."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, size, port, values, repeats, out)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        per_rank = [out.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return statistics.median(max(times[i] for _, times in per_rank) for i in range(repeats))


def _why_unclean(result: dict | None) -> str:
    """What a member's own view of an unclean all-reduce says went wrong."""
    if not result:
        return "no result"
    said = {k: result.get(k) for k in ("error", "failure_reasons", "offenders", "banned", "ban_reasons", "failed_reducers", "failed_size") if result.get(k)}
    return f"unclean: {said}" if said else "unclean"


def cfp2p(size: int, values: int, repeats: int, compression: str, matchmaking_time: float, lane: bool = True) -> dict:
    """One fusion phase per repeat with ``size`` real averagers: medians of matchmaking, all-reduce, verify."""
    from coldfusion_p2p.fusion import check_delta, slice_digests
    from coldfusion_p2p.model import hash_body
    from coldfusion_p2p.strategies import Strategy
    from coldfusion_p2p.swarm import make_averager, quiet_hivemind, start_dht
    from coldfusion_p2p.swarm.node import peer_str

    quiet_hivemind()
    dhts, averagers, rows = [], [], []
    inputs = [tensors_for(r, values) for r in range(size)]
    names = [f"{i:05d}" for i in range(len(inputs[0]))]
    base = {n: t.clone() for n, t in zip(names, inputs[-1])}  # any base of the same shapes: verify's step adds to it
    with tempfile.TemporaryDirectory(prefix="cfp2p-bench-") as tmp:
        try:
            first = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            dhts.append(first)
            peers = [str(a) for a in first.get_visible_maddrs()]
            dhts += [start_dht(peers, ["/ip4/127.0.0.1/tcp/0"]) for _ in range(size - 1)]
            for dht, tensors in zip(dhts, inputs):
                averagers.append(make_averager(dht, "bench", [t.clone() for t in tensors], Path(tmp), compression,
                                               matchmaking_time, 600.0, size, lane=lane))
            rules = {"min_weight": 1.0, "max_weight": 1.0, "part_bound": 1e9, "strategy": Strategy()}
            ready = sorted(peer_str(d.peer_id) for d in dhts)  # as in cfp2p join: every member knows the round's ready peers
            for rep in range(-1, repeats):  # -1: the untimed first all-reduce (see the module's docstring)
                for av, tensors in zip(averagers, inputs):
                    av.set_round(f"bench_r{rep}", None, size, rules=rules, expect=ready)
                    with av.get_tensors() as ts:
                        for t, x in zip(ts, tensors):
                            t.copy_(x)
                results = [None] * size
                start = time.perf_counter()

                def one(i):
                    results[i] = averagers[i].run_step(1.0, {"i": i, "expect": ready}, timeout=600)

                threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                errors = [r[3] or _why_unclean(r[0]) for r in results if r[0] is None or not r[0].get("clean")]
                if errors:
                    raise RuntimeError(f"the all-reduce failed: {errors[0]}")
                if rep < 0:
                    continue
                t0 = time.perf_counter()
                with averagers[0].get_tensors() as ts:  # verify, as a member does before it signs: its own copy
                    averaged = [t.clone() for t in ts]  # of the result, its check, the next base, and its hash,
                if not check_delta(averaged, float("inf")).ok:  # with the digests of the reducers' slices beside them
                    raise RuntimeError("the all-reduce's result holds NaN or Inf")
                digests = {}

                def digest(slices=results[0][0].get("slices") or []):
                    with averagers[0].get_tensors() as ts:
                        digests.update(slice_digests(ts, slices))

                digesting = threading.Thread(target=digest)
                digesting.start()
                hash_body(Strategy().step(base, names, averaged, consume=True))
                digesting.join()
                if not digests:
                    raise RuntimeError("no slice digests")
                verify = time.perf_counter() - t0
                rows.append({"lanes": sum(len(r[0].get("lanes", [])) for r in results) / max(1, size * (size - 1)),
                             "part_kib": min(r[0].get("part_bytes", 0) for r in results) / 1024,
                             "matchmaking": max(r[1] for r in results), "allreduce": max(r[2] for r in results),
                             "verify": verify, "wall": wall + verify})
        finally:
            for av in averagers:
                av.shutdown()
            for dht in dhts:
                dht.shutdown()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--values", type=float, nargs="+", default=[22.7e6, 110e6], help="float32 values in the vector")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compression", choices=("none", "float16", "8bit"), default="none")
    ap.add_argument("--matchmaking-time", type=float, default=3.0, help="the manifest's round.matchmaking_time")
    ap.add_argument("--transports", nargs="+", choices=("lane", "p2pd"), default=["lane", "p2pd"],
                    help="lane: parts over the direct encrypted TCP lane (the default in cfp2p join); p2pd: over hivemind's streams")
    ap.add_argument("--seal-loopback", action="store_true",
                    help="encrypt lanes over loopback too, as between machines (by default loopback lanes go unencrypted)")
    ap.add_argument("--parts", choices=("auto", "usual", "wide"), default="auto",
                    help="auto: the part size each group picks from its members' rates, as in a swarm; usual or wide: "
                         "always 512 KiB or always 2 MiB parts (to compare the two)")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fix_part_size(args.parts)  # the averager processes fork from this one and keep it
    if args.seal_loopback:
        from coldfusion_p2p.swarm import lane

        lane.SEAL_LOOPBACK = True  # the averager processes fork from this one and keep it

    rows = []
    print(f"{'peers':>5} {'values':>8} {'gloo s':>8} {'transport':>9} {'lanes':>6} {'part KiB':>9} {'cfp2p all-reduce s':>19} {'x gloo':>7} "
          f"{'matchmaking s':>14} {'verify s':>9} {'fusion s':>9} {'x gloo':>7}", flush=True)
    for values in (int(v) for v in args.values):
        for size in args.peers:
            g = gloo(size, values, args.repeats)
            for transport in args.transports:
                c = cfp2p(size, values, args.repeats, args.compression, args.matchmaking_time, lane=transport == "lane")
                row = {"peers": size, "values": values, "compression": args.compression, "transport": transport, "gloo_s": g,
                       **{f"{k}_s" if k not in ("lanes", "part_kib") else k: v for k, v in c.items()}}
                rows.append(row)
                print(f"{size:>5} {values / 1e6:>7.1f}M {g:>8.2f} {transport:>9} {c['lanes']:>6.0%} {c['part_kib']:>9.0f} {c['allreduce']:>19.2f} "
                      f"{c['allreduce'] / g:>7.1f} {c['matchmaking']:>14.2f} {c['verify']:>9.2f} {c['wall']:>9.2f} {c['wall'] / g:>7.1f}",
                      flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
