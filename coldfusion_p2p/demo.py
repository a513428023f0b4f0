"""``cfp2p demo``: a whole swarm on this machine, offline, on real data and the real encoder.

A bootstrap peer and three contributors, each a separate ``cfp2p`` process with its own bundled
dataset (see ``demo_data/ATTRIBUTION.md``), run ColD Fusion rounds over real hivemind peers on
localhost; a live table shows their progress and a summary shows what happened.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coldfusion_p2p.procs import Children, cli_command, wait_for_address

DEMO_DATA = Path(__file__).with_name("demo_data")
DEMO_PEERS = (("ada", "sms_spam"), ("ben", "rotten_tomatoes"), ("cy", "trec6"))
DEMO_MIN_GROUP = 2


def demo_manifest(model: str, examples_per_round: int) -> str:
    return f"""# written by cfp2p demo
[swarm]
name = "demo"
[model]
source = "{model}"
[tokenizer]
max_length = 64
[training]
lr = 1e-4
batch_size = 16
examples_per_round = {examples_per_round}
[fusion]
outer_lr = 1.0
weighting = "uniform"
[round]
min_group_size = {DEMO_MIN_GROUP}
round_window = 120.0
matchmaking_time = 3.0
verify_timeout = 20.0
"""


@dataclass
class PeerView:
    name: str
    dataset: str
    events_path: Path
    phase: str = "starting"
    version: int | None = None
    step: str = ""
    loss: float | None = None
    accuracy: list[float] = field(default_factory=list)
    committed: list[dict] = field(default_factory=list)
    trained: list[dict] = field(default_factory=list)
    done: dict | None = None
    hash: str | None = None  # of the newest base it holds (committed or synced to)
    _offset: int = 0

    def refresh(self) -> None:
        if not self.events_path.is_file():
            return
        with open(self.events_path) as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "phase":
                self.phase, self.version = ev["state"], ev.get("version", self.version)
            elif kind == "train_step":
                self.step, self.loss = f"{ev['step']}/{ev['total']}", ev["loss"]
            elif kind == "trained":
                self.trained.append(ev)
                if ev.get("eval_accuracy") is not None:
                    self.accuracy.append(ev["eval_accuracy"])
            elif kind == "committed":
                self.committed.append(ev)
                self.version, self.hash = ev["version"], ev.get("hash")
            elif kind == "synced":
                self.version, self.hash = ev.get("version", self.version), ev.get("hash")
            elif kind == "waiting":
                self.phase = "waiting"
            elif kind == "done":
                self.done, self.phase, self.hash = ev, "done", ev.get("hash", self.hash)


def stranded(peers: list[tuple[int | None, str | None]], min_group_size: int) -> list[int]:
    """Which running peers can never finish their rounds: (exit code or None while running, hash of the
    newest base it holds) per peer. A peer that lost a round (its delta came after the swarm had moved
    on) needs one round more than the others; once they have finished and left, fewer than
    ``min_group_size`` are left to run it. Such a peer is stranded once it holds the base every
    finished peer ended on (it has synced: stopping it loses nothing)."""
    running = [i for i, (code, _) in enumerate(peers) if code is None]
    finals = {held for code, held in peers if code == 0}
    if not running or len(running) >= min_group_size or len(finals) != 1 or None in finals:
        return []
    return [i for i in running if peers[i][1] in finals]


def _live_table(peers: list[PeerView], started: float) -> Table:
    table = Table(title=f"cfp2p demo: local swarm, {time.monotonic() - started:.0f}s", expand=False)
    for col in ("peer", "private data", "phase", "base", "step", "loss", "held-out acc."):
        table.add_column(col)
    for p in peers:
        table.add_row(
            p.name, p.dataset, p.phase, f"v{p.version}" if p.version is not None else "-", p.step or "-",
            f"{p.loss:.3f}" if p.loss is not None else "-", " → ".join(f"{a:.2f}" for a in p.accuracy) or "-",
        )
    return table


def run_demo(workdir: Path | None, rounds: int, model: str, examples_per_round: int, console: Console, timeout: float = 900) -> bool:
    """Run the demo swarm to the end; True when every peer committed every round and all agree."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="cfp2p-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "swarm.toml"
    config.write_text(demo_manifest(model, examples_per_round))
    console.print(f"[bold]cfp2p demo[/bold]: bootstrap + {len(DEMO_PEERS)} contributors on localhost, model {model}, {rounds} round(s); files in {work}")
    started = time.monotonic()
    with Children() as children:
        maddrs_file = work / "bootstrap.maddrs"
        maddrs_file.unlink(missing_ok=True)
        boot = children.start(
            cli_command("bootstrap", "--config", str(config), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                        "--identity", str(work / "bootstrap.key"), "--maddrs-file", str(maddrs_file),
                        "--store", str(work / "bootstrap")),
            work / "bootstrap.log",
        )
        initial_peer = wait_for_address(maddrs_file, boot, work / "bootstrap.log", timeout=180)
        console.print(f"bootstrap peer is up: [cyan]{initial_peer}[/cyan]")
        peers, procs = [], []
        for name, dataset in DEMO_PEERS:
            store = work / f"peer-{name}"
            store.mkdir(exist_ok=True)
            events = store / "events.jsonl"
            events.unlink(missing_ok=True)
            peers.append(PeerView(name, dataset, events))
            procs.append(children.start(
                cli_command("join", "--initial-peers", initial_peer, "--data", str(DEMO_DATA / f"{dataset}.jsonl"),
                            "--rounds", str(rounds), "--store", str(store), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                            "--threads", "1", "--events", str(events), "--name", name),
                store / "join.log",
            ))
        deadline, stopped = time.monotonic() + timeout, set()
        with Live(_live_table(peers, started), console=console, refresh_per_second=2, transient=False) as live:
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                for view in peers:
                    view.refresh()
                live.update(_live_table(peers, started))
                for i in set(stranded([(p.poll(), v.hash) for p, v in zip(procs, peers)], DEMO_MIN_GROUP)) - stopped:
                    stopped.add(i)
                    procs[i].send_signal(signal.SIGTERM)  # it shuts its own helpers down; its store keeps everything
                time.sleep(0.5)
            for view in peers:
                view.refresh()
            live.update(_live_table(peers, started))
        timed_out = any(p.poll() is None for p in procs)
    codes = [p.returncode for p in procs]
    ok = _summary(console, peers, codes, work, rounds, time.monotonic() - started, timed_out, stopped)
    if ok:
        _before_after(console, work / f"peer-{DEMO_PEERS[0][0]}", work)
    return ok


def _before_after(console: Console, store_dir: Path, work: Path) -> None:
    """Linear probe of every version on the three datasets' held-out splits; a table and a PNG."""
    from coldfusion_p2p.data import load_private_data
    from coldfusion_p2p.evaluate import EvalSettings, evaluate
    from coldfusion_p2p.plots import plot_lines
    from coldfusion_p2p.store import VersionStore

    console.print("\nlinear probe of each version (frozen body, logistic regression on held-out splits)...")
    store = VersionStore(store_dir)
    bases = {f"v{info.version}": store.load(info.version)[0] for info in store.list()}
    datasets = [load_private_data(DEMO_DATA / f"{d}.jsonl") for _, d in DEMO_PEERS]
    rows = evaluate(store.model_dir, bases, datasets, EvalSettings(max_length=64), probe=True, finetune=False)
    first, last = next(iter(bases)), list(bases)[-1]
    acc = {(r["dataset"], r["base"]): r["probe"] for r in rows}
    table = Table(title=f"before and after ({first} -> {last}), linear probe")
    for col in ("dataset", first, last, "change"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for data in datasets:
        a, b = acc[(data.name, first)], acc[(data.name, last)]
        table.add_row(data.name, f"{a:.3f}", f"{b:.3f}", f"{100 * (b - a):+.1f} pt")
    mean = {v: sum(acc[(d.name, v)] for d in datasets) / len(datasets) for v in (first, last)}
    table.add_row("mean", f"{mean[first]:.3f}", f"{mean[last]:.3f}", f"{100 * (mean[last] - mean[first]):+.1f} pt")
    console.print(table)
    versions = [int(v[1:]) for v in bases]
    series = {d.name: [acc[(d.name, v)] for v in bases] for d in datasets}
    png = plot_lines(work / "accuracy.png", versions, series, "linear-probe accuracy per base version (cfp2p demo)", "base version", "held-out accuracy")
    (work / "accuracy.json").write_text(json.dumps(rows, indent=1))
    console.print(f"plot: {png}")


def _summary(console: Console, peers: list[PeerView], codes: list[int], work: Path, rounds: int, seconds: float, timed_out: bool,
             stopped: set[int] = frozenset()) -> bool:
    breakdown = Table(title="where the time went, per round (seconds, mean over peers)",
                      caption="peers: the group's size; train: the local finetune; wait: for the group's members to be ready; "
                              "match: matchmaking; reduce: the all-reduce")
    for col in ("version", "peers", "train", "wait", "match", "reduce", "verify", "store", "hash"):  # fits 80 columns
        breakdown.add_column(col)
    hashes_by_version: dict[int, set[str]] = {}
    for p in peers:
        for c in p.committed:
            hashes_by_version.setdefault(c["version"], set()).add(c["hash"])
    for version in sorted(hashes_by_version):
        stats = [c["stats"] for p in peers for c in p.committed if c["version"] == version]
        trains = [t["seconds"] for p in peers for t in p.trained if t.get("version") == version - 1]

        def mean(xs):
            return f"{sum(xs) / len(xs):.1f}" if xs else "-"

        hashes = hashes_by_version[version]
        breakdown.add_row(
            f"v{version}", str(max(s["group_size"] for s in stats)), mean(trains),
            mean([s["gather_s"] for s in stats]), mean([s["matchmaking_s"] for s in stats]), mean([s["allreduce_s"] for s in stats]),
            mean([s["verify_s"] for s in stats]), mean([s.get("store_s", 0) for s in stats]),
            next(iter(hashes))[:8] if len(hashes) == 1 else f"[red]{len(hashes)} differ[/red]",
        )
    accuracy = Table(title="each contributor's held-out accuracy after its local finetune, by base it started from")
    accuracy.add_column("peer")
    accuracy.add_column("private data")
    for v in range(rounds):
        accuracy.add_column(f"from v{v}")
    for p in peers:
        accuracy.add_row(p.name, p.dataset, *[f"{a:.3f}" for a in p.accuracy[:rounds]])
    console.print()
    console.print(breakdown)
    console.print(accuracy)
    finals = {p.done["hash"] for p in peers if p.done} | {peers[i].hash for i in stopped}
    for i in sorted(stopped):
        p = peers[i]
        console.print(f"{p.name} lost a round (its delta came after the swarm had moved on), so it had {len(p.committed)} of {rounds} "
                      f"round(s) when the others left; it holds the same v{p.version} and was stopped")
    ok = (not timed_out and all(c == 0 or i in stopped for i, c in enumerate(codes))
          and all(len(p.committed) == rounds or i in stopped for i, p in enumerate(peers))
          and len(finals) == 1 and None not in finals and all(len(h) == 1 for h in hashes_by_version.values()))
    if ok:
        console.print(f"[bold green]done[/bold green] in {seconds:.0f}s: all {len(peers)} peers hold v{rounds} with one hash {next(iter(finals))[:16]}; "
                      f"stores and logs in {work}")
    else:
        console.print(f"[bold red]the demo did not complete[/bold red] (exit codes {codes}{', timed out' if timed_out else ''}); logs in {work}")
    return ok
