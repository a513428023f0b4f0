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
from rich.markup import escape
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
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(prefix + message)}", markup=True, highlight=False, soft_wrap=True) if err.is_terminal else print(
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


bootstrap_app = typer.Typer(invoke_without_command=True, add_completion=False)
app.add_typer(bootstrap_app, name="bootstrap")


@bootstrap_app.callback()
def bootstrap(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="swarm manifest (TOML) of an open swarm; see bootstrap/swarm.toml"),
    lab: Optional[Path] = typer.Option(None, "--lab", help="a lab folder from `cfp2p bootstrap init` (key, settings, members, store)"),
    host_maddrs: List[str] = typer.Option(["/ip4/0.0.0.0/tcp/31337"], "--host-maddrs", help="where to listen (repeatable)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="private key file: the same peer id after a restart (created if missing)"),
    maddrs_file: Optional[Path] = typer.Option(None, "--maddrs-file", help="write the --initial-peers value here once listening"),
    store: Path = typer.Option(Path("cfp2p-bootstrap"), "--store", help="where v0 and the model files are kept for download"),
    announce_maddrs: Optional[List[str]] = typer.Option(None, "--announce-maddrs", help="public addresses to announce (behind NAT)"),
    initial_peers: Optional[List[str]] = typer.Option(None, "--initial-peers", help="join this swarm as a second meeting point (repeatable)"),
    authority: Optional[str] = typer.Option(None, "--authority", help="with --initial-peers: the peer id that signs the manifest (default: the first initial peer's)"),
    token: Optional[Path] = typer.Option(None, "--token", help="with --initial-peers, in a private swarm: this key's membership token"),
):
    """Start the long-lived bootstrap peer of a swarm and publish its signed manifest; add a second meeting
    point to a running swarm (--initial-peers); or manage a private swarm's members (init, admit, revoke, members).

    Example: cfp2p bootstrap --config swarm.toml --identity lab.key   (an open swarm)

    Example: cfp2p bootstrap --lab lab/   (a private swarm, after `cfp2p bootstrap init`)

    Example: cfp2p bootstrap --initial-peers /ip4/…/p2p/Qm… --identity mirror.key   (a second meeting point: it
    serves the model files and bases and re-publishes the manifest, and never averages)
    """
    if ctx.invoked_subcommand is not None:
        return
    from coldfusion_p2p.bootstrap.peer import run_bootstrap

    if initial_peers:
        if config is not None or lab is not None:
            _fail(UserError("a second meeting point takes its settings from the swarm: give --initial-peers without --config or --lab"))
        _quiet_libraries()
        _serve_meeting_point(initial_peers, authority, host_maddrs, identity, token, maddrs_file, store, announce_maddrs)
        return
    if (config is None) == (lab is None):
        _fail(UserError("give --config swarm.toml (an open swarm) or --lab DIR (from `cfp2p bootstrap init`), not both"))
    _quiet_libraries()
    try:
        run_bootstrap(str(config) if config else None, host_maddrs, str(identity) if identity else None,
                      str(maddrs_file) if maddrs_file else None, str(store), announce_maddrs, log=_log_to_stderr(),
                      lab=str(lab) if lab else None)
    except (UserError, WorkError) as e:
        _fail(e)


def _serve_meeting_point(initial_peers, authority, host_maddrs, identity, token, maddrs_file, store, announce_maddrs) -> None:
    from coldfusion_p2p.bootstrap.peer import _write_atomically
    from coldfusion_p2p.contributor import Contributor, JoinOptions

    log = _log_to_stderr("[meeting point] ")
    opts = JoinOptions(initial_peers=list(initial_peers), data="", store=str(store), host_maddrs=list(host_maddrs),
                       announce_maddrs=announce_maddrs, authority=authority, identity=str(identity) if identity else None,
                       token=str(token) if token else None, name="meeting point")

    def ready(maddrs: list[str]) -> None:
        if maddrs_file:
            _write_atomically(Path(maddrs_file), " ".join(maddrs) + "\n")
        first = [p for p in initial_peers if "/p2p/" in p][:1]
        mine = [m for m in maddrs if "/ip4/127." not in m and "/ip6/::1/" not in m][:1] or maddrs[:1]
        log("hand this to contributors:  " + " ".join(f"--initial-peers {a}" for a in first + mine)
            + (f" --authority {authority}" if authority else ""))

    try:
        Contributor(opts, log=log).serve(ready=ready)
    except (UserError, WorkError) as e:
        _fail(e)
    except KeyboardInterrupt:
        pass
    log("meeting point stopped; the model files and bases stay in " + str(store))


@bootstrap_app.command("init")
def bootstrap_init(
    config: Path = typer.Option(..., "--config", help="the swarm's settings (TOML); see bootstrap/swarm.toml"),
    out: Path = typer.Option(..., "--out", help="the lab folder to create (its key must stay secret)"),
    admission: str = typer.Option("members", "--admission", help="members (tokens from `admit`), enroll (any key, rate-limited) or open"),
):
    """Create a private swarm's authority: key pair, settings, members and revocation files (all 0600).

    Example: cfp2p bootstrap init --config swarm.toml --out lab/
    """
    from coldfusion_p2p.bootstrap import lab as L
    from coldfusion_p2p.certs import peer_id_of_public_key

    try:
        folder, manifest = L.init_lab(str(config), str(out), admission)
        peer = peer_id_of_public_key(L.authority(str(folder)).public_key.encode())
    except (UserError, WorkError) as e:
        _fail(e)
    print(f"created swarm {manifest.name!r} (admission {admission}) in {folder}; its authority is {peer}")
    print(f"keep {folder / L.KEY_FILE} secret and backed up: whoever holds it controls the swarm")
    print(f"next: cfp2p bootstrap --lab {folder} --host-maddrs /ip4/0.0.0.0/tcp/31337")
    if admission == "members":
        print(f"      cfp2p bootstrap admit --lab {folder} 'ssh-rsa …' --name alice --expires 30d")


@bootstrap_app.command("admit")
def bootstrap_admit(
    public_key: str = typer.Argument(..., help="the member's public key: the `ssh-rsa …` line `cfp2p id` printed, or a file holding it"),
    name: str = typer.Option(..., "--name", help="the member's name (letters, digits, . _ @ -)"),
    expires: str = typer.Option("30d", "--expires", help="how long the token is valid: e.g. 30d, 12h, 2w"),
    lab: Path = typer.Option(Path("."), "--lab", help="the lab folder (from `cfp2p bootstrap init`)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write the token (default: NAME.token)"),
):
    """Issue a membership token for a member's key; send the file to the member.

    Example: cfp2p bootstrap admit --lab lab/ 'ssh-rsa AAAA…' --name alice --expires 30d
    """
    from coldfusion_p2p.bootstrap import lab as L
    from coldfusion_p2p.membership import parse_duration

    try:
        try:
            lifetime = parse_duration(expires)
        except ValueError as e:
            raise UserError(str(e)) from None
        token, dest = L.admit(str(lab), public_key, name, lifetime, str(out) if out else None)
    except (UserError, WorkError) as e:
        _fail(e)
    print(f"admitted {name} ({token['member']}) until {L.expiry_text(token['expires'])}: token written to {dest}")
    print(f"the member joins with: cfp2p join --identity THEIR.key --token {dest.name} --initial-peers … --data …")


@bootstrap_app.command("revoke")
def bootstrap_revoke(
    member: str = typer.Argument(..., help="a member's name (as admitted) or peer id"),
    lab: Path = typer.Option(Path("."), "--lab", help="the lab folder (from `cfp2p bootstrap init`)"),
):
    """Revoke a member: the running bootstrap peer signs a manifest with a new serial that every peer honours.

    Example: cfp2p bootstrap revoke --lab lab/ alice
    """
    from coldfusion_p2p.bootstrap import lab as L

    try:
        name, peer = L.revoke(str(lab), member)
    except (UserError, WorkError) as e:
        _fail(e)
    print(f"revoked {name} ({peer}); the running bootstrap peer publishes the new manifest within seconds, "
          "and every peer cuts the member from its next round")


@bootstrap_app.command("members")
def bootstrap_members(
    lab: Path = typer.Option(Path("."), "--lab", help="the lab folder (from `cfp2p bootstrap init`)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """List the lab's members, their token expiry and whether they were revoked."""
    from coldfusion_p2p.bootstrap import lab as L

    try:
        registry, revoked = L.members(str(lab)), set(L.revoked(str(lab)))
    except (UserError, WorkError) as e:
        _fail(e)
    rows = [{"name": m.get("name"), "peer": m.get("peer"), "expires": m.get("expires"), "revoked": m.get("peer") in revoked,
             "source": m.get("source")} for m in registry.values() if isinstance(m, dict)]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("name", "peer", "expires", "revoked", "via")
    for r in sorted(rows, key=lambda r: str(r["name"])):
        table.add_row(str(r["name"]), str(r["peer"]), L.expiry_text(float(r["expires"] or 0)), "yes" if r["revoked"] else "",
                      str(r["source"]))
    out.print(table)


@app.command("id")
def id_cmd(
    identity: Path = typer.Option(..., "--identity", help="this peer's private key file (created, 0600, if missing)"),
):
    """Print this peer's public key and peer id: send the key line to a lab to be admitted to its swarm."""
    from coldfusion_p2p.certs import peer_id_of_public_key
    from coldfusion_p2p.identity import load_identity, new_identity_file

    try:
        if not identity.exists():
            if not identity.parent.exists():
                raise UserError(f"the folder for --identity does not exist: {identity.parent}")
            new_identity_file(str(identity))
            err.print(f"created a new identity key in {identity} (keep it: a token works only with this key)")
        key = load_identity(str(identity))
    except (UserError, WorkError) as e:
        _fail(e)
    err.print(f"peer id {peer_id_of_public_key(key.public_key.encode())}; send the next line to the swarm's lab:")
    print(key.public_key)


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
    precision: str = typer.Option("auto", "--precision", help="training on a GPU: auto (bf16 autocast for bodies of 200M parameters "
                                  "and more, float32 below, where autocast was slower), fp32, bf16 or fp16"),
    weight: Optional[str] = typer.Option(None, "--weight", help="the swarm's manifest sets the weighting rule and every reducer enforces it; "
                                         "a value other than the manifest's is refused"),
    authority: Optional[str] = typer.Option(None, "--authority", help="peer id whose signature the swarm manifest must carry "
                                            "(default: the /p2p/ id of the first --initial-peers)"),
    host_maddrs: List[str] = typer.Option(["/ip4/0.0.0.0/tcp/0"], "--host-maddrs", help="where to listen (repeatable)"),
    announce_maddrs: Optional[List[str]] = typer.Option(None, "--announce-maddrs"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for training"),
    max_wait: Optional[float] = typer.Option(None, "--max-wait", help="give up after waiting this many seconds for peers"),
    events: Optional[Path] = typer.Option(None, "--events", help="append JSON progress events to this file"),
    keep_finetuned: bool = typer.Option(False, "--keep-finetuned", help="also store each round's finetuned body"),
    name: Optional[str] = typer.Option(None, "--name", help="display name in logs and in `cfp2p status` (public)"),
    plain: bool = typer.Option(False, "--plain", help="log lines instead of progress bars, also on a terminal"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="this peer's key file (`cfp2p id` creates one); default: a fresh key each run"),
    token: Optional[Path] = typer.Option(None, "--token", help="membership token of a private swarm, issued for --identity's key"),
    lane_port: int = typer.Option(0, "--lane-port", min=-1, max=65535,
                                  help="TCP port of the direct, encrypted lane that carries the all-reduce's parts (0: any free port; "
                                       "-1: none, parts go over p2pd). Behind a router, forward it along with the p2p port"),
):
    """Join a swarm as a contributor: finetune on private data, fuse with peers, repeat.

    Example: cfp2p join --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm... --data mine.csv --rounds 5
    """
    from coldfusion_p2p.contributor import Contributor, JoinOptions

    _quiet_libraries()
    opts = JoinOptions(
        initial_peers=initial_peers, data=str(data), store=str(store), text_column=text_column, label_column=label_column,
        rounds=rounds, swarm=swarm, model=model, device=device, precision=precision, weighting=weight, host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs, threads=threads, keep_finetuned=keep_finetuned,
        events=str(events) if events else None, max_wait=max_wait, name=name, authority=authority,
        identity=str(identity) if identity else None, token=str(token) if token else None, lane_port=lane_port,
    )
    try:
        if err.is_terminal and not plain:
            from coldfusion_p2p.cli.progress import JoinProgress

            with JoinProgress(err) as bars:
                Contributor(opts, log=bars.log, listener=bars).run()
        else:
            Contributor(opts, log=_log_to_stderr(f"[{name}] " if name else "")).run()
    except (UserError, WorkError) as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: every finished version is in the store")
        raise typer.Exit(130) from None


@app.command()
def status(
    initial_peers: List[str] = typer.Option(..., "--initial-peers", help="multiaddress of any peer in the swarm (repeatable)"),
    swarm: Optional[str] = typer.Option(None, "--swarm", help="which swarm, when the DHT hosts several"),
    once: bool = typer.Option(False, "--once", help="print one snapshot and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the snapshot as JSON for scripts (implies --once)"),
    interval: float = typer.Option(2.0, "--interval", min=0.5, help="seconds between refreshes of the live view"),
    authority: Optional[str] = typer.Option(None, "--authority", help="peer id whose signature the swarm manifest must carry "
                                            "(default: the /p2p/ id of the first --initial-peers)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="a member's key file (private swarms)"),
    token_file: Optional[Path] = typer.Option(None, "--token", help="that member's token (private swarms)"),
):
    """Watch a swarm: newest base, peers and their progress, recent rounds. Joins as a DHT client; never averages.

    Example: cfp2p status --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm...
    """
    from coldfusion_p2p.status import StatusView, render
    from coldfusion_p2p.swarm import SwarmRecords, authority_of, quiet_hivemind, start_dht, stop_process

    quiet_hivemind()
    signal.signal(signal.SIGTERM, _interrupt)
    dht = view = None
    try:
        who = authority_of(initial_peers, authority)
        if who is None:
            raise UserError("cannot tell whose signature the swarm manifest needs: give --initial-peers with a /p2p/ part, or --authority PEER_ID")
        token = admission = None
        if token_file is not None:
            token, admission = _member_credentials(token_file, identity, who)
        dht = start_dht(initial_peers, client_mode=True, identity_path=str(identity) if identity else None, token=token,
                        admission=admission)
        view = StatusView(SwarmRecords(dht), swarm, who, token)
        if as_json:
            print(json.dumps(view.snapshot(), indent=1))
        elif once or not out.is_terminal:
            # off a terminal Rich assumes 80 columns, too narrow for the peers table
            (out if out.is_terminal else Console(width=int(os.environ.get("COLUMNS", 160)))).print(render(view.snapshot()))
        else:
            from rich.live import Live

            with Live(render(view.snapshot()), console=out, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(render(view.snapshot()))
    except (UserError, WorkError) as e:
        _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    finally:
        if view is not None:
            view.close()
        stop_process(dht)


def _member_credentials(token_file: Path, identity: Optional[Path], authority: str):
    """(token, Admission) for a member's DHT node: the token parsed and checked against --identity's key."""
    from coldfusion_p2p.certs import peer_id_of_public_key
    from coldfusion_p2p.membership import Admission, TokenError, parse_token, token_problem
    from coldfusion_p2p.identity import load_identity

    if identity is None or not identity.is_file():
        raise UserError("--token needs the identity key it was issued for: add --identity KEY")
    try:
        token = parse_token(token_file.read_text()[:8192])
    except OSError as e:
        raise UserError(f"cannot read the membership token {token_file}: {e.strerror}") from None
    except TokenError as e:
        raise UserError(f"{token_file}: {e}") from None
    me = peer_id_of_public_key(load_identity(str(identity)).public_key.encode())
    why = token_problem(token, token["swarm"], authority, time.time(), peer=me)
    if why is not None:
        raise UserError(f"membership token {token_file}: {why}")
    return token, Admission("members", token["swarm"], authority)


def _store_chain(vs):
    """The store's certificate chain from v0, checked signature by signature; None if the store has no swarm identity."""
    from coldfusion_p2p.certs import Certificate, CertChain

    try:
        ident = json.loads((vs.root / "swarm.json").read_text())
        chain = CertChain(ident["swarm"], ident["v0_hash"], int(ident.get("min_group_size", 2)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for raw in vs.certificates():
        try:
            if chain.add(Certificate.from_dict(raw)) is not None:
                break
        except ValueError:
            break
    return chain


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
    chain = _store_chain(vs) if verify else None
    rows = []
    for info in vs.list():
        row = {"version": info.version, "hash": info.hash, "parent": info.parent, "contributors": info.contributors,
               "created": info.created, "round_stats": info.round_stats}
        if verify:
            try:
                vs.load(info.version)
                row["valid"] = chain is not None and chain.accepts(info.version, info.hash)
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


@app.command("eval")
def eval_cmd(
    data: List[Path] = typer.Option(..., "--data", help="a labelled dataset to evaluate on (repeatable)"),
    store: Path = typer.Option(Path("cfp2p-store"), "--store", help="a peer's store (versions and model files)"),
    base: str = typer.Option("latest", "--base", help="version number, 'latest', or a path (version folder, body file, exported folder)"),
    against: str = typer.Option("0", "--against", help="the reference base, side by side (default v0)"),
    text_column: str = typer.Option("text", "--text-column"),
    label_column: str = typer.Option("label", "--label-column"),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="linear probe on the frozen body"),
    finetune: bool = typer.Option(True, "--finetune/--no-finetune", help="full finetuning of body and a new head"),
    lr: float = typer.Option(5e-5, "--lr", help="finetuning learning rate"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01, help="finetuning passes over the training split"),
    max_examples: int = typer.Option(2000, "--max-examples", min=16, help="cap on training examples (probe and finetune)"),
    max_length: int = typer.Option(128, "--max-length", min=8),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
):
    """Evaluate a base against v0 on labelled data: linear probe and finetuning, side by side.

    Example: cfp2p eval --store cfp2p-store --base latest --data mine.csv --data other.jsonl
    """
    import torch

    from coldfusion_p2p.config import TrainingSpec
    from coldfusion_p2p.data import load_private_data
    from coldfusion_p2p.evaluate import EvalSettings, evaluate, resolve_base
    from coldfusion_p2p.store import VersionStore
    from coldfusion_p2p.training import pick_device

    _quiet_libraries()
    try:
        if not probe and not finetune:
            raise UserError("nothing to do: both --no-probe and --no-finetune")
        if threads:
            torch.set_num_threads(threads)
        datasets = [load_private_data(d, text_column, label_column) for d in data]
        if not store.is_dir():
            raise UserError(f"no store at {store}")
        vs = VersionStore(store)
        label_b, body_b, model_dir = resolve_base(vs, base)
        label_a, body_a, _ = resolve_base(vs, against)
        if label_a == label_b:
            label_a = f"{label_a} (reference)"
        settings = EvalSettings(
            max_length=max_length, probe_train_limit=max_examples, device=str(pick_device(device)),
            finetune=TrainingSpec(lr=lr, batch_size=batch_size, examples_per_round=max_examples, warmup_ratio=0.06, seed=0),
            finetune_epochs=epochs,
        )
        log = _log_to_stderr()
        rows = evaluate(model_dir, {label_a: body_a, label_b: body_b}, datasets, settings, probe=probe, finetune=finetune, log=log)
    except (UserError, WorkError) as e:
        _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps({"reference": label_a, "base": label_b, "rows": rows}, indent=1))
        return
    out.print(eval_table(rows, label_a, label_b, probe, finetune))


def eval_table(rows: list[dict], label_a: str, label_b: str, probe: bool, finetune: bool) -> Table:
    table = Table(title=f"{label_b} against {label_a} (held-out accuracy)")
    table.add_column("dataset")
    kinds = [k for k, on in (("probe", probe), ("finetune", finetune)) if on]
    for k in kinds:
        table.add_column(f"{k} {label_a}", justify="right")
        table.add_column(f"{k} {label_b}", justify="right")
        table.add_column("change", justify="right")
    by = {(r["dataset"], r["base"]): r for r in rows}
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    sums = {k: [0.0, 0.0] for k in kinds}
    for name in names:
        cells = []
        for k in kinds:
            a, b = by[(name, label_a)][k], by[(name, label_b)][k]
            sums[k][0] += a
            sums[k][1] += b
            cells += [f"{a:.3f}", f"{b:.3f}", _signed(b - a)]
        table.add_row(name, *cells)
    if len(names) > 1:
        cells = []
        for k in kinds:
            a, b = sums[k][0] / len(names), sums[k][1] / len(names)
            cells += [f"{a:.3f}", f"{b:.3f}", _signed(b - a)]
        table.add_row("[bold]mean[/bold]", *cells)
    return table


def _signed(x: float) -> str:
    points = 100 * x
    color = "green" if points > 0.05 else "red" if points < -0.05 else "dim"
    return f"[{color}]{points:+.1f} pt[/{color}]"


@app.command()
def export(
    version: str = typer.Option("latest", "--version", help="version number or 'latest'"),
    out_dir: Path = typer.Option(..., "--out", help="a new folder for the Hugging Face model"),
    store: Path = typer.Option(Path("cfp2p-store"), "--store"),
):
    """Export a base as a Hugging Face folder: AutoModel.from_pretrained(DIR) loads it offline.

    Example: cfp2p export --store cfp2p-store --version 5 --out my-base-v5
    """
    from coldfusion_p2p.evaluate import export_version
    from coldfusion_p2p.store import VersionStore

    try:
        if not store.is_dir():
            raise UserError(f"no store at {store}")
        meta = export_version(VersionStore(store), version, out_dir)
    except (UserError, WorkError) as e:
        _fail(e)
    out.print(f"exported {meta['version']} ({meta['hash'][:12]}) to {out_dir}: load it with AutoModel.from_pretrained({str(out_dir)!r})")


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
