"""What a peer costs in the demo's setting: memory of each `cfp2p join` with its p2pd and helper
processes, and the share of a round's wall time spent outside local training.

It runs the demo's swarm (bootstrap peer and three contributors on localhost, MiniLM-L6 by default)
and samples, every half second, the proportional set size (PSS: shared pages split between the
processes that share them) of every process in each contributor's session: its main process, the
DHT and averager processes it forks, and their p2pd daemons. Then it reads each contributor's round
records: round wall time, training (and its held-out check), gather, matchmaking, all-reduce, verify
and store.

    python bench/peer_costs.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from coldfusion_p2p.demo import run_demo  # noqa: E402


def _sessions(work: Path) -> dict[str, int]:
    """Session id of each contributor of the swarm in ``work``: its `cfp2p join` process leads one."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if "join" in args and "--store" in args:
            store = args[args.index("--store") + 1]
            if store.startswith(str(work)):
                found[Path(store).name] = int(pid)
    return found


def _pss_by_session() -> dict[int, int]:
    """Sum of PSS (bytes) per session id, over every process this user can read."""
    out: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            sid = int(stat.rsplit(")", 1)[1].split()[3])
            pss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if line.startswith("Pss:"))
        except (OSError, ValueError, StopIteration, IndexError):
            continue
        out[sid] = out.get(sid, 0) + pss * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--examples-per-round", type=int, default=384)
    ap.add_argument("--workdir", default=None, help="keep the swarm's stores here (default: a temporary folder, removed after)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cfp2p-costs-"))
    peak: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            sessions = _sessions(work)
            pss = _pss_by_session()
            for name, sid in sessions.items():
                peak[name] = max(peak.get(name, 0), pss.get(sid, 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ok = run_demo(work, args.rounds, args.model, args.examples_per_round, Console(file=open(os.devnull, "w")))
    finally:
        done.set()
        sampler.join()
    print(f"swarm in {work if args.workdir else 'a temporary folder'}: {'ok' if ok else 'FAILED'}")
    for name, bytes_ in sorted(peak.items()):
        print(f"{name}: peak memory (PSS of the join process, its helpers and p2pd) {bytes_ / 2**30:.2f} GiB")
    rows = []
    for store in sorted(work.glob("peer-*")):
        trained = {}
        for line in (store / "events.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "trained":
                trained[e["version"] + 1] = e["seconds"]
            elif e["event"] == "committed":
                s = e["stats"]
                rows.append({"peer": store.name, "version": e["version"], "round_s": s["round_s"], "train_s": trained.get(e["version"]),
                             **{k: s.get(k) for k in ("gather_s", "matchmaking_s", "allreduce_s", "verify_s", "verdicts_s", "store_s", "part_kib")}})
    for r in rows:
        outside = 1 - r["train_s"] / r["round_s"]
        print(f"{r['peer']} v{r['version']}: round {r['round_s']:.1f} s, training {r['train_s']:.1f} s, outside training {100 * outside:.1f}% "
              f"(gather {r['gather_s']:.1f}, matchmaking {r['matchmaking_s']:.1f}, all-reduce {r['allreduce_s']:.1f} in {r['part_kib'] or 512} KiB parts, "
              f"verify {r['verify_s']:.1f} (waiting for verdicts {r['verdicts_s'] or 0:.1f}), store {r['store_s'] or 0:.1f})")
    if not args.workdir:  # three peers' stores: about 1.2 GB a run
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
