"""A contributor: join a swarm, then round after round finetune the base and fuse it with the peers.

One round on base ``(v, hash)``:

1. sync: if a peer announces a newer base, download it (verified by hash) and start from there;
2. train: finetune body and private head on the local data (``state=training`` is announced);
3. gather: announce ``state=ready`` and wait until every peer still training on the same base is
   ready too, or until the round window closes; alone, wait visibly (min group size);
4. all-reduce the body deltas (heads never leave the peer) in a group keyed by ``(v, hash)``;
5. verify: publish ``(result hash, clean)``; commit ``B[v+1]`` only when every member that answered
   is clean and agrees; otherwise redo the all-reduce among the survivors from the same deltas,
   and after ``max_attempts`` keep ``B[v]``;
6. store ``B[v+1]`` atomically and announce it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from coldfusion_p2p import model as M
from coldfusion_p2p.config import SwarmManifest
from coldfusion_p2p.data import PrivateData, load_private_data
from coldfusion_p2p.errors import UserError, WorkError
from coldfusion_p2p.fusion import OuterStep, body_delta, check_delta, weight_for
from coldfusion_p2p.store import VersionInfo, VersionStore
from coldfusion_p2p.training import LocalTrainer, pick_device, round_seed

HEARTBEAT_SECONDS = 4.0
SETTLE_SECONDS = 1.0  # a second look before a round starts, so that peers' views of the records agree


@dataclass
class JoinOptions:
    """What ``cfp2p join`` takes; everything else comes from the swarm manifest."""

    initial_peers: list[str]
    data: str
    store: str = "cfp2p-store"
    text_column: str = "text"
    label_column: str = "label"
    rounds: int | None = None  # None: until Ctrl+C
    swarm: str | None = None  # which swarm, when a DHT announces several
    model: str | None = None  # a local model folder or built-in name; else the manifest's, else from peers
    device: str = "auto"
    weighting: str | None = None  # overrides the manifest's default
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] | None = None
    threads: int | None = None
    keep_finetuned: bool = False  # also store each round's finetuned body (for checks and debugging)
    events: str | None = None  # append JSON lines of progress events to this file
    max_wait: float | None = None  # give up after waiting this long for peers (None: wait forever)
    name: str | None = None  # a display name for `cfp2p status`; public, unlike the data


@dataclass
class Base:
    version: int
    hash: str
    body: M.BodyState
    contributors: list[str] = field(default_factory=list)  # who made it: expected in the next round


class Events:
    """Progress for people (log lines, or a live view) and programs (JSON lines)."""

    def __init__(self, path: str | None, log: Callable[[str], None], listener: Callable[..., None] | None = None):
        self._file = open(path, "a", buffering=1) if path else None
        self.log = log
        self.listener = listener  # e.g. cli.progress.JoinProgress: every event, and live() updates

    def emit(self, kind: str, message: str | None = None, **fields) -> None:
        if message and kind not in getattr(self.listener, "shows", ()):  # a bar already says it
            self.log(message)
        if self._file:
            self._file.write(json.dumps({"t": time.time(), "event": kind, **fields}) + "\n")
        if self.listener is not None:
            self.listener(kind, **fields)

    def live(self, kind: str, **fields) -> None:
        """A frequent update (a training step, downloaded bytes) for the live view only."""
        if self.listener is not None:
            self.listener(kind, **fields)

    def close(self) -> None:
        if self._file:
            self._file.close()


def _history_entry(info: VersionInfo) -> dict:
    stats = info.round_stats or {}
    return {"v": int(info.version), "hash": info.hash, "parent": info.parent or "", "contributors": len(info.contributors),
            "time": float(info.created), "round_s": float(stats.get("round_s") or 0.0)}


def _raise_terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _store_identity(store: VersionStore, manifest: SwarmManifest) -> None:
    """A store belongs to one swarm history: refuse to mix bases of another model or swarm."""
    path = store.root / "swarm.json"
    mine = {"swarm": manifest.name, "v0_hash": manifest.model.v0_hash}
    if path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            theirs = None
        if theirs != mine:
            raise UserError(f"store {store.root} belongs to another swarm or model ({theirs}); use another --store")
    else:
        path.write_text(json.dumps(mine))


class Contributor:
    def __init__(self, opts: JoinOptions, log: Callable[[str], None] = print, listener: Callable[..., None] | None = None):
        self.opts, self.log = opts, log
        self.events = Events(opts.events, log, listener)
        self.dht = self.averager = self.records = None
        self._stop_heartbeat = threading.Event()
        self._phase = {"state": None}
        self.base: Base | None = None
        self._started = self._round_started = time.monotonic()
        # what `cfp2p status` shows: swarm.metrics_record's fields that change as the peer works
        self._metrics = {"phase": "syncing", "step": 0, "total": 0, "loss": None, "examples_per_second": None,
                         "last_round_seconds": None, "rounds": 0}
        self._device = "cpu"

    # ---------------------------------------------------------------- setup
    def _fetch_manifest(self, records, timeout: float = 30.0) -> SwarmManifest:
        name, data = records.wait_for_manifest(self.opts.swarm, timeout)
        return SwarmManifest.from_dict(data, where=f"swarm manifest {name!r} from the DHT")

    def _download_verified(self, name: str, dest: Path, check: Callable[[Path], str | None], holders: list[str]) -> None:
        """Fetch ``name`` from the first holder whose bytes pass ``check`` (None = good, else a reason)."""
        from coldfusion_p2p.swarm import BlobError, fetch_blob

        problems = []
        self._metrics["phase"] = "syncing"
        for peer in holders:
            tmp = dest.with_name(f".part-{dest.name}-{os.getpid()}")
            try:
                fetch_blob(self.dht, self.manifest.name, peer, name, tmp,
                           on_bytes=lambda done, total: self.events.live("download_bytes", name=name, done=done, total=total))
                reason = check(tmp)
                if reason is None:
                    os.replace(tmp, dest)
                    return
                problems.append(f"{peer[:12]}: {reason}")
                self.log(f"holder {peer[:12]} served a bad {name} ({reason}); trying another")
            except BlobError as e:
                problems.append(str(e))
            finally:
                tmp.unlink(missing_ok=True)
        raise WorkError(f"no peer served a valid {name} ({'; '.join(problems) or 'no holders'})")

    def _prepare_model(self) -> tuple[Path, M.BodyState | None]:
        """Local model files in the store; the local v0 body when this peer has the model itself."""
        manifest, store = self.manifest, self.store
        wanted = manifest.model.files
        store.model_dir.mkdir(parents=True, exist_ok=True)
        if wanted and M.model_file_hashes(store.model_dir) == wanted and self.store.list():
            return store.model_dir, None
        source = self.opts.model or manifest.model.source
        local = None
        try:
            local = M.resolve_model_source(source, cache_dir=store.root / "cache")
        except UserError:
            if self.opts.model:
                raise
        if local is not None:
            body = M.body_state(M.load_body_module(local))
            got = M.hash_body(body)
            if got != manifest.model.v0_hash:
                raise UserError(
                    f"local model {source} does not match the swarm's v0 (hash {got[:12]} != {manifest.model.v0_hash[:12]}); "
                    "drop --model to download the swarm's model from peers"
                )
            for name in M.MODEL_FILE_NAMES:
                if (local / name).is_file():
                    shutil.copy(local / name, store.model_dir / name)
            return store.model_dir, body
        holders = [h.peer for h in self.records.holders() if h.peer != self.records.peer_id]
        self.events.emit("download", f"downloading the model files from {len(holders)} peer(s)", what="model")
        for name, digest in wanted.items():
            from coldfusion_p2p.swarm import sha256_file

            self._download_verified(
                f"model/{name}", store.model_dir / name,
                lambda p, d=digest: None if sha256_file(p) == d else "sha256 mismatch", holders,
            )
        return store.model_dir, None

    def _download_base(self, version: int, body_hash: str, holders: list[str]) -> Base:
        existing = self.store.read_info(version)
        if existing is not None:
            try:
                body, info = self.store.load(version)
                if info.hash == body_hash:
                    return Base(version, body_hash, body, info.contributors)  # already here and intact
            except UserError as e:
                self.log(f"{e}; downloading it again")
            self.log(f"retired our v{version} ({existing.hash[:12]}) to {self.store.retire(version)}")
        self.events.emit("download", f"downloading base v{version} ({body_hash[:12]}) from {len(holders)} holder(s)", what="base", version=version)
        tmpdir = Path(tempfile.mkdtemp(dir=self.store.root, prefix=".dl-"))
        try:
            dest = tmpdir / "body.safetensors"
            loaded = {}

            def check(path: Path) -> str | None:
                try:
                    body = M.load_tensors(path)
                except UserError as e:
                    return str(e)
                got = M.hash_body(body)
                if got != body_hash:
                    return f"hash {got[:12]} != {body_hash[:12]}"
                loaded["body"] = body
                return None

            self._download_verified(f"version/{version}", dest, check, holders)
            info = VersionInfo(version, body_hash, parent=None)
            info_path = tmpdir / "info.json"
            try:
                self._download_verified(f"info/{version}", info_path, lambda p: None if json.loads(p.read_text()).get("hash") == body_hash else "info names another hash", holders)
                info = VersionInfo(**json.loads(info_path.read_text()))
            except (WorkError, ValueError, TypeError):
                pass  # the body is verified; its history record is a courtesy
            self.store.save(loaded["body"], info)
            return Base(version, body_hash, loaded["body"], info.contributors)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _initial_base(self, local_v0: M.BodyState | None) -> Base:
        found = self.store.latest_valid(log=self.log)
        if found is not None:
            body, info = found
            self.events.emit("resume", f"resuming from v{info.version} ({info.hash[:12]}) in {self.store.root}", version=info.version)
            return Base(info.version, info.hash, body, info.contributors)
        if local_v0 is not None:
            self.store.save(local_v0, VersionInfo(0, self.manifest.model.v0_hash, parent=None))
            return Base(0, self.manifest.model.v0_hash, local_v0)
        best = self.records.best_base()
        if best is None or not best[2]:
            raise WorkError("no peer announces a base to download, and this peer has no local copy of the model; pass --model")
        return self._download_base(*best)

    def _sync(self) -> bool:
        """Move to the swarm's base (``SwarmRecords.best_base``) if it is not ours; True when it changed."""
        best = self._better_base()
        if best is None:
            return False
        self._set_phase("syncing")
        if best[0] == self.base.version:
            self.events.emit("fork", f"the swarm settled on another v{best[0]} ({best[1][:12]}, {len(best[2])} holder(s)) than ours ({self.base.hash[:12]}); switching")
        self.base = self._download_base(*best)
        self.records.announce_base(self.base.version, self.base.hash)
        self.events.emit("synced", f"synced to v{self.base.version} ({self.base.hash[:12]})", version=self.base.version, hash=self.base.hash)
        return True

    # ---------------------------------------------------------------- heartbeat
    _PUBLIC_PHASE = {"training": "training", "ready": "matchmaking", "averaging": "matchmaking", "storing": "averaging", "idle": "idle"}

    def _set_phase(self, state: str, examples: int = 0) -> None:
        from coldfusion_p2p.swarm import dht_time

        # "since" stays fixed while the heartbeat refreshes the record: the round window counts from it
        self._phase = {"state": state, "examples": examples, "version": self.base.version, "hash": self.base.hash, "since": dht_time()}
        if state in ("training", "ready"):
            self.records.set_progress(self.base.version, self.base.hash, state, examples, since=self._phase["since"])
        self._metrics["phase"] = self._PUBLIC_PHASE.get(state, self._metrics["phase"])
        self._publish_metrics()
        self.events.emit("phase", None, state=state, version=self.base.version)

    def _publish_metrics(self) -> None:
        from coldfusion_p2p.swarm import metrics_record

        if self.records is None or self.base is None:
            return
        try:
            self.records.publish_metrics(metrics_record(
                swarm=self.manifest.name, peer=self.records.peer_id, role="contributor", name=self.opts.name,
                version=self.base.version, hash=self.base.hash, device=self._device,
                uptime=time.monotonic() - self._started, **self._metrics,
            ))
        except Exception:  # noqa: BLE001 - metrics are best effort; the next heartbeat tries again
            pass

    def _publish_history(self) -> None:
        """Re-publish the newest versions of this store for `cfp2p status` (they expire otherwise)."""
        for info in self.store.list()[-10:]:
            if info.version == 0:
                continue
            self.records.publish_history(_history_entry(info))

    def _heartbeat(self) -> None:
        last_manifest = 0.0
        while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
            try:
                base, phase = self.base, dict(self._phase)
                if base is not None:
                    self.records.announce_base(base.version, base.hash)
                if phase.get("state") in ("training", "ready"):
                    self.records.set_progress(phase["version"], phase["hash"], phase["state"], phase["examples"], since=phase["since"])
                if phase.get("state") != "left":
                    self._publish_metrics()
                if time.monotonic() - last_manifest > 60:
                    self.records.publish_manifest(self.manifest.to_dict())
                    self._publish_history()
                    last_manifest = time.monotonic()
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried on the next beat
                pass

    # ---------------------------------------------------------------- the round
    def _wait_for_group(self) -> list[str] | None:
        """Wait until this base's round can start; the ready peers, or None if a newer base appeared.

        Expected in the round: every peer that announces ``training`` on this base, and every peer
        that made this base and still holds it (its records may not have reached us yet). The round
        starts when all of them are ready, or when the round window closes; never below the
        manifest's minimum group size.
        """
        from coldfusion_p2p.swarm import dht_time

        r, base, me = self.manifest.round, self.base, self.records.peer_id
        started, last_note, settled = time.monotonic(), 0.0, False
        while True:
            holders = self.records.holders()
            if self._newer_base_exists(holders):
                return None
            progress = {p: s for p, s in self.records.progress(base.version, base.hash).items() if isinstance(s, dict)}
            ready = {p: s for p, s in progress.items() if s.get("state") == "ready"}
            ready.setdefault(me, {"t": dht_time()})
            left = {p for p, s in progress.items() if s.get("state") == "left"}
            holding = {h.peer for h in holders if (h.version, h.hash) == (base.version, base.hash)}
            expected = {p for p, s in progress.items() if s.get("state") == "training"}
            expected |= (set(base.contributors) & holding) - left
            missing = expected - set(ready)
            first_ready = min(float(s.get("t", 0)) for s in ready.values())
            window_closed = dht_time() - first_ready > r.round_window
            if len(ready) >= r.min_group_size and (not missing or window_closed):
                if settled or window_closed:
                    return sorted(ready)
                settled = True  # look once more after a moment: another peer's records may be on their way
                time.sleep(SETTLE_SECONDS)
                continue
            settled = False
            now = time.monotonic()
            if now - last_note > 10:
                if len(ready) < r.min_group_size and not missing:
                    note = f"waiting for peers: {len(ready)} ready on v{base.version}, the swarm needs {r.min_group_size}"
                else:
                    note = f"waiting for {len(missing)} peer(s) still training on v{base.version} ({len(ready)} ready)"
                self.events.emit("waiting", note, ready=len(ready), training=len(missing))
                last_note = now
            if self.opts.max_wait is not None and now - started > self.opts.max_wait:
                raise WorkError(f"waited {self.opts.max_wait:.0f}s for a group on v{base.version}; giving up (B[v] is kept in the store)")
            time.sleep(0.5)

    def _better_base(self) -> tuple[int, str, list[str]] | None:
        best = self.records.best_base()
        if best is None or not best[2] or (best[0], best[1]) == (self.base.version, self.base.hash):
            return None
        return best if best[0] >= self.base.version else None

    def _newer_base_exists(self, holders=None) -> bool:
        best = self.records.best_base(holders)
        return best is not None and best[0] > self.base.version

    def _await_verdicts(self, redo: int, group: list[str], group_id: str) -> dict[str, dict]:
        deadline = time.monotonic() + self.manifest.round.verify_timeout
        while True:
            verdicts = self.records.verdicts(self.base.version, self.base.hash, redo)
            answered = {p: v for p, v in verdicts.items() if p in group and isinstance(v, dict) and v.get("group_id") == group_id}
            if len(answered) == len(group) or time.monotonic() > deadline:
                return answered
            time.sleep(0.25)

    def _fuse(self, delta: list[torch.Tensor], examples: int) -> str:
        """Average this peer's delta with the group's; 'committed', 'superseded' or 'kept'.

        The matchmaking key carries the base and a redo counter. Only a group that ran an
        all-reduce and could not verify it moves on to the next redo key, all of its members
        together; a peer that found no group simply tries the same key again.
        """
        from coldfusion_p2p.swarm import averager_prefix

        r, f = self.manifest.round, self.manifest.fusion
        names, base = self.names, self.base
        weight = weight_for(self.opts.weighting or f.weighting, examples)
        rule = OuterStep(f.outer_lr)
        redo, failures = 0, 0
        t0 = time.perf_counter()
        while failures < r.max_attempts:
            expected = self._wait_for_group()
            if expected is None:
                return "superseded"
            # a peer that arrives while the group redoes an unverified all-reduce joins it at its redo level
            while self.records.verdicts(base.version, base.hash, redo):
                redo += 1
            t_gather = time.perf_counter() - t0
            self._set_phase("averaging", examples)
            group_prefix = f"{averager_prefix(self.manifest.name)}_r{base.version}_{base.hash[:16]}_x{redo}"
            # no target size: a count of ready peers can be short of the truth, and a leader that
            # reaches it closes the group on a peer that arrives a moment later; gather for the
            # whole matchmaking time instead (every ready peer gets there within about a second)
            self.averager.set_round(group_prefix, target_group_size=None, min_group_size=r.min_group_size)
            with self.averager.get_tensors() as tensors:
                for t, d in zip(tensors, delta):
                    t.copy_(d)
            self.events.emit("averaging", f"round on v{base.version}: averaging with up to {len(expected)} ready peer(s)"
                             + (f", redo {redo}" if redo else ""), redo=redo, expected=len(expected))
            result, t_match, t_allreduce, error = self.averager.run_step(
                weight, {"examples": examples}, timeout=r.verify_timeout + r.matchmaking_time * 4 + 15,
                give_up=self._newer_base_exists, on_allreduce=self._allreduce_started,
            )  # long enough to still be looking when peers that waited out the last verdicts arrive
            if result is None:
                if self._newer_base_exists():
                    return "superseded"
                self.events.emit("retry", f"no group formed on v{base.version} ({error or 'timeout'}); trying again", redo=redo)
                self._set_phase("ready", examples)
                continue
            t1 = time.perf_counter()
            with self.averager.get_tensors() as tensors:
                averaged = [t.clone() for t in tensors]
            check = check_delta(averaged, f.max_delta_norm)
            new_body = rule.apply(base.body, names, averaged) if check.ok else None
            new_hash = M.hash_body(new_body) if check.ok else ""
            clean = bool(result["clean"]) and check.ok
            group, group_id = result["group"], result["group_id"]
            why_unclean = result.get("error") or f"incomplete all-reduce (failed {result['failed_size']} values, banned {len(result['banned'])} sender(s))"
            verdict = {"hash": new_hash, "clean": clean, "group_id": group_id, "reason": check.reason or ("" if result["clean"] else why_unclean)}
            self.records.publish_verdict(base.version, base.hash, redo, verdict)
            answered = self._await_verdicts(redo, group, group_id)
            t_verify = time.perf_counter() - t1
            if clean and all(v.get("clean") and v.get("hash") == new_hash for v in answered.values()):
                self._commit(new_body, new_hash, group, answered, redo, result, check.norm,
                             {"gather_s": t_gather, "matchmaking_s": t_match, "allreduce_s": t_allreduce, "verify_s": t_verify})
                return "committed"
            reasons = sorted({v.get("reason") or ("hash differs" if v.get("hash") != new_hash else "") for v in answered.values()} - {""})
            missing = len(group) - len(answered)
            self.events.emit(
                "unverified",
                f"round on v{base.version} not verified ({'; '.join(reasons) or 'disagreement'}"
                f"{f', {missing} member(s) silent' if missing else ''}); keeping v{base.version}",
                redo=redo, reasons=reasons, missing=missing,
            )
            if not check.ok:
                return "kept"  # a poisoned average: the same deltas would give it again, so keep B[v]
            redo += 1
            failures += 1
            self._set_phase("ready", examples)
        return "kept"

    def _allreduce_started(self) -> None:
        self._metrics["phase"] = "averaging"
        self.events.live("allreduce")
        self._publish_metrics()

    def _commit(self, new_body, new_hash, group, answered, redo, result, norm, timings) -> None:
        t_store = time.perf_counter()
        base = self.base
        stats = {k: round(v, 3) for k, v in timings.items()}
        stats.update({
            "group_size": len(group), "answered": len(answered), "redo": redo, "delta_norm": round(norm, 6),
            "examples": {p: g.get("examples") for p, g in result["gathered"].items() if isinstance(g, dict)},
            # from the start of training to the commit; stored, so that re-published history keeps it
            "round_s": round(time.monotonic() - self._round_started, 3),
        })
        info = VersionInfo(base.version + 1, new_hash, parent=base.hash, contributors=sorted(group),
                           averaged_tensors=list(self.names), round_stats=stats)
        self._set_phase("storing")
        self.store.save(new_body, info)
        stats["store_s"] = round(time.perf_counter() - t_store, 3)
        self._metrics.update(rounds=self._metrics["rounds"] + 1, last_round_seconds=stats["round_s"])
        with contextlib.suppress(Exception):  # the history is a courtesy for `cfp2p status`
            self.records.publish_history(_history_entry(info))
        self.base = Base(info.version, new_hash, new_body, info.contributors)
        self.records.announce_base(self.base.version, self.base.hash, wait=True)
        self.events.emit(
            "committed",
            f"committed v{info.version} ({new_hash[:12]}) with {len(group)} contributor(s): matchmaking {stats['matchmaking_s']:.1f}s, "
            f"all-reduce {stats['allreduce_s']:.1f}s, verify {stats['verify_s']:.1f}s, store {stats['store_s']:.1f}s",
            version=info.version, hash=new_hash, contributors=sorted(group), stats=stats,
        )

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        """Join and contribute; returns the number of rounds this peer committed."""
        opts = self.opts
        data = load_private_data(opts.data, opts.text_column, opts.label_column)  # bad data fails before the network
        device = pick_device(opts.device)
        self._device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.weighting not in (None, "uniform", "examples"):
            raise UserError(f"--weight must be uniform or examples, not {opts.weighting!r}")
        self.events.emit("data", f"data: {len(data.train_texts)} training and {len(data.eval_texts)} held-out examples, {data.num_labels} classes ({', '.join(data.labels[:6])})", train=len(data.train_texts), labels=data.labels)
        self.store = VersionStore(opts.store)
        from coldfusion_p2p.swarm import SwarmRecords, make_averager, quiet_hivemind, start_dht

        quiet_hivemind()
        previous = signal.signal(signal.SIGTERM, _raise_terminate)
        try:
            self.dht = start_dht(opts.initial_peers, opts.host_maddrs, client_mode=False, announce_maddrs=opts.announce_maddrs)
            self.records = SwarmRecords(self.dht)
            self.manifest = self._fetch_manifest(self.records)
            self.records = SwarmRecords(self.dht, self.manifest.name)
            _store_identity(self.store, self.manifest)
            self.events.emit("joined", f"joined swarm {self.manifest.name!r} as {self.records.peer_id[:12]}… (model {self.manifest.model.source}, v0 {self.manifest.model.v0_hash[:12]})", peer=self.records.peer_id, swarm=self.manifest.name)
            model_dir, local_v0 = self._prepare_model()
            self.base = self._initial_base(local_v0)
            self.names = M.averaged_names(self.base.body)
            self._sync()
            self.averager = make_averager(
                self.dht, self.manifest.name, [torch.zeros_like(self.base.body[n], dtype=torch.float32) for n in self.names],
                self.store.root, self.manifest.fusion.compression, self.manifest.round.matchmaking_time,
                self.manifest.round.allreduce_timeout, self.manifest.round.min_group_size, self.manifest.round.chunk_timeout,
            )
            self.records.announce_base(self.base.version, self.base.hash, wait=True)
            heartbeat = threading.Thread(target=self._heartbeat, daemon=True)
            heartbeat.start()
            return self._rounds(data, device, model_dir)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.shutdown()

    def _rounds(self, data: PrivateData, device: torch.device, model_dir: Path) -> int:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        head = self._load_head(data, model_dir)
        trainer = LocalTrainer(tokenizer, data, head, self.manifest.training, self.manifest.tokenizer.max_length, device)
        committed = 0
        while self.opts.rounds is None or committed < self.opts.rounds:
            self._sync()
            base = self.base
            self._round_started = time.monotonic()
            self._metrics.update(step=0, total=0, loss=None, examples_per_second=None)
            self._set_phase("training")
            body = M.load_body_module(model_dir, base.body)
            seed = round_seed(self.manifest.training.seed, base.version, data.name)
            last = [0.0]

            t_train = time.monotonic()
            batch = self.manifest.training.batch_size

            def progress(step, total, loss):
                elapsed = max(time.monotonic() - t_train, 1e-6)
                self._metrics.update(step=step, total=total, loss=loss, examples_per_second=step * batch / elapsed)
                self.events.live("train_step", step=step, total=total, loss=loss, version=base.version)
                if time.monotonic() - last[0] > 5 or step == total:
                    last[0] = time.monotonic()
                    self.events.emit("train_step", f"training on v{base.version}: step {step}/{total}, loss {loss:.4f}", step=step, total=total, loss=loss, version=base.version)

            result = trainer.train(body, seed, progress)
            finetuned = M.body_state(body)
            del body
            self._save_head(head, data)
            if self.opts.keep_finetuned:
                dest = self.store.root / "finetuned"
                dest.mkdir(exist_ok=True)
                M.save_tensors(finetuned, dest / f"from_v{base.version:06d}.safetensors")
            acc = f", held-out accuracy {result.eval_accuracy:.3f}" if result.eval_accuracy is not None else ""
            self.events.emit("trained", f"trained on v{base.version}: {result.steps} steps in {result.seconds:.1f}s, loss {result.loss_first:.4f} -> {result.loss_last:.4f}{acc}", version=base.version, **asdict(result))
            delta = body_delta(base.body, finetuned, self.names)
            if not check_delta(delta, float("inf")).ok:
                raise WorkError("the local delta has NaN/Inf values; not sharing it")
            self._set_phase("ready", result.examples)
            outcome = self._fuse(delta, result.examples)
            if outcome == "committed":
                committed += 1
            elif outcome == "superseded":
                self.events.emit("stale", f"the swarm moved past v{base.version} before this peer's delta was fused; dropping it and syncing")
            self._set_phase("idle")
        self.records.set_progress(self.base.version, self.base.hash, "left", wait=True)  # nobody waits for us now
        self._phase = {"state": "left"}
        self.events.emit("done", f"done: {committed} round(s) committed, newest base v{self.base.version} ({self.base.hash[:12]})", committed=committed, version=self.base.version, hash=self.base.hash)
        return committed

    def _head_paths(self) -> tuple[Path, Path]:
        return self.store.root / "head.safetensors", self.store.root / "head.json"

    def _load_head(self, data: PrivateData, model_dir: Path) -> M.ClassifierHead:
        head = M.new_head(model_dir, data.num_labels)
        weights, meta = self._head_paths()
        if weights.is_file() and meta.is_file():
            try:
                if json.loads(meta.read_text()).get("labels") == data.labels:
                    head.load_state_dict(M.load_tensors(weights))
                    self.log("loaded this contributor's head from the store")
            except (UserError, ValueError, RuntimeError) as e:
                self.log(f"ignoring the stored head ({str(e)[:80]}); starting a new one")
        return head

    def _save_head(self, head: M.ClassifierHead, data: PrivateData) -> None:
        weights, meta = self._head_paths()
        tmp = weights.with_suffix(".tmp")
        M.save_tensors({k: v.detach().cpu() for k, v in head.state_dict().items()}, tmp)
        os.replace(tmp, weights)
        meta.write_text(json.dumps({"labels": data.labels, "data": data.name}))

    def shutdown(self) -> None:
        from coldfusion_p2p.swarm import stop_process

        self._stop_heartbeat.set()
        stop_process(self.averager)
        stop_process(self.dht)
        self.averager = self.dht = None
        self.events.close()
