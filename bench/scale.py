"""A whole round with 2, 4, 8 and 16 local peers: round time, and each peer's load on the DHT.

For each swarm size P it starts a bootstrap peer and P `cfp2p join` processes on localhost (the
built-in tiny model by default, so that training is short and the protocol's costs show), with
``min_group_size = 2``: when every peer is ready, each leader takes all P (the round's target size),
and a swarm that splits into several groups settles on one base by the fork rule (counted as forks).
Then it reads every peer's committed rounds (the ``stats`` of its ``committed`` events) and prints,
per P, medians over the peers and over the rounds after the first (the first also holds start-up):

- round: wall time from the start of local training to the commit, and the part spent training;
- fusion: gather (waiting for the ready set), matchmaking, all-reduce, verify, store;
- DHT requests one peer's node sent and served per round (a lookup is several requests: it asks the
  closest nodes it knows, then theirs), and the record reads and writes behind them.

All peers share this machine's cores, so round times grow with P partly because P peers train on
two cores at once: compare the fusion columns, and the requests, across P.

    python bench/scale.py --peers 2 4 8 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coldfusion_p2p import model as M  # noqa: E402
from coldfusion_p2p.bootstrap.lab import manifest_toml  # noqa: E402
from coldfusion_p2p.config import SwarmManifest  # noqa: E402
from coldfusion_p2p.demo import DEMO_DATA  # noqa: E402
from coldfusion_p2p.errors import WorkError  # noqa: E402
from coldfusion_p2p.procs import Children, cli_command, wait_for_address  # noqa: E402

PHASES = ("gather_s", "matchmaking_s", "allreduce_s", "verify_s", "store_s")
DATASETS = ("sms_spam", "rotten_tomatoes", "trec6")


def run_swarm(work: Path, peers: int, rounds: int, source: str, examples: int, matchmaking: float, timeout: float,
              min_group: int) -> dict:
    """One swarm of ``peers`` contributors for ``rounds`` rounds; their committed rounds, by peer."""
    work.mkdir(parents=True, exist_ok=True)
    min_group_size = min(min_group, peers) if min_group else peers
    config = work / "swarm.toml"
    config.write_text(manifest_toml(SwarmManifest.from_dict({
        "swarm": {"name": f"scale-{peers}"}, "model": {"source": source}, "tokenizer": {"max_length": 32},
        "training": {"lr": 1e-3, "batch_size": 16, "examples_per_round": examples},
        "round": {"min_group_size": min_group_size, "round_window": 120.0, "matchmaking_time": matchmaking, "verify_timeout": 30.0,
                  "chunk_timeout": 10.0, "allreduce_timeout": 120.0},
    }, where="the bench's manifest")))
    maddrs = work / "bootstrap.maddrs"
    with Children() as children:
        boot = children.start(cli_command("bootstrap", "--config", str(config), "--identity", str(work / "boot.key"),
                                          "--store", str(work / "boot"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                          "--maddrs-file", str(maddrs)), work / "bootstrap.log")
        try:
            initial = wait_for_address(maddrs, boot, work / "bootstrap.log", timeout=120)
        except WorkError as e:
            raise SystemExit(f"{e}: see {work / 'bootstrap.log'}") from None
        procs = {}
        for i in range(peers):
            name = f"peer-{i:02d}"
            store = work / name
            store.mkdir(exist_ok=True)
            procs[name] = children.start(cli_command(
                "join", "--initial-peers", initial, "--data", str(DEMO_DATA / f"{DATASETS[i % len(DATASETS)]}.jsonl"),
                "--rounds", str(rounds), "--store", str(store), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                "--events", str(store / "events.jsonl"), "--name", name), work / f"{name}.log")
        deadline, alone_since = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(1)
            running = sum(p.poll() is None for p in procs.values())
            if running < min_group_size:  # the others are done: a peer a fork left behind has nobody to fuse with
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > 30:
                    break
        codes = {n: p.poll() for n, p in procs.items()}
    failed = {n: ("stopped: nobody left to fuse with" if c is None else c) for n, c in codes.items() if c != 0}
    rows = {}
    for name in procs:
        trained, committed = {}, {}
        path = work / name / "events.jsonl"
        for line in (path.read_text().splitlines() if path.is_file() else []):
            e = json.loads(line)
            if e.get("event") == "trained":
                trained[e["version"] + 1] = e["seconds"]
            elif e.get("event") == "committed":
                committed[e["version"]] = {**e["stats"], "hash": e["hash"], "train_s": trained.get(e["version"])}
        rows[name] = committed
    return {"failed": failed, "rounds": rows}


def summarise(peers: int, result: dict) -> dict:
    rows = [r for committed in result["rounds"].values() for v, r in committed.items() if v > 1] or \
           [r for committed in result["rounds"].values() for r in committed.values()]
    hashes = {}
    for committed in result["rounds"].values():
        for v, r in committed.items():
            hashes.setdefault(v, set()).add(r["hash"])

    def med(values):
        values = [x for x in values if x is not None]
        return round(statistics.median(values), 3) if values else None

    dht = [r["dht"] for r in rows if isinstance(r.get("dht"), dict)]
    return {
        "peers": peers, "failed": result["failed"], "rounds_seen": len(rows),
        # several groups may commit different bases of one version: the fork rule then settles on one
        "forks": sum(len(h) - 1 for h in hashes.values()), "versions": sorted(hashes),
        "group_size": med(r.get("group_size") for r in rows),
        "round_s": med(r.get("round_s") for r in rows), "train_s": med(r.get("train_s") for r in rows),
        **{k: med(r.get(k) for r in rows) for k in PHASES},
        **{f"dht_{k}": med(d.get(k) for d in dht) for k in ("sent", "served", "reads", "writes")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=M.BUILTIN_TINY, help="a model folder (default: the built-in tiny model)")
    ap.add_argument("--examples-per-round", type=int, default=32)
    ap.add_argument("--matchmaking-time", type=float, default=3.0, help="the demo's setting")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one swarm may take")
    ap.add_argument("--min-group-size", type=int, default=2,
                    help="the swarm's min_group_size (0: all P peers, which hivemind's matchmaking cannot form at 16 here)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still ends its peers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cfp2p-scale-"))
    source = str(M.resolve_model_source(args.model, cache_dir=work / "models"))
    out = []
    for peers in args.peers:
        t0 = time.monotonic()
        s = summarise(peers, run_swarm(work / f"p{peers}", peers, args.rounds, source, args.examples_per_round,
                                       args.matchmaking_time, args.timeout, args.min_group_size))
        s["wall_s"] = round(time.monotonic() - t0, 1)
        out.append(s)
        print(json.dumps(s), flush=True)
    print(f"\nswarms in {work}; medians over peers and rounds after the first\n")
    print(f"{'P':>3} {'round s':>8} {'train s':>8} {'gather':>7} {'match':>6} {'allred':>7} {'verify':>7} {'store':>6} "
          f"{'group':>6} {'DHT sent':>9} {'served':>7} {'reads':>6} {'writes':>7}  histories")
    for s in out:
        def f(k, w=7, d=1):
            return f"{s[k]:>{w}.{d}f}" if s[k] is not None else f"{'-':>{w}}"
        print(f"{s['peers']:>3} {f('round_s', 8)} {f('train_s', 8)} {f('gather_s')} {f('matchmaking_s', 6)} {f('allreduce_s')} "
              f"{f('verify_s')} {f('store_s', 6)} {f('group_size', 6, 0)} {f('dht_sent', 9, 0)} {f('dht_served', 7, 0)} "
              f"{f('dht_reads', 6, 0)} {f('dht_writes', 7, 0)}  "
              + f"{s['forks']} fork(s) settled, up to v{max(s['versions'], default=0)}" + (f", failed: {s['failed']}" if s["failed"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
