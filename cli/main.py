"""``cfp2p``: the command line. Thin: parse, call the library, render with Rich."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coldfusion_p2p.errors import UserError, WorkError  # noqa: E402

app = typer.Typer(
    name="cfp2p",
    help="ColD Fusion, peer to peer: improve a shared pretrained model together without sharing data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, highlight=False)


def _log_to_stderr(prefix: str = ""):
    def log(message: str) -> None:
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {prefix}{message}", markup=True, highlight=False, soft_wrap=True) if err.is_terminal else print(
            f"{time.strftime('%H:%M:%S')} {prefix}{message}", file=sys.stderr, flush=True
        )

    return log


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(e: Exception) -> None:
    message = str(e).replace("\n", " ")
    err.print(f"[bold red]error:[/bold red] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(e, "exit_code", 1))


@app.command()
def bootstrap(
    config: Path = typer.Option(..., "--config", help="swarm manifest (TOML); see bootstrap/swarm.toml"),
    host_maddrs: List[str] = typer.Option(["/ip4/0.0.0.0/tcp/31337"], "--host-maddrs", help="where to listen (repeatable)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="private key file: the same peer id after a restart (created if missing)"),
    maddrs_file: Optional[Path] = typer.Option(None, "--maddrs-file", help="write the --initial-peers value here once listening"),
    store: Path = typer.Option(Path("cfp2p-bootstrap"), "--store", help="where v0 and the model files are kept for download"),
    announce_maddrs: Optional[List[str]] = typer.Option(None, "--announce-maddrs", help="public addresses to announce (behind NAT)"),
):
    """Start the long-lived bootstrap peer of a swarm and publish its manifest.

    Example: cfp2p bootstrap --config swarm.toml --host-maddrs /ip4/0.0.0.0/tcp/31337 --identity lab.key
    """
    from bootstrap.peer import run_bootstrap

    _quiet_libraries()
    try:
        run_bootstrap(str(config), host_maddrs, str(identity) if identity else None, str(maddrs_file) if maddrs_file else None,
                      str(store), announce_maddrs, log=_log_to_stderr())
    except (UserError, WorkError) as e:
        _fail(e)


@app.command()
def join(
    initial_peers: List[str] = typer.Option(..., "--initial-peers", help="multiaddress of a swarm peer (repeatable)"),
    data: Path = typer.Option(..., "--data", help="private labelled data: csv, tsv, json, jsonl, parquet (.gz ok) or a saved dataset folder"),
    text_column: str = typer.Option("text", "--text-column"),
    label_column: str = typer.Option("label", "--label-column"),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="rounds to contribute (default: until Ctrl+C)"),
    store: Path = typer.Option(Path("cfp2p-store"), "--store", help="where base versions and this peer's head are kept"),
    swarm: Optional[str] = typer.Option(None, "--swarm", help="swarm name, when the DHT hosts several"),
    model: Optional[str] = typer.Option(None, "--model", help="local model folder or built-in name (default: the swarm's; downloaded from peers if missing)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    weight: Optional[str] = typer.Option(None, "--weight", help="uniform (the paper's) or examples; default: the swarm's"),
    host_maddrs: List[str] = typer.Option(["/ip4/0.0.0.0/tcp/0"], "--host-maddrs", help="where to listen (repeatable)"),
    announce_maddrs: Optional[List[str]] = typer.Option(None, "--announce-maddrs"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for training"),
    max_wait: Optional[float] = typer.Option(None, "--max-wait", help="give up after waiting this many seconds for peers"),
    events: Optional[Path] = typer.Option(None, "--events", help="append JSON progress events to this file"),
    keep_finetuned: bool = typer.Option(False, "--keep-finetuned", help="also store each round's finetuned body"),
    name: Optional[str] = typer.Option(None, "--name", help="display name in logs"),
):
    """Join a swarm as a contributor: finetune on private data, fuse with peers, repeat.

    Example: cfp2p join --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm... --data mine.csv --rounds 5
    """
    from coldfusion_p2p.contributor import Contributor, JoinOptions

    _quiet_libraries()
    opts = JoinOptions(
        initial_peers=initial_peers, data=str(data), store=str(store), text_column=text_column, label_column=label_column,
        rounds=rounds, swarm=swarm, model=model, device=device, weighting=weight, host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs, threads=threads, keep_finetuned=keep_finetuned,
        events=str(events) if events else None, max_wait=max_wait,
    )
    try:
        Contributor(opts, log=_log_to_stderr(f"[{name}] " if name else "")).run()
    except (UserError, WorkError) as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: every finished version is in the store")
        raise typer.Exit(130) from None


@app.command()
def versions(
    store: Path = typer.Option(Path("cfp2p-store"), "--store"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
    verify: bool = typer.Option(False, "--verify", help="also re-hash every body"),
):
    """List the base versions in a store."""
    from coldfusion_p2p.store import VersionStore

    if not store.is_dir():
        _fail(UserError(f"no store at {store}"))
    vs = VersionStore(store)
    rows = []
    for info in vs.list():
        row = {"version": info.version, "hash": info.hash, "parent": info.parent, "contributors": info.contributors,
               "created": info.created, "round_stats": info.round_stats}
        if verify:
            try:
                vs.load(info.version)
                row["valid"] = True
            except UserError:
                row["valid"] = False
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"base versions in {store}")
    for col in ("version", "hash", "parent", "contributors", "created") + (("valid",) if verify else ()):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"v{r['version']}", r["hash"][:16], (r["parent"] or "-")[:12], str(len(r["contributors"])) if r["contributors"] else "-",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])), *((("yes" if r["valid"] else "[red]NO[/red]"),) if verify else ()),
        )
    out.print(table)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="keep the demo's stores and logs here (default: a temporary folder)"),
    rounds: int = typer.Option(2, "--rounds", min=1),
    model: str = typer.Option("all-MiniLM-L6-v2", "--model", help="v0 for the demo: all-MiniLM-L6-v2 (real) or tiny-bert (fast)"),
    examples_per_round: int = typer.Option(384, "--examples-per-round", min=16),
):
    """Run a whole local swarm offline: a bootstrap peer and three contributors on bundled real data."""
    from coldfusion_p2p.demo import run_demo

    signal.signal(signal.SIGTERM, _interrupt)  # so that the demo's peers are stopped on SIGTERM too
    try:
        ok = run_demo(workdir=workdir, rounds=rounds, model=model, examples_per_round=examples_per_round, console=out)
    except (UserError, WorkError) as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: every process of the demo was stopped")
        raise typer.Exit(130) from None
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
