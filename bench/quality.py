"""Does the swarm make a better base? ColD Fusion through the real peer-to-peer stack, and centrally.

    python bench/quality.py --data A.jsonl.gz B.jsonl.gz ... --unseen C.jsonl.gz ... --rounds 8 --out bench-out

- ``p2p``: a bootstrap peer and one ``cfp2p join`` process per ``--data`` file on localhost (real
  hivemind peers), ``--rounds`` rounds, every contributor in every round.
- ``central``: the same loop in this process without a network, with the same code
  (``LocalTrainer``, ``round_seed``, ``body_delta``, the manifest's fusion strategy): each contributor
  finetunes the base with its persistent head, the bodies' deltas go through the wire's compression
  and are reduced by the strategy, which takes the outer step. It is the reference: the p2p bases
  must equal it (max abs difference per version).
- ``multitask``: one body and one head per dataset, trained on batches of all contributors' data in
  turn, for as many optimiser steps as the whole swarm took (rounds x contributors x steps a round).

Reported per version: linear-probe accuracy on the contributors' held-out splits ("seen") and on
the ``--unseen`` datasets; full-finetuning accuracy on the unseen ones at v0 and at the last
version; the multitask body's probe accuracies. Written as a table, ``quality.json`` and
``quality.png`` in ``--out``. Each dataset is cut to ``--max-train`` training examples (its
held-out split is the usual hash split, cut to ``--max-eval``) and written to ``--out/data``, so
both loops read the same files. The reference numbers in ../shared/data/README.md came from a
central run of the paper's setting (10 datasets, 2,000 examples, lr 5e-5, batch 32, 8 rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coldfusion_p2p import model as M  # noqa: E402
from coldfusion_p2p.config import STRATEGIES, TrainingSpec  # noqa: E402
from coldfusion_p2p.data import PrivateData, load_private_data  # noqa: E402
from coldfusion_p2p.evaluate import EvalSettings, evaluate, subset  # noqa: E402
from coldfusion_p2p.config import SwarmManifest  # noqa: E402
from coldfusion_p2p.fusion import body_delta, clip_to_norm, delta_norm, round_bound  # noqa: E402
from coldfusion_p2p.plots import plot_lines  # noqa: E402
from coldfusion_p2p.procs import Children, cli_command, wait_for_address  # noqa: E402
from coldfusion_p2p.store import VersionStore  # noqa: E402
from coldfusion_p2p.strategies import filter_radius  # noqa: E402
from coldfusion_p2p.swarm.averager import part_values  # noqa: E402
from coldfusion_p2p.training import LocalTrainer, round_seed  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 120)


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


def prepare(files: list[str], out: Path, max_train: int, max_eval: int) -> list[Path]:
    """Cut each dataset to a subset and write it as jsonl; reloading it gives the same split."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in files:
        d = load_private_data(f)
        path = out / f"{d.name}.jsonl"
        with open(path, "w") as fh:
            for texts, labels, n in ((d.train_texts, d.train_labels, max_train), (d.eval_texts, d.eval_labels, max_eval)):
                for t, y in zip(*subset(texts, labels, n)):  # a seeded sample: files are often sorted by label
                    fh.write(json.dumps({"text": t, "label": d.labels[y]}) + "\n")
        paths.append(path)
    return paths


def manifest_toml(args, contributors: int) -> str:
    return f"""[swarm]
name = "quality"
[model]
source = "{args.model}"
[tokenizer]
max_length = {args.max_length}
[training]
lr = {args.lr}
batch_size = {args.batch_size}
examples_per_round = {args.examples_per_round}
seed = {args.seed}
[fusion]
strategy = "{args.strategy}"
compression = "{args.compression}"
[round]
min_group_size = {contributors}
round_window = 3600.0
matchmaking_time = 5.0
verify_timeout = 60.0
allreduce_timeout = 300.0
"""


def _write_manifest(args, contributors: int) -> Path:
    path = Path(args.out) / f"central-{args.strategy}-{args.compression}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest_toml(args, contributors))
    return path


def _wire(compression: str):
    """What a tensor is once it has crossed the wire (the all-reduce's compression), as the reducers see it:
    each part of ``part_values(compression)`` values round-tripped on its own (8-bit has a codebook per part)."""
    if compression == "none":
        return lambda t: t.clone()
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto.runtime_pb2 import CompressionType

    kind = {"float16": CompressionType.FLOAT16, "8bit": CompressionType.UNIFORM_8BIT}[compression]
    size = part_values(compression)

    def wire(t: torch.Tensor) -> torch.Tensor:
        chunks = [deserialize_torch_tensor(serialize_torch_tensor(c, kind)) for c in t.reshape(-1).split(size)]
        return torch.cat(chunks).reshape(t.shape)
    return wire


def edge_attack(deltas: list[list[torch.Tensor]], size: int, factor: float = 25.0) -> list[torch.Tensor]:
    """A member that knows ``filtered_mean``'s rule and the honest deltas: in every part, the point against
    the honest mean's direction at 0.9 of the radius the filter keeps (the worst it can do unseen)."""
    out = []
    for parts in zip(*deltas):
        chunks = []
        for cs in zip(*(p.reshape(-1).split(size) for p in parts)):
            center, _d2, limit = filter_radius(list(cs), factor)
            away = -sum(c.double() for c in cs)
            away = away / max(float(away.norm()), 1e-30)
            chunks.append((center + 0.9 * limit ** 0.5 * away).float())
        out.append(torch.cat(chunks).reshape(parts[0].shape))
    return out


def wire_bytes(values: int, compression: str, peers: int) -> int:
    """Bytes each peer sends in one butterfly all-reduce: its parts out and the averages back, 2(P-1)/P of the vector."""
    per_value = {"none": 4, "float16": 2, "8bit": 1}[compression]  # 8bit adds a 256-value codebook per part
    return int(2 * (peers - 1) / peers * values * per_value)


def spec_of(args) -> TrainingSpec:
    return TrainingSpec(lr=args.lr, batch_size=args.batch_size, examples_per_round=args.examples_per_round, seed=args.seed)


def central(args, model_dir: Path, datasets: list[PrivateData]) -> list[M.BodyState]:
    """The ColD Fusion loop in one process, exactly as the contributors run it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec, device = spec_of(args), torch.device(args.device)
    trainers = []
    for d in datasets:  # persistent private heads, initialised as cfp2p join does
        trainers.append(LocalTrainer(tokenizer, d, M.new_head(model_dir, d.num_labels), spec, args.max_length, device))
    bases = [M.body_state(M.load_body_module(model_dir))]
    names = M.averaged_names(bases[0])
    manifest = SwarmManifest.from_toml(_write_manifest(args, len(datasets)))
    strategy, wire = manifest.strategy(), _wire(manifest.fusion.compression)
    size = part_values(manifest.fusion.compression)  # the all-reduce's parts (a per-part strategy reduces these)
    for v in range(args.rounds):
        base, deltas, weights = bases[-1], [], []
        bound = round_bound(delta_norm([base[n].float() for n in names]), manifest.fusion.max_delta_ratio)
        for d, trainer in zip(datasets, trainers):
            body = M.load_body_module(model_dir, base)
            result = trainer.train(body, round_seed(spec.seed, v, d.name))
            delta, _, _ = clip_to_norm(body_delta(base, M.body_state(body), names), bound)  # as each peer shares it
            deltas.append([wire(t) for t in delta])
            weights.append(strategy.weight(result.examples, spec.examples_per_round))
        if args.bad_members:  # colluding members that all send the same delta, as long as the round's bound allows
            honest_norm = max(delta_norm(d) for d in deltas)
            if args.bad_kind == "noise":  # random noise, 20x an honest delta
                g = torch.Generator().manual_seed(args.seed * 1_000 + v)
                evil = [torch.randn(t.shape, generator=g) for t in deltas[0]]
            elif args.bad_kind == "reverse":  # against the honest members' mean, 20x as long (they know it)
                evil = [-t for t in strategy.reduce_all(deltas, weights, part_values=size)]
            else:  # edge: against the honest mean, just inside filtered_mean's radius in every part
                evil = edge_attack(deltas, size)
            scale = 1.0 if args.bad_kind == "edge" else min(20 * honest_norm, 0.95 * bound) / delta_norm(evil)
            scale = min(scale, 0.95 * bound / delta_norm(evil))
            for _ in range(args.bad_members):
                deltas.append([wire(t * scale) for t in evil])
                weights.append(1.0)
            log(f"central: v{v}: {args.bad_members} bad member(s) send {args.bad_kind} of norm {scale * delta_norm(evil):.4g} "
                f"(honest deltas: at most {honest_norm:.4g}, the round's bound {bound:.4g})")
        averaged = [wire(t) for t in strategy.reduce_all(deltas, weights, part_values=size)]  # the all-reduce's arithmetic and bytes
        averaged, _, _ = clip_to_norm(averaged, bound)
        bases.append(strategy.step(base, names, averaged))
        log(f"central: v{v + 1} ({M.hash_body(bases[-1])[:12]})")
    return bases


def multitask(args, model_dir: Path, datasets: list[PrivateData]) -> M.BodyState:
    """One body, one head per dataset, batches of each dataset in turn; as many steps as the swarm."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec, device = spec_of(args), torch.device(args.device)
    torch.manual_seed(args.seed)
    trainers = [LocalTrainer(tokenizer, d, M.ClassifierHead(M.hidden_size_of(model_dir), d.num_labels), spec, args.max_length, device)
                for d in datasets]
    body = M.load_body_module(model_dir).to(device).train()
    params = list(body.parameters()) + [p for t in trainers for p in t.head.to(device).train().parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = 0
    for v in range(args.rounds):
        streams = [t._batches(*t.round_examples(round_seed(spec.seed, v, d.name)), spec.batch_size) for t, d in zip(trainers, datasets)]
        live = list(range(len(streams)))
        while live:
            for i in list(live):
                batch = next(streams[i], None)
                if batch is None:
                    live.remove(i)
                    continue
                enc, y = batch
                loss = loss_fn(trainers[i]._forward(body, enc), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                steps += 1
    log(f"multitask: {steps} steps")
    return M.body_state(body.to("cpu"))


def p2p(args, out: Path, files: list[Path]) -> list[M.BodyState]:
    """A real local swarm: a bootstrap peer and one contributor process per dataset."""
    work = out / "p2p"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "swarm.toml"
    config.write_text(manifest_toml(args, len(files)))
    maddrs = work / "bootstrap.maddrs"
    maddrs.unlink(missing_ok=True)
    with Children() as children:
        boot = children.start(cli_command("bootstrap", "--config", str(config), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                          "--maddrs-file", str(maddrs), "--store", str(work / "bootstrap")), work / "bootstrap.log")
        peer = wait_for_address(maddrs, boot, work / "bootstrap.log", timeout=300)  # a WorkError: one line from main
        procs = []
        for f in files:
            store = work / f"peer-{f.stem}"
            procs.append(children.start(cli_command(
                "join", "--initial-peers", peer, "--data", str(f), "--rounds", str(args.rounds), "--store", str(store),
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", str(args.peer_threads), "--device", args.device,
                "--name", f.stem, "--plain"), work / f"{f.stem}.log"))
        log(f"p2p: {len(procs)} contributors joined {peer}")
        for f, proc in zip(files, procs):
            if proc.wait() != 0:
                raise SystemExit(f"contributor {f.stem} failed; see {work / (f.stem + '.log')}")
    stores = [VersionStore(work / f"peer-{f.stem}") for f in files]
    bases = [stores[0].load(v)[0] for v in range(args.rounds + 1)]
    for s in stores[1:]:
        assert s.read_info(args.rounds).hash == stores[0].read_info(args.rounds).hash, "peers disagree"
    log(f"p2p: all {len(stores)} peers hold v{args.rounds} ({stores[0].read_info(args.rounds).hash[:12]})")
    return bases


def max_abs_diff(a: M.BodyState, b: M.BodyState) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="the contributors' datasets, one peer each (jsonl/csv/...)")
    ap.add_argument("--unseen", nargs="*", default=[], help="datasets no contributor trains on")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-train", type=int, default=2000, help="training examples kept per dataset")
    ap.add_argument("--max-eval", type=int, default=500, help="held-out examples kept per dataset")
    ap.add_argument("--examples-per-round", type=int, default=2000, help="examples each contributor trains on a round")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", choices=STRATEGIES, default="mean", help="the fusion strategy")
    ap.add_argument("--compression", choices=("none", "float16", "8bit"), default="none", help="deltas on the wire")
    ap.add_argument("--bad-members", type=int, default=0,
                    help="central only: this many extra members send the same noise every round, 20x the longest honest "
                         "delta or just inside the round's bound (a longer delta is banned by every reducer)")
    ap.add_argument("--bad-kind", choices=("noise", "reverse", "edge"), default="noise",
                    help="what bad members send: random noise, the honest members' mean reversed, or (edge) the reversed "
                         "direction just inside filtered_mean's radius in every part")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    ap.add_argument("--peer-threads", type=int, default=1)
    ap.add_argument("--mode", choices=("both", "central", "p2p"), default="both")
    ap.add_argument("--no-multitask", action="store_true")
    ap.add_argument("--finetune-examples", type=int, default=2000, help="cap for the unseen finetuning runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    if args.bad_members and args.mode != "central":
        raise SystemExit("--bad-members needs --mode central (the swarm's tests run bad members through real peers)")
    started = time.monotonic()
    seen_files = prepare(args.data, out / "data", args.max_train, args.max_eval)
    unseen_files = prepare(args.unseen, out / "data", args.max_train, args.max_eval)
    seen = [load_private_data(f) for f in seen_files]
    unseen = [load_private_data(f) for f in unseen_files]
    model_dir = M.resolve_model_source(args.model, cache_dir=out / "cache")
    report: dict = {"settings": vars(args), "seen": [d.name for d in seen], "unseen": [d.name for d in unseen], "timings_s": {}}

    bases, p2p_bases = None, None
    if args.mode in ("both", "p2p"):
        t = time.monotonic()
        p2p_bases = p2p(args, out, seen_files)
        report["timings_s"]["p2p"] = round(time.monotonic() - t, 1)
    if args.mode in ("both", "central"):
        t = time.monotonic()
        # as many threads as each peer: CPU kernels round differently with another thread count,
        # and 25 Adam steps turn that into ~1e-5 differences (measured: 1.5e-5 after 4 rounds)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.peer_threads)
        bases = central(args, model_dir, seen)
        torch.set_num_threads(threads)
        report["timings_s"]["central"] = round(time.monotonic() - t, 1)
    if bases and p2p_bases:
        diffs = [max_abs_diff(a, b) for a, b in zip(bases, p2p_bases)]
        report["p2p_vs_central_max_abs_diff"] = diffs
        log("p2p against central, max abs difference per version: " + ", ".join(f"v{i} {d:.2e}" for i, d in enumerate(diffs)))
    bases = bases or p2p_bases

    t = time.monotonic()
    settings = EvalSettings(max_length=args.max_length, probe_train_limit=args.max_train, eval_limit=args.max_eval, device=args.device,
                            finetune=TrainingSpec(lr=args.lr, batch_size=args.batch_size, examples_per_round=args.finetune_examples,
                                                  warmup_ratio=0.06, seed=args.seed))
    labelled = {f"v{i}": b for i, b in enumerate(bases)}
    probes = evaluate(model_dir, labelled, seen + unseen, settings, probe=True, finetune=False)
    last = f"v{len(bases) - 1}"
    tuned = evaluate(model_dir, {"v0": bases[0], last: bases[-1]}, unseen, settings, probe=False, finetune=True) if unseen else []
    mt_rows = []
    if not args.no_multitask:
        mt = multitask(args, model_dir, seen)
        mt_rows = evaluate(model_dir, {"multitask": mt}, seen + unseen, settings, probe=True, finetune=False)
    report["timings_s"]["evaluation"] = round(time.monotonic() - t, 1)

    def mean_probe(rows, base, names):
        xs = [r["probe"] for r in rows if r["base"] == base and r["dataset"] in names]
        return sum(xs) / len(xs) if xs else None

    seen_names, unseen_names = {d.name for d in seen}, {d.name for d in unseen}
    per_version = [{"version": i, "seen": mean_probe(probes, f"v{i}", seen_names), "unseen": mean_probe(probes, f"v{i}", unseen_names)}
                   for i in range(len(bases))]
    report.update(probe_rows=probes, finetune_rows=tuned, multitask_rows=mt_rows, per_version=per_version)
    if mt_rows:
        report["multitask"] = {"seen": mean_probe(mt_rows, "multitask", seen_names), "unseen": mean_probe(mt_rows, "multitask", unseen_names)}
    ft = {(r["dataset"], r["base"]): r["finetune"] for r in tuned}
    if tuned:
        report["unseen_finetune"] = {b: sum(ft[(d.name, b)] for d in unseen) / len(unseen) for b in ("v0", last)}
    values = sum(bases[0][n].numel() for n in M.averaged_names(bases[0]))
    report["wire_bytes_per_peer_per_round"] = wire_bytes(values, args.compression, len(seen))
    report["timings_s"]["total"] = round(time.monotonic() - started, 1)
    (out / "quality.json").write_text(json.dumps(report, indent=1))

    table = Table(title="linear-probe accuracy per version (mean over datasets)")
    for col in ("base", "seen", "unseen"):
        table.add_column(col, justify="right")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    for row in per_version:
        table.add_row(f"v{row['version']}", pct(row["seen"]), pct(row["unseen"]))
    if mt_rows:
        table.add_row("multitask", pct(report["multitask"]["seen"]), pct(report["multitask"]["unseen"]))
    console.print(table)
    detail = Table(title="per dataset (linear probe; finetune on unseen)")
    detail.add_column("dataset")
    for col in ("kind", "v0", last, "change") + (("multitask",) if mt_rows else ()):
        detail.add_column(col, justify="right")
    acc = {(r["dataset"], r["base"]): r["probe"] for r in probes + mt_rows}
    for d in seen + unseen:
        kind = "seen" if d.name in seen_names else "unseen"
        a, b = acc[(d.name, "v0")], acc[(d.name, last)]
        detail.add_row(d.name, kind, pct(a), pct(b), f"{100 * (b - a):+.1f}", *((pct(acc[(d.name, "multitask")]),) if mt_rows else ()))
        if (d.name, "v0") in ft:
            a, b = ft[(d.name, "v0")], ft[(d.name, last)]
            detail.add_row("", "finetune", pct(a), pct(b), f"{100 * (b - a):+.1f}", *(("",) if mt_rows else ()))
    console.print(detail)
    first, final = per_version[0], per_version[-1]
    console.print(f"seen: {pct(first['seen'])} -> {pct(final['seen'])} ({100 * (final['seen'] - first['seen']):+.1f} pt)"
                  + (f"; unseen: {pct(first['unseen'])} -> {pct(final['unseen'])} ({100 * (final['unseen'] - first['unseen']):+.1f} pt)" if unseen else "")
                  + (f"; unseen finetune: {pct(report['unseen_finetune']['v0'])} -> {pct(report['unseen_finetune'][last])}" if tuned else ""))
    if "p2p_vs_central_max_abs_diff" in report:
        console.print(f"p2p bases against central: max abs difference {max(report['p2p_vs_central_max_abs_diff']):.2e} (target <= 1e-5)")
    xs = [r["version"] for r in per_version]
    series = {"seen (probe)": [r["seen"] for r in per_version]}
    if unseen:
        series["unseen (probe)"] = [r["unseen"] for r in per_version]
    dashed = {}
    if mt_rows:
        dashed = {f"multitask {k}": [report["multitask"][k]] * len(xs) for k in ("seen", "unseen") if report["multitask"][k] is not None}
    plot_lines(out / "quality.png", xs, series, "ColD Fusion: linear-probe accuracy per base version", "base version", "mean held-out accuracy", dashed)
    console.print(f"strategy {args.strategy}, compression {args.compression}: {report['wire_bytes_per_peer_per_round'] / 1e6:.1f} MB "
                  f"on the wire per peer per round ({values:,} values, {len(seen)} peers)")
    console.print(f"wrote {out / 'quality.json'} and {out / 'quality.png'} in {report['timings_s']['total']:.0f}s")


if __name__ == "__main__":
    from coldfusion_p2p.errors import UserError, WorkError

    try:
        main()
    except (UserError, WorkError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
