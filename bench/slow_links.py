"""The all-reduce on slow links: each peer in its own network namespace, its uplink limited with tc.

Every peer gets a namespace joined to a hub bridge by a veth pair; the peer's side has a ``tbf``
qdisc at ``--rate`` (its uplink: every byte another peer receives was sent through someone's
limit). One process per peer (``ip netns exec``) starts a DHT node and an averager with the tensors
of a model of ``--values`` float32 values, and all run one all-reduce together. The figure is
the slowest member's all-reduce time against the bound a butterfly all-reduce cannot beat: each
peer sends 2(P-1)/P of the vector through its uplink, so ``2(P-1)/P * bytes / rate``.

Needs root, ``ip`` and ``tc`` (Linux). Nothing leaves this machine.

    python bench/slow_links.py --peers 2 4 --rates 100mbit 20mbit --compression none float16

Each setting runs twice by default: parts over the direct lane (encrypted: the peers are on
different addresses) and over hivemind's p2pd streams (``--transports``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    raise SystemExit(f"--rates takes values like 100mbit, not {rate!r}")


def worker(args) -> None:
    """One peer, inside its namespace: DHT, averager, one all-reduce; timings to ``--result``."""
    import torch

    from bench.allreduce import fix_part_size, tensors_for
    from coldfusion_p2p.strategies import Strategy
    from coldfusion_p2p.swarm import make_averager, quiet_hivemind, start_dht, visible_maddrs

    if not os.environ.get("CFP2P_KEEP_LOGS"):
        quiet_hivemind()
    torch.set_num_threads(1)
    fix_part_size(args.parts)  # a single all-reduce has no rate to go on: "auto" always takes 512 KiB parts
    work = Path(args.work)
    peers = [] if args.rank == 0 else (work / "root.maddrs").read_text().split()
    dht = start_dht(peers, [f"/ip4/{args.host}/tcp/0"])
    averager = None
    try:
        if args.rank == 0:
            (work / "root.maddrs").write_text(" ".join(visible_maddrs(dht)))
        tensors = tensors_for(args.rank, args.values)
        averager = make_averager(dht, "slow", [t.clone() for t in tensors], work, args.compression, 3.0, 900.0, args.size,
                                 chunk_timeout=120.0, lane=args.transport == "lane")
        averager.set_round("slow_r0", args.size, args.size,
                           rules={"min_weight": 1.0, "max_weight": 1.0, "part_bound": 1e9, "strategy": Strategy()})
        (work / f"ready-{args.rank}").write_text("1")
        while not (work / "go").exists():
            time.sleep(0.1)
        result, matchmaking, allreduce, error = averager.run_step(1.0, {"i": args.rank}, timeout=900)
        (work / f"result-{args.rank}.json").write_text(json.dumps(
            {"matchmaking": matchmaking, "allreduce": allreduce, "clean": bool(result and result.get("clean")),
             "lanes": len(result.get("lanes", [])) if result else 0,
             "error": error or ("" if not result or result.get("clean") else
                                f"{result.get('error')} failed {result.get('failed_size')} banned {result.get('banned')} "
                                f"offenders {result.get('offenders')} {result.get('failure_reasons')}")}))
        # A member's own result can be complete while the averages it reduces for the others are still
        # queued in its rate-limited uplink (its p2pd's and the kernel's buffers): leaving now would cut
        # them off mid-stream. ``cfp2p join`` never does that (it commits only after every member's
        # verdict, so after every member has its result); here every worker waits for all the results.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all((work / f"result-{i}.json").exists() for i in range(args.size)):
            time.sleep(0.2)
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def run(size: int, rate: str, compression: str, values: int, transport: str = "lane", parts: str = "auto") -> dict:
    tag = f"cfs{os.getpid() % 10000}"
    hub = tag + "hub"
    subnet = f"10.{100 + os.getpid() % 50}.{os.getpid() % 250}"
    namespaces = [hub] + [f"{tag}p{i}" for i in range(size)]
    procs = []
    with tempfile.TemporaryDirectory(prefix="cfp2p-slow-") as work:
        try:
            for ns in namespaces:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub, "link", "set", "br0", "up")
            for i in range(size):
                ns, a, b = namespaces[i + 1], f"{tag}a{i}", f"{tag}b{i}"
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", a, "netns", ns)
                _ip("link", "set", b, "netns", hub)
                _ip("-n", hub, "link", "set", b, "master", "br0")
                _ip("-n", hub, "link", "set", b, "up")
                _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", a)
                _ip("-n", ns, "link", "set", a, "up")
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", a, "root", "tbf", "rate", rate,
                                "burst", "256kb", "latency", "200ms"], check=True, capture_output=True, timeout=30)
            for i in range(size):
                cmd = ["ip", "netns", "exec", namespaces[i + 1], sys.executable, __file__, "--worker", "--rank", str(i),
                       "--size", str(size), "--host", f"{subnet}.{i + 1}", "--work", work, "--values", str(values),
                       "--compression", compression, "--transport", transport, "--parts", parts]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=open(Path(work) / f"log-{i}", "w"), stderr=subprocess.STDOUT))
                if i == 0:
                    while not (Path(work) / "root.maddrs").exists():
                        if procs[0].poll() is not None:
                            raise RuntimeError((Path(work) / "log-0").read_text()[-2000:])
                        time.sleep(0.2)
            deadline = time.monotonic() + 300
            while not all((Path(work) / f"ready-{i}").exists() for i in range(size)):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("a peer did not start: " + (Path(work) / "log-0").read_text()[-1500:])
                time.sleep(0.2)
            (Path(work) / "go").write_text("1")
            for p in procs:
                p.wait(timeout=1200)
            results = [json.loads((Path(work) / f"result-{i}.json").read_text()) for i in range(size)]
            if os.environ.get("CFP2P_KEEP_LOGS") and not all(r["clean"] for r in results):
                for i in range(size):
                    Path(os.environ["CFP2P_KEEP_LOGS"], f"log-{size}-{rate}-{compression}-{i}.txt").write_text((Path(work) / f"log-{i}").read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for ns in namespaces:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    per_value = {"none": 4, "float16": 2, "8bit": 1}[compression]
    bound = 2 * (size - 1) / size * values * per_value * 8 / _rate_bits(rate)
    took = max(r["allreduce"] for r in results)
    return {"peers": size, "rate": rate, "compression": compression, "transport": transport, "parts": parts,
            "lanes": sum(r.get("lanes", 0) for r in results) / max(1, size * (size - 1)), "values": values, "allreduce_s": took,
            "bound_s": bound, "share_of_bound": bound / took, "clean": all(r["clean"] for r in results),
            "errors": [r["error"] for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rates", nargs="+", default=["100mbit", "20mbit"])
    ap.add_argument("--compression", nargs="+", default=["none", "float16"])
    ap.add_argument("--values", type=float, default=22.7e6)
    ap.add_argument("--transports", nargs="+", choices=("lane", "p2pd"), default=["lane", "p2pd"],
                    help="lane: parts over the direct encrypted lane (cfp2p join's default); p2pd: over hivemind's streams")
    ap.add_argument("--parts", choices=("auto", "usual", "wide"), default="auto",
                    help="auto: what a group picks (one all-reduce has no rate yet: 512 KiB); usual or wide: 512 KiB or 2 MiB parts")
    ap.add_argument("--out", default=None)
    ap.add_argument("--transport", default="lane", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--host", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.values = int(args.values)
        args.compression = args.compression[0]
        worker(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/slow_links.py needs root (network namespaces and tc)")
    rows = []
    print(f"{'peers':>5} {'rate':>8} {'wire':>8} {'transport':>9} {'parts':>6} {'lanes':>6} {'all-reduce s':>13} {'bound s':>8} "
          f"{'of bound':>9}", flush=True)
    for rate in args.rates:
        for compression in args.compression:
            for size in args.peers:
                for transport in args.transports:
                    row = run(size, rate, compression, int(args.values), transport, args.parts)
                    rows.append(row)
                    note = "" if row["clean"] else f"  (unclean: {row['errors']})"
                    print(f"{size:>5} {rate:>8} {compression:>8} {transport:>9} {args.parts:>6} {row['lanes']:>6.0%} {row['allreduce_s']:>13.1f} "
                          f"{row['bound_s']:>8.1f} {100 * row['share_of_bound']:>8.0f}%{note}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
