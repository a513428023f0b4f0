"""A contributor: join a swarm, then round after round finetune the base and fuse it with the peers.

One round on base ``(v, hash)``:

1. sync: if a peer announces a newer base, download it (verified by hash) and start from there;
2. train: finetune body and private head on the local data (``state=training`` is announced);
3. gather: announce ``state=ready`` and wait until every peer still training on the same base is
   ready too, or until the round window closes; alone, wait visibly (min group size);
4. all-reduce the body deltas (heads never leave the peer) in a group keyed by ``(v, hash)``;
5. verify: publish ``(result hash, clean, signature on the certificate)``; commit ``B[v+1]`` when
   this peer's view is clean and enough members sign the same result (``protocol.decide_commit``);
   otherwise redo the all-reduce without the members caught breaking the rules, from the same
   deltas, and after ``max_attempts`` keep ``B[v]``;
6. store ``B[v+1]`` and its certificate atomically and announce it.

Everything read from other peers is parsed and checked first (``records``, ``certs``, ``sync``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
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
from coldfusion_p2p.certs import (
    Certificate, CertChain, check_certificate, peer_id_of_public_key, sign_certificate, signed_by_any, verify_signature,
)
from coldfusion_p2p.fusion import body_delta, check_delta, clip_to_norm, delta_norm, round_bound, slice_digests
from coldfusion_p2p.membership import CLOCK_SLACK, MAX_TOKEN_BYTES, Admission, TokenError, describe, parse_token, token_problem
from coldfusion_p2p.protocol import (NEWCOMER_DEPTH, Absentees, Blamed, CommitDecision, Newcomers, NoShows, RoundView, VerdictView, blame,
                                     decide_commit, newcomers_to_blame, round_start)
from coldfusion_p2p.store import VersionInfo, VersionStore
from coldfusion_p2p.sync import Held, HistorySync
from coldfusion_p2p.training import LocalTrainer, amp_dtype_for, pick_device, round_seed

HEARTBEAT_SECONDS = 4.0
MANIFEST_REFRESH_SECONDS = 12.0  # how soon a new manifest (a revocation) reaches this peer
SERVE_SYNC_SECONDS = 5.0  # how often a second meeting point looks for a newer certified base
ENROLLED_TOKEN, ENROLLED_KEY = "membership.token", "identity.key"  # what enrollment keeps in the store
# a second look before a round starts, for a ready record on its way; short, since a leader holds its group open
# for every peer that any member saw ready (``FusionAverager._start_when_complete``), and gathers 0.5 s at least
SETTLE_SECONDS = 0.25
SLICES_WAIT = 3.0  # seconds a peer that saw another result waits for the group's verdicts and the dissenters' slice digests
VERDICT_POLL_SECONDS = (0.1, 0.5)  # between looks at the group's verdicts: the first, then backing off to the second


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
    precision: str = "auto"  # training on a GPU: auto, fp32, bf16 or fp16 (training.amp_dtype_for)
    weighting: str | None = None  # must match the manifest's rule (kept so that a mismatch is a clear error)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] | None = None
    threads: int | None = None
    keep_finetuned: bool = False  # also store each round's finetuned body (for checks and debugging)
    events: str | None = None  # append JSON lines of progress events to this file
    max_wait: float | None = None  # give up after waiting this long for peers (None: wait forever)
    name: str | None = None  # a display name for `cfp2p status`; public, unlike the data
    authority: str | None = None  # the peer id that must sign the manifest; default: the first initial peer's
    identity: str | None = None  # this peer's key file (created if missing); default: a fresh key each run
    token: str | None = None  # a private swarm's membership token for that key (`cfp2p bootstrap admit`)
    lane_port: int = 0  # TCP port of the all-reduce's direct lane (swarm/lane.py): 0 any free one, -1 none (p2pd only)


Base = Held  # (version, hash, body, contributors): the members who made it are expected in the next round


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


def _history_entry(info: VersionInfo, cert: dict) -> dict:
    stats = info.round_stats or {}
    return {"v": int(info.version), "hash": info.hash, "parent": info.parent or "", "contributors": len(info.contributors),
            "time": float(info.created), "round_s": float(stats.get("round_s") or 0.0), "cert": cert}


def _raise_terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _store_identity(store: VersionStore, manifest: SwarmManifest, authority: str | None) -> None:
    """A store belongs to one swarm history: refuse to mix bases of another model, swarm or authority."""
    path = store.root / "swarm.json"
    mine = {"swarm": manifest.name, "v0_hash": manifest.model.v0_hash, "authority": authority,
            "min_group_size": manifest.round.min_group_size}  # the last one for `cfp2p versions --verify`
    if path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            theirs = None
        if isinstance(theirs, dict) and not {"authority", "min_group_size"} <= set(theirs):  # a store from before certificates
            theirs = {"authority": authority, "min_group_size": manifest.round.min_group_size, **theirs}
            path.write_text(json.dumps(theirs))
        if isinstance(theirs, dict):
            theirs["min_group_size"] = mine["min_group_size"]  # the manifest may change it; the history stays
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
        self._shown: dict | None = None  # the progress record the heartbeat refreshes (see _set_phase)
        self.base: Base | None = None
        self._started = self._round_started = time.monotonic()
        self._dht_mark: dict[str, int] = {}  # DHT load counted up to the last commit (or the first round's start)
        # what `cfp2p status` shows: swarm.metrics_record's fields that change as the peer works
        self._metrics = {"phase": "syncing", "step": 0, "total": 0, "loss": None, "examples_per_second": None,
                         "last_round_seconds": None, "rounds": 0, "lane_missed": None}
        self._device = "cpu"
        self.reach: str | None = None  # direct or client (others cannot dial it): `_reachability`
        self._identity_used: str | None = None
        self._role = "contributor"  # or "mirror": a second meeting point that serves and never trains (serve)
        self.no_shows = NoShows()
        self.absentees = Absentees()  # ready peers a group formed without: not waited for a while (protocol.Absentees)
        self.offenders: dict[str, str] = {}  # peers this peer caught breaking the round's rules -> why
        self.signed_manifest: dict | None = None  # the authority's signed record, re-published by this peer
        self.authority: str | None = None
        self.history: HistorySync | None = None
        self._base_norm: tuple[str, float] | None = None
        self._body_module = None  # the body module of the last round, refilled with each new base (model.refill_body_module)
        self._first_seen: dict[tuple[int, str], dict[str, float]] = {}  # base -> peer -> when its ready record was first seen
        self.newcomers = Newcomers()  # whether groups take peers new to the base's recent history (protocol.Newcomers)
        self.blamed = Blamed()  # known peers this one saw fail a group: left out for a while from the second time (protocol.Blamed)
        self._leaders_refused: tuple[int, set[str]] = (-1, set())  # (round's base version, leaders reported refused in it)
        self.token: dict | None = None  # this peer's membership token (private swarms)
        self.admission = Admission()  # who may take part; open unless the manifest says otherwise
        self._admission_changed = False  # set by the heartbeat, applied to the averager by the main thread
        self._recheck_history = False  # set by the heartbeat on a new revocation: the main thread checks the history again
        self._base_withdrawn = False  # set by the heartbeat: a revocation withdrew a signature our base's history needs
        self._manifest_lock = threading.Lock()
        self._fatal: str | None = None  # why this peer must stop (its membership expired or was revoked)

    # ---------------------------------------------------------------- setup
    def _fetch_manifest(self, records, timeout: float = 30.0) -> SwarmManifest:
        from coldfusion_p2p.swarm import authority_of

        self.authority = authority_of(self.opts.initial_peers, self.opts.authority)
        if self.authority is None:
            raise UserError("cannot tell whose signature the swarm manifest needs: give --initial-peers with a /p2p/ part, or --authority PEER_ID")
        name, serial, data, signed = records.wait_for_manifest(self.opts.swarm, self.authority, timeout)
        self.signed_manifest, self.manifest_serial = signed, serial
        return SwarmManifest.from_dict(data, where=f"swarm manifest {name!r} from the DHT")

    def _fetch(self, peer: str, name: str, dest: Path, max_bytes: int, timeout: float = 120.0, on_bytes=None) -> None:
        from coldfusion_p2p.swarm import fetch_blob

        fetch_blob(self.dht, self.manifest.name, peer, name, dest, timeout=timeout, max_bytes=max_bytes, on_bytes=on_bytes,
                   token=self.token)

    # ---------------------------------------------------------------- membership (private swarms)
    def _credentials(self, authority: str | None) -> tuple[str | None, dict | None]:
        """(identity file, token): ``--identity``/``--token``, or what an earlier enrollment saved in the store."""
        from coldfusion_p2p.identity import load_identity

        opts = self.opts
        identity, token_path = opts.identity, opts.token
        saved = self.store.root / ENROLLED_TOKEN
        if token_path is None and saved.is_file():
            token_path, identity = str(saved), identity or str(self.store.root / ENROLLED_KEY)
        if token_path is None:
            return identity, None
        if identity is None:
            raise UserError("--token needs the identity key it was issued for: add --identity KEY")
        try:
            token = parse_token(Path(token_path).read_text()[:MAX_TOKEN_BYTES + 1])
        except OSError as e:
            raise UserError(f"cannot read the membership token {token_path}: {e.strerror}") from None
        except TokenError as e:
            raise UserError(f"{token_path}: {e}") from None
        if not os.path.isfile(identity):
            raise UserError(f"identity key {identity} not found: a token works only with the key it was issued for")
        me = peer_id_of_public_key(load_identity(identity).public_key.encode())
        why = token_problem(token, token["swarm"], authority or "", time.time(), peer=me)
        if why is not None and "expired" in why and token_path == str(saved):
            return identity, None  # an enrolled token: ask for a fresh one
        if why is not None:
            hint = ("; ask the swarm's lab for a new one (`cfp2p bootstrap admit`) and rejoin with --token" if "expired" in why
                    else "; check --initial-peers (its first address must be the swarm's bootstrap peer)" if "authority" in why else "")
            raise UserError(f"membership token {token_path}: {why}{hint}")
        if opts.swarm and token["swarm"] != opts.swarm:
            raise UserError(f"membership token {token_path} is for swarm {token['swarm']!r}, not {opts.swarm!r}")
        return identity, token

    def _start_dht(self, identity: str | None, client_mode: bool = False):
        """The DHT node; in a private swarm it carries this peer's token, and a peer without one asks the
        authority to enroll it (``admission = "enroll"``), or is told how to get one."""
        from coldfusion_p2p.identity import load_identity, new_identity_file
        from coldfusion_p2p.swarm import start_dht
        from coldfusion_p2p.swarm.gate import RefusalLog, ask_to_enroll

        opts = self.opts
        refusals = RefusalLog(f"[{opts.name}] " if opts.name else "")

        def start(identity, token):
            admission = Admission("members", token["swarm"], self.authority, frozenset()) if token else None
            self._identity_used = identity
            return start_dht(opts.initial_peers, opts.host_maddrs, identity_path=identity, client_mode=client_mode,
                             announce_maddrs=opts.announce_maddrs, token=token, admission=admission, refusals=refusals)

        try:
            return start(identity, self.token)
        except WorkError as refused:
            if self.token is not None or self.authority is None:
                raise
            first = refused
        # no answer: perhaps a private swarm that refuses nodes without a token; its authority says which
        identity = identity or str(self.store.root / ENROLLED_KEY)
        if not os.path.isfile(identity):
            new_identity_file(identity)
        key = load_identity(identity)
        try:
            answer = ask_to_enroll(opts.initial_peers, identity, self.authority, opts.name, key.public_key)
        except ConnectionError:
            raise first from None
        if not isinstance(answer.get("token"), dict):
            if isinstance(answer.get("refused"), str):
                raise UserError(f"the swarm's authority did not admit this peer: {answer['refused'][:300]}")
            raise first
        token = answer["token"]
        why = token_problem(token, str(token.get("swarm")), self.authority, time.time(), peer=peer_id_of_public_key(key.public_key.encode()))
        if why is not None:
            raise WorkError(f"the swarm's authority sent an unusable membership token ({why})")
        path = self.store.root / ENROLLED_TOKEN
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(token, indent=1, sort_keys=True))
        self.token = token
        self.log(f"enrolled in swarm {token['swarm']!r} as {describe(token)}; the token is kept in {path}")
        return start(identity, token)

    def _reachability(self) -> str:
        """Ask an initial peer to dial this one back; when it cannot, restart the DHT as a client (it then
        needs no incoming connection) and say so. Returns the ``reach`` shown by `cfp2p status`."""
        from coldfusion_p2p.swarm import peer_of_maddr, visible_maddrs
        from coldfusion_p2p.swarm.reach import UNREACHABLE, check_reachable, listen_port

        peers = [p for p in dict.fromkeys(peer_of_maddr(m) for m in self.opts.initial_peers) if p]
        port = listen_port(list(self.opts.announce_maddrs or []) or visible_maddrs(self.dht))
        if not peers or port is None:
            return "direct"
        answer, by = check_reachable(self.dht, peers, port)
        if answer != UNREACHABLE:
            return "direct"  # reachable, or unknown (an older peer): the old behaviour
        where = ", ".join(self.opts.announce_maddrs or []) or f"TCP port {port}"
        if self._role == "mirror":
            raise UserError(f"other peers cannot dial this meeting point at {where} (peer {by[:12]} tried): forward the port "
                            "to this machine and pass --announce-maddrs with its public address")
        self.log(f"other peers cannot dial this peer at {where} (peer {by[:12]} tried): it takes part as a client "
                 "(sends its delta, reduces no part, serves no files)")
        self.log(f"to take a full part, forward TCP port {port} on your router to this machine and pass "
                 f"--host-maddrs /ip4/0.0.0.0/tcp/{port} --announce-maddrs /ip4/<public ip>/tcp/{port}")
        from coldfusion_p2p.swarm import stop_process

        stop_process(self.dht)
        self.dht = self._start_dht(self._identity_used, client_mode=True)
        return "client"

    def _servers(self) -> dict:
        """Announced holders of bases that can serve them: a peer whose metrics say it is a client cannot
        be dialled (its averager serves nothing), so downloads do not spend their tries on it."""
        announced = self.records.announced()
        try:
            clients = {p for p, m in self.records.metrics().items() if m.reach == "client"}
        except Exception:  # noqa: BLE001 - metrics are a hint: without them, try every holder
            clients = set()
        return {p: key for p, key in announced.items() if p not in clients}

    def _apply_admission(self, manifest: SwarmManifest) -> None:
        """Take the manifest's admission mode and revocation list (the heartbeat calls this on each new serial)."""
        a = manifest.admission
        revoked, until = frozenset(a.revoked), dict(a.signed_until)
        first = not self.admission.private and a.mode != "open"
        if first:
            self.admission = Admission(a.mode, manifest.name, self.authority, revoked, until)
            self._admission_changed = True
        if self.admission.private and (first or revoked != self.admission.revoked or until != self.admission.signed_until):
            self.admission.signed_until = until  # before the revocation itself: a signature never counts by mistake
            self.admission.revoked = revoked
            self._admission_changed = True
            self._recheck_history = True
            try:
                if self.history is not None and self.base is not None and not self._still_certified(self.base):
                    self._base_withdrawn = True  # leave the round on it now; the main thread falls back
            except Exception as e:  # noqa: BLE001 - the main thread checks the whole history again anyway
                self.log(f"could not check this peer's base against the new revocations ({type(e).__name__}); checking before the next round")
            from coldfusion_p2p.swarm.gate import push_revoked

            with self.records._lock:  # the DHT node refuses revoked peers' calls and answers from now on
                push_revoked(self.dht, sorted(revoked))
        self.records.revoked = revoked
        if self.records.peer_id in revoked:
            self._fatal = ("the swarm's authority revoked this peer's membership; it can no longer take part "
                           "(ask the swarm's lab why, and for a new token if it was a mistake)")

    def _check_standing(self) -> None:
        """Stop with one line when this peer may no longer take part; push admission changes to the averager."""
        if self.token is not None and self.token["expires"] + CLOCK_SLACK < time.time():
            self._fatal = (f"this peer's membership token expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.token['expires']))}; "
                           "ask the swarm's lab for a new one (`cfp2p bootstrap admit`) and rejoin with --token"
                           if self.opts.token else "this peer's enrollment expired; rejoin to enroll again")
        if self._fatal:
            raise UserError(self._fatal)
        if self._admission_changed and self.averager is not None:
            self._admission_changed = False
            self.averager.set_admission(self.admission.state(), f"[{self.opts.name}] " if self.opts.name else "")
        if self._recheck_history and self.history is not None and self.base is not None:
            self._recheck_history = False
            self._drop_withdrawn_versions()

    def _still_certified(self, base) -> bool:
        """Whether ``base``'s history still checks out under the current revocations (any thread; reads only)."""
        return (base.version, base.hash) not in self.history.chain.recheck(suspect=signed_by_any(self.admission.revoked), dry_run=True)

    def _drop_withdrawn_versions(self) -> None:
        """A revocation withdrew signatures: versions that needed them are no longer certified, for any peer.
        Our own such versions go to ``retired/`` and this peer falls back to its newest version that is
        still certified, then syncs with the swarm like the loser of a fork (main thread only)."""
        dropped = self.history.chain.recheck(suspect=signed_by_any(self.admission.revoked))
        self._base_withdrawn = False
        key = (self.base.version, self.base.hash)
        if key not in dropped and key[0] > 0 and not self.history.chain.accepts(*key):
            self.log(f"v{key[0]} ({key[1][:12]}) waits for the version a revocation's line names; this peer keeps it "
                     "and takes that version when it syncs")
        if not dropped:
            return
        self.log(f"a revocation withdrew signatures that {len(dropped)} version(s) this peer accepted needed "
                 f"(v{dropped[0][0]}{f' to v{dropped[-1][0]}' if len(dropped) > 1 else ''}); they are no longer certified")
        if key not in dropped:  # still certified (or waiting for a line ahead of us)
            return
        held = self.history.latest_local()
        if held is None:
            raise WorkError("a revocation left this peer's store with no certified version to go back to")
        for info in self.store.list():
            if info.version > held.version:
                self.log(f"retired our v{info.version} ({info.hash[:12]}), no longer certified, to {self.store.retire(info.version)}")
        self.store.retire_certificates_from(held.version + 1)
        self.events.emit("fork", f"v{self.base.version} ({self.base.hash[:12]}) lost its certificate to a revocation; "
                                 f"back to v{held.version} ({held.hash[:12]}), then syncing", version=held.version, hash=held.hash)
        self.base = held
        self.records.announce_base(held.version, held.hash)

    def _download_verified(self, name: str, dest: Path, check: Callable[[Path], str | None], holders: list[str]) -> None:
        """Fetch ``name`` from the first holder whose bytes pass ``check`` (None = good, else a reason)."""
        from coldfusion_p2p.swarm import BlobError

        problems = []
        self._metrics["phase"] = "syncing"
        for peer in [p for _ in range(3) for p in holders]:  # a transfer can fail on a busy peer: three tries each
            tmp = dest.with_name(f".part-{dest.name}-{os.getpid()}")
            try:
                self._fetch(peer, name, tmp, max_bytes=4 << 30,
                            on_bytes=lambda done, total: self.events.live("download_bytes", name=name, done=done, total=total))
                reason = check(tmp)
                if reason is None:
                    os.replace(tmp, dest)
                    return
                problems.append(f"{peer[:12]}: {reason}")
                self.log(f"holder {peer[:12]} served a bad {name} ({reason}); trying another")
            except BlobError as e:
                problems.append(str(e))
                time.sleep(0.5)
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
        # the bootstrap peer serves the model files first: the authority is the one peer we already trust a little
        holders = sorted(set(self._servers()) - {self.records.peer_id}, key=lambda p: (p != self.authority, p))
        self.events.emit("download", f"downloading the model files from {len(holders)} peer(s)", what="model")
        from coldfusion_p2p.swarm import sha256_file

        for name, digest in wanted.items():
            self._download_verified(
                f"model/{name}", store.model_dir / name,
                lambda p, d=digest: None if sha256_file(p) == d else "sha256 mismatch", holders,
            )
        return store.model_dir, None

    def _initial_base(self, local_v0: M.BodyState | None) -> Base:
        found = self.history.latest_local()
        if found is not None:
            self.events.emit("resume", f"resuming from v{found.version} ({found.hash[:12]}) in {self.store.root}", version=found.version)
            return found
        if local_v0 is not None:
            self.store.save(local_v0, VersionInfo(0, self.manifest.model.v0_hash, parent=None))
            return Base(0, self.manifest.model.v0_hash, local_v0)
        deadline = time.monotonic() + 60.0
        while True:  # no base at all yet: take the best certified one that a holder serves correctly
            choice = self.history.look(None)
            if choice is not None and choice.holders:
                self.events.emit("download", f"downloading base v{choice.version} ({choice.hash[:12]}) from {len(choice.holders)} holder(s)",
                                 what="base", version=choice.version)
                try:
                    got = self.history.acquire(choice, None, on_bytes=self._download_progress(f"version/{choice.version}"))
                except Exception as e:  # noqa: BLE001 - what a holder sent is no reason to stop: try again
                    self.log(f"download of v{choice.version} failed ({type(e).__name__}: {str(e)[:80]})")
                    self.history.skip.add((choice.version, choice.hash), f"{type(e).__name__}")
                    got = None
                if got is not None:
                    return got
            if time.monotonic() > deadline:
                raise WorkError("no peer served a certified base within 60s, and this peer has no local copy of the model; pass --model")
            time.sleep(2.0)

    def _download_progress(self, name: str):
        return lambda done, total: self.events.live("download_bytes", name=name, done=done, total=total)

    def _sync(self) -> bool:
        """Move to the base the fork rule picks over certified versions, if it is not ours; True when moved."""
        try:
            choice = self.history.look((self.base.version, self.base.hash))
        except Exception as e:  # noqa: BLE001 - nothing another peer announces may stop this one
            self.log(f"could not look for newer bases ({type(e).__name__}: {str(e)[:80]}); staying on v{self.base.version}")
            return False
        if choice is None:
            return False
        self._set_phase("syncing")
        if choice.version == self.base.version:
            self.events.emit("fork", f"the swarm settled on another v{choice.version} ({choice.hash[:12]}, {choice.signers} signer(s)) "
                             f"than ours ({self.base.hash[:12]}); switching")
        self.events.emit("download", f"downloading base v{choice.version} ({choice.hash[:12]}) from {len(choice.holders)} holder(s)",
                         what="base", version=choice.version)
        try:
            got = self.history.acquire(choice, self.base, on_bytes=self._download_progress(f"version/{choice.version}"))
        except Exception as e:  # noqa: BLE001 - what a holder sent is no reason to stop: stay where we are
            self.log(f"download of v{choice.version} failed ({type(e).__name__}: {str(e)[:80]}); staying on v{self.base.version}")
            self.history.skip.add((choice.version, choice.hash), f"{type(e).__name__}")
            got = None
        if got is None:
            return False
        self.base = got
        self.no_shows.seen(got.contributors)
        self.absentees.seen(got.contributors)
        self.records.announce_base(self.base.version, self.base.hash)
        self.events.emit("synced", f"synced to v{self.base.version} ({self.base.hash[:12]})", version=self.base.version, hash=self.base.hash)
        return True

    # ---------------------------------------------------------------- heartbeat
    _PUBLIC_PHASE = {"training": "training", "ready": "matchmaking", "averaging": "matchmaking", "storing": "averaging", "idle": "idle"}

    def _set_phase(self, state: str, examples: int = 0, redo: int = 0) -> None:
        from coldfusion_p2p.swarm import dht_time

        # "since" stays fixed while the heartbeat refreshes the record: the round window counts from it
        self._phase = {"state": state, "examples": examples, "version": self.base.version, "hash": self.base.hash, "since": dht_time(),
                       "redo": redo}
        if state in ("training", "ready"):
            self.records.set_progress(self.base.version, self.base.hash, state, examples, since=self._phase["since"], redo=redo)
        # the progress record the others see: "ready" stays true while this peer averages, and the heartbeat
        # keeps it alive then too (its one store is not waited for: if it was lost, the others would wait for
        # this peer's "training" record to expire while it looked for them in a group)
        self._shown = dict(self._phase) if state in ("training", "ready") else self._shown if state == "averaging" else None
        self._metrics["phase"] = self._PUBLIC_PHASE.get(state, self._metrics["phase"])
        self._publish_metrics()
        self.events.emit("phase", None, state=state, version=self.base.version)

    def _level_above(self, redo: int, expected: list[str]) -> int:
        """The highest matchmaking level above ``redo`` that a ready peer this round waits for looks at (its progress
        record), or 0. Asked between steps, and every couple of seconds while matchmaking (``run_step``'s give_up):
        waiting out a step at a key the others have left cost 42 s a time in the tests' settings."""
        base, me, top = self.base, self.records.peer_id, self._top_level()
        try:
            progress = self.records.progress(base.version, base.hash)
        except Exception:  # noqa: BLE001 - a look that failed is no reason to leave the step; the next look may do
            return 0
        waits_for = set(expected)
        return max([0] + [s.redo for p, s in progress.items() if p != me and p in waits_for and p not in self.offenders
                          and s.state == "ready" and redo < s.redo <= top])

    def _top_level(self) -> int:
        """The highest matchmaking level of a round: every peer's level stays at or below it, so that a peer that missed
        its group can always follow the others (a level past it was followed by no one: the stall came back there)."""
        return 2 * self.manifest.round.max_attempts - 1

    def _show_level(self, redo: int) -> None:
        """Say at once in this peer's ready record the matchmaking level it now looks at (``_fuse``)."""
        shown = self._shown
        if shown is None or shown.get("state") != "ready" or shown.get("redo", 0) == redo:
            return
        self._shown = {**shown, "redo": redo}
        self.records.set_progress(shown["version"], shown["hash"], "ready", shown["examples"], since=shown["since"], redo=redo)

    def _publish_metrics(self) -> None:
        from coldfusion_p2p.swarm import metrics_record

        if self.records is None or self.base is None:
            return
        try:
            self.records.publish_metrics(metrics_record(
                swarm=self.manifest.name, peer=self.records.peer_id, role=self._role, name=self.opts.name,
                version=self.base.version, hash=self.base.hash, device=self._device,
                uptime=time.monotonic() - self._started, reach=self.reach, **self._metrics,
            ))
        except Exception:  # noqa: BLE001 - metrics are best effort; the next heartbeat tries again
            pass

    def _publish_history(self) -> None:
        """Re-publish the newest versions of this store for `cfp2p status` (they expire otherwise)."""
        entries = []
        for info in self.store.list()[-10:]:
            cert = self.history.chain.certificate(info.version, info.hash)
            if cert is not None and info.parent == cert.parent:
                entries.append(_history_entry(info, cert.to_dict()))
        if entries:
            self.records.publish_history(entries)

    def _refresh_manifest(self, publish: bool = True) -> None:
        """Keep the newest manifest the authority signed, and re-publish it (it outlives the bootstrap peer)."""
        with self._manifest_lock:  # the heartbeat and the main thread (before each round) both look
            self._refresh_manifest_locked(publish)

    def _refresh_manifest_locked(self, publish: bool) -> None:
        found = self.records.manifests(self.authority).get(self.manifest.name)
        if found is not None and found[0] > self.manifest_serial:
            self.manifest_serial, self.signed_manifest = found[0], found[2]
            try:
                newer = SwarmManifest.from_dict(found[1], where="the swarm's new manifest")
                before = len(self.admission.revoked)
                self._apply_admission(newer)
                revoked = len(self.admission.revoked) - before
            except UserError:
                revoked = 0
            self.log(f"the swarm's authority published manifest serial {found[0]}"
                     + (f" ({revoked} more revoked peer(s), cut from the next round)" if revoked > 0 else "")
                     + "; this peer re-publishes it (restart to apply other new settings)")
        if publish:
            self.records.publish_manifest(self.signed_manifest)

    def _heartbeat(self) -> None:
        last_manifest = last_history = 0.0
        history_of = None  # the base whose history was published last
        while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
            try:
                base, phase = self.base, dict(self._phase)
                if base is not None:
                    self.records.announce_base(base.version, base.hash)
                shown = self._shown
                if shown is not None:
                    self.records.set_progress(shown["version"], shown["hash"], shown["state"], shown["examples"], since=shown["since"],
                                              redo=shown.get("redo", 0))
                if phase.get("state") != "left":
                    self._publish_metrics()
                if time.monotonic() - last_manifest > MANIFEST_REFRESH_SECONDS:
                    self._refresh_manifest()
                    last_manifest = time.monotonic()
                # a new base's certificate is published at once: the bootstrap peer draws a revocation's line at
                # the head of the history it follows, so a slow publication would cost the swarm those versions
                key = (base.version, base.hash) if base is not None else None
                if time.monotonic() - last_history > 60 or key != history_of:
                    self._publish_history()
                    history_of = key
                    if time.monotonic() - last_history > 60:
                        if self.token is not None:
                            self.records.publish_membership(self.token)
                        last_history = time.monotonic()
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried on the next beat
                pass

    # ---------------------------------------------------------------- the round
    def _wait_for_group(self) -> list[str] | None:
        """Wait until this base's round can start (``protocol.round_start``); the ready peers, or None
        if a newer certified base appeared."""
        from coldfusion_p2p.swarm import dht_time

        r, base, me = self.manifest.round, self.base, self.records.peer_id
        started, last_note, settled, last_look = time.monotonic(), 0.0, False, 0.0
        my_ready = self._phase.get("since", dht_time())
        first_seen = self._first_seen.setdefault((base.version, base.hash), {})
        if len(self._first_seen) > 4:
            self._first_seen = {(base.version, base.hash): first_seen}
        while True:
            if self._fatal:
                raise UserError(self._fatal)
            if self._base_withdrawn:
                return None
            if time.monotonic() - last_look > 2.0:
                last_look = time.monotonic()
                if self._newer_base_exists():
                    return None
            announced = self.records.announced()
            progress = self.records.progress(base.version, base.hash)
            ready = {p: s.t for p, s in progress.items() if s.state == "ready"}
            now_dht = dht_time()
            for p in ready:
                first_seen.setdefault(p, now_dht)
            self.no_shows.seen(ready)
            view = RoundView(
                me=me, now=dht_time(), my_ready_t=my_ready, ready=ready,
                training=frozenset(p for p, s in progress.items() if s.state == "training"),
                left=frozenset(p for p, s in progress.items() if s.state == "left"),
                holding=frozenset(p for p, key in announced.items() if key == (base.version, base.hash)),
                contributors=frozenset(base.contributors) - {me}, no_shows=frozenset(self.no_shows.peers), first_seen=first_seen,
            )
            start = round_start(view, r.min_group_size, r.round_window)
            if start.start:
                if settled or start.window_closed:
                    self.no_shows.after_window(start)
                    return list(start.ready)
                settled = True  # look once more after a moment: another peer's records may be on their way
                time.sleep(SETTLE_SECONDS)
                continue
            settled = False
            now = time.monotonic()
            if now - last_note > 10:
                if len(start.ready) < r.min_group_size and not start.missing:
                    note = f"waiting for peers: {len(start.ready)} ready on v{base.version}, the swarm needs {r.min_group_size}"
                else:
                    note = f"waiting for {len(start.missing)} peer(s) still training on v{base.version} ({len(start.ready)} ready)"
                self.events.emit("waiting", note, ready=len(start.ready), training=len(start.missing))
                last_note = now
            if self.opts.max_wait is not None and now - started > self.opts.max_wait:
                raise WorkError(f"waited {self.opts.max_wait:.0f}s for a group on v{base.version}; giving up (B[v] is kept in the store)")
            time.sleep(0.5)

    def _newer_base_exists(self) -> bool:
        try:
            return self.history.newer_exists((self.base.version, self.base.hash))
        except Exception as e:  # noqa: BLE001 - a look that failed is no reason to leave the round
            self.log(f"could not look for newer bases ({type(e).__name__}: {str(e)[:80]})")
            return False

    def _round_rules(self) -> tuple[float, dict]:
        """This base's bound on a round's delta, and the rules every reducer enforces on members."""
        f, t = self.manifest.fusion, self.manifest.training
        if self._base_norm is None or self._base_norm[0] != self.base.hash:
            self._base_norm = (self.base.hash, delta_norm([self.base.body[n].float() for n in self.names]))
        bound = round_bound(self._base_norm[1], f.max_delta_ratio)
        lo, hi = self.strategy.weight_limits(t.examples_per_round)
        return bound, {"min_weight": lo, "max_weight": hi, "part_bound": bound * 1.0001, "strategy": self.strategy}

    def _await_verdicts(self, redo: int, group: list[str], group_id: str, cert: Certificate, result: str, clean: bool) -> tuple[CommitDecision, Certificate]:
        """Collect the group's verdicts until ``decide_commit`` says commit or redo (or verify_timeout passes).

        A verdict counts as agreeing only with a valid signature on our certificate: the certificate
        that is stored is made of exactly those signatures."""
        me = self.records.peer_id
        deadline = time.monotonic() + self.manifest.round.verify_timeout
        payload = cert.payload()
        pause = VERDICT_POLL_SECONDS[0]
        while True:
            views, signed = {}, cert
            for peer, v in self.records.verdicts(self.base.version, self.base.hash).items():
                if peer == me or peer not in group or v.redo != redo or v.group_id != group_id:
                    continue
                good = v.clean and v.result == result and self._signature_ok(peer, v.signature, payload)
                views[peer] = VerdictView(v.result, good)
                if good:
                    signed = signed.with_signature(peer, self.records.public_keys[peer], v.signature)
            decision = decide_commit(me, result, clean, group, views, self.manifest.round.min_group_size,
                                     timed_out=time.monotonic() > deadline)
            if decision.action != "wait":
                return decision, signed
            time.sleep(pause)
            pause = min(pause * 1.5, VERDICT_POLL_SECONDS[1])  # a member that has not answered in a second or two is slow

    def _blame(self, redo: int, group: list[str], group_id: str, mine: dict[str, str], result: str,
               decision: CommitDecision) -> tuple[set[str], set[str]]:
        """Whom to leave out of this round's redos, from the members' slice digests (``protocol.blame``), and
        who stayed silent.

        ``decide_commit`` answers at the first dissent, before every verdict is in; a majority counted then,
        or the members not heard from yet, would leave out honest members. So this waits up to SLICES_WAIT
        seconds for every member's verdict and every clean dissenter's digests (each member publishes them
        right after its verdict), then judges on what it has."""
        me, deadline = self.records.peer_id, time.monotonic() + SLICES_WAIT
        v, h, others = self.base.version, self.base.hash, set(group) - {me}
        while True:
            verdicts = {p: rec for p, rec in self.records.verdicts(v, h).items()
                        if p in others and rec.redo == redo and rec.group_id == group_id}
            slices = {p: {s.reducer: s.digest for s in rec.slices} for p, rec in self.records.slices(v, h).items()
                      if p in others and rec.redo == redo and rec.group_id == group_id}
            agree = {p for p, rec in verdicts.items() if rec.clean and rec.result == result}
            dissent = (set(verdicts) - agree) | set(decision.dissent)
            waiting = (others - set(verdicts)) | {p for p in dissent if p in verdicts and verdicts[p].clean and p not in slices}
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        out = blame(me, mine, sorted(dissent), slices, agree - dissent)
        kept = dissent - out  # members that saw another result because a reducer lied to them, not by their fault
        for reducer in sorted(out & set(mine)) if kept else ():
            self.events.emit("slice", f"peer {reducer[:12]}'s slice of the average differed between members; leaving it out of this "
                             f"round's redos, and keeping {len(kept)} member(s) it sent other averages", peer=reducer, kept=len(kept))
        return out, others - set(verdicts) - dissent

    def _report_refused_leaders(self, version: int) -> None:
        """Say once a round each matchmaking leader this peer's averager stopped following, and why (a ready peer
        that held it, sent it round, answered with a group that was not its own...): hivemind's log, where the
        averager says it, is hidden from ``cfp2p`` commands."""
        try:
            refused = self.averager.refused_leaders()
        except Exception:  # noqa: BLE001 - no answer from the averager: its next step says what became of it
            return
        if self._leaders_refused[0] != version:
            self._leaders_refused = (version, set())
        for peer, why in sorted(refused.items()):
            if peer not in self._leaders_refused[1]:
                self._leaders_refused[1].add(peer)
                self.events.emit("leader_refused", f"not following peer {peer[:12]} as a matchmaking leader again this round: {why}",
                                 peer=peer, reason=why)

    def _signature_ok(self, peer: str, signature: str, payload: bytes) -> bool:
        key = self.records.public_keys.get(peer)  # the verdict's owner key: its hash is ``peer``
        return key is not None and bool(signature) and verify_signature(key, payload, signature)

    def _contribution(self, delta: list[torch.Tensor], examples: int, bound: float) -> tuple[float, list[torch.Tensor]]:
        """What this peer shares: its weight by the manifest's rule, and its delta within the round's bound
        (every reducer bans a longer part, so an honest peer scales its own down first)."""
        weight = self.strategy.weight(examples, self.manifest.training.examples_per_round)
        delta, norm, clipped = clip_to_norm(delta, bound)
        if clipped:
            self.log(f"this peer's delta (norm {norm:.4g}) is longer than the round's bound {bound:.4g}: scaled down to it")
        return weight, delta

    def _fuse(self, delta: list[torch.Tensor], examples: int) -> str:
        """Average this peer's delta with the group's; 'committed', 'superseded' or 'kept'.

        The matchmaking key carries the base and a redo counter. Only a group that ran an
        all-reduce and could not verify it moves on to the next redo key, all of its members
        together; a peer that found no group simply tries the same key again.
        """
        from coldfusion_p2p.swarm import averager_prefix
        from coldfusion_p2p.swarm.averager import MAX_GROUP

        r = self.manifest.round
        names, base, me = self.names, self.base, self.records.peer_id
        bound, rules = self._round_rules()
        weight, delta = self._contribution(delta, examples, bound)
        redo, failures = 0, 0
        suspects: set[str] = set()  # members this peer saw fail it in this round: left out of its redos
        # the peers that made this base's line lately: a group's members that are not among them are newcomers
        known = self.history.chain.recent_signers(base.version, base.hash, NEWCOMER_DEPTH) - {me}
        mates: set[str] = set()  # members of this round's groups that no check named: their verdicts' levels count
        told_left_out = False
        if self.admission.private:  # a revocation published since the last heartbeat applies to this round already
            try:
                self._refresh_manifest(publish=False)
            except Exception as e:  # noqa: BLE001 - the heartbeat looks again within seconds
                self.log(f"could not read the swarm's manifest before the round ({type(e).__name__}); going on")
        t0 = time.perf_counter()
        while failures < r.max_attempts:
            self._check_standing()
            if self.base is not base or self._base_withdrawn:
                return "withdrawn"
            expected = self._wait_for_group()
            if expected is None:
                return "withdrawn" if self._base_withdrawn else "superseded"
            # ready peers a group formed without lately: not waited for, their levels not followed (they may still join)
            expected = [p for p in expected if p == me or self.absentees.waited_for(p, base.version)]
            # after a newcomer spoiled a group: newcomers are not waited for, taken in as a leader, or followed (their
            # levels neither), where the known ready peers can form a group without them (protocol.Newcomers)
            # and known peers that failed groups twice lately (protocol.Blamed)
            newcomers = sorted((set(expected) - known - {me}) if not self.newcomers.admitted(base.version) else ())
            left_out = newcomers + sorted(p for p in expected if p in known and self.blamed.left_out(p, base.version))
            if left_out and len(expected) - len(left_out) >= r.min_group_size:
                expected = [p for p in expected if p not in left_out]
                if newcomers and not told_left_out:
                    told_left_out = True
                    self.events.emit("newcomers", f"leaving out {len(newcomers)} ready peer(s) new to the swarm's recent history on "
                                     f"v{base.version}: a group with a newcomer failed lately; newcomers are taken again from "
                                     f"v{self.newcomers.until + 1}", peers=newcomers[:64], until=self.newcomers.until, why="left out")
            else:
                left_out = []
            # a peer that arrives while the group redoes an unverified all-reduce joins it at its redo level
            # (only the levels of peers known to be real: the base's line's recent makers and this round's group
            # mates that no check named, so that verdicts from made-up identities cannot steer it to an empty key)
            top = self._top_level()
            levels = [min(v.redo + 1, top) for p, v in self.records.verdicts(base.version, base.hash).items()
                      if p != me and (p in known or p in mates) and v.redo <= top]
            # and at the level each ready peer it waits for looks for its group at (its progress record): a member
            # that never learnt it was in a group (a leader's answer lost on the way) found "no group", and so
            # stayed at the old key while the others redid at the next one, each side waiting for the other until
            # the round was given up (CI saw a three-peer round stall so). Levels only rise: all meet at the highest
            redo = max([redo, self._level_above(redo, expected)] + levels)
            self._show_level(redo)
            t_gather = time.perf_counter() - t0
            self._set_phase("averaging", examples)
            group_prefix = f"{averager_prefix(self.manifest.name)}_r{base.version}_{base.hash[:16]}_x{redo}"
            # no target size (a count of ready peers can be short of the truth): the leader begins once its
            # group holds every peer that any member's round waits for, else at the end of the matchmaking time
            excluded = set(self.offenders) | suspects
            if suspects and len(set(expected) - excluded) < r.min_group_size:
                # without them no group can form: leaving them out would only cost a step (max_attempts bounds a redo)
                self.log(f"not leaving out {len(suspects)} suspect member(s) on redo {redo}: without them fewer than "
                         f"{r.min_group_size} ready peers remain")
                excluded = set(self.offenders)
            expect = sorted(set(expected) - excluded)
            expect = expect if len(expect) <= MAX_GROUP else []  # a view a group cannot hold: the whole time
            self.averager.set_round(group_prefix, target_group_size=None, min_group_size=r.min_group_size,
                                    rules=rules, excluded=sorted(excluded), expect=expect, left_out=left_out,
                                    known=sorted(known))
            with self.averager.get_tensors() as tensors:
                for t, d in zip(tensors, delta):
                    t.copy_(d)
            self.events.emit("averaging", f"round on v{base.version}: averaging with up to {len(expected)} ready peer(s)"
                             + (f", redo {redo}" if redo else ""), redo=redo, expected=len(expected))
            # a group forms within the matchmaking time, and a leader's answer within a request's timeout: only past both
            # does a peer look at the others' levels (a move while its leader begins would cost the group an attempt)
            looking_since, look_after = time.monotonic(), r.matchmaking_time + min(3.0, r.matchmaking_time / 2) + 1.0
            result, t_match, t_allreduce, error = self.averager.run_step(
                weight, {"examples": examples, "expect": expect, "left_out": left_out[:MAX_GROUP],
                         **({"token": self.token} if self.token else {})}, timeout=r.verify_timeout + r.matchmaking_time * 4 + 15,
                give_up=lambda: self._fatal is not None or self._base_withdrawn or self._newer_base_exists()
                or (time.monotonic() - looking_since > look_after and self._level_above(redo, expected) > 0),
                on_allreduce=self._allreduce_started,
            )  # long enough to still be looking when peers that waited out the last verdicts arrive
            self._report_refused_leaders(base.version)
            if result is None:
                if self._base_withdrawn:
                    return "withdrawn"
                if self._newer_base_exists():
                    return "superseded"
                above = self._level_above(redo, expected)
                if above:
                    self.events.emit("retry", f"ready peers of v{base.version} look for their group at redo {above}: moving there", redo=above,
                                     moved_up=True)
                else:
                    self.events.emit("retry", f"no group formed on v{base.version} ({error or 'timeout'}); trying again", redo=redo)
                    suspects.clear()  # the survivors of a failed all-reduce may suspect each other: start afresh
                    # (not on a move: a level claimed mid-step must not bring back a member that just failed the group)
                self._set_phase("ready", examples, redo)
                continue
            gone = self.absentees.missed(sorted(set(expect) - set(result["group"]) - {me}), base.version)
            if gone:
                self.events.emit("absent", f"{len(gone)} ready peer(s) this peer waited for were not in the group; not "
                                 f"waiting for them for a while ({', '.join(p[:12] for p in gone[:3])}{', …' if len(gone) > 3 else ''})",
                                 peers=gone[:64], version=base.version)
                # a newcomer's ready record that brings no peer costs every round a matchmaking time (red team: a fresh
                # key's record each round, 12.7 commits a minute down to 7.0): a strike as a spoiled group is
                # (each was seen ready before the step began, so it had the whole matchmaking time to join. Sparing those
                # ready less than a matchmaking time before spared late honest newcomers, but also an attacker's freshly
                # rotated keys, which were then waited for in 11 of 15 versions: 15.2 commits a minute down to 6.2, red team 6)
                absent_newcomers = sorted(set(gone) - known)
                guard = self.newcomers.spoiled(base.version) if absent_newcomers else 0
                if guard:
                    self.events.emit("newcomers", f"{len(absent_newcomers)} newcomer(s) this peer waited for on v{base.version} never "
                                     f"came: not waiting for newcomers for the next {guard} version(s)", peers=absent_newcomers[:64],
                                     until=self.newcomers.until, why="absent")
                    told_left_out = True
            for peer, far in result.get("outliers", {}).items():
                self.events.emit("outlier", f"peer {peer[:12]}'s delta is {far:g}x further from the {self.strategy.name} result than the median member's",
                                 peer=peer, distance=far)
            for peer, why in result.get("offenders", {}).items():
                if peer not in self.offenders:
                    self.offenders[peer] = why
                    self.events.emit("offender", f"peer {peer[:12]} broke the round's rules ({why}); refusing it from now on", peer=peer, reason=why)
            t1 = time.perf_counter()
            with self.averager.get_tensors() as tensors:
                averaged = [t.clone() for t in tensors]
            check = check_delta(averaged, float("inf"))
            digests: dict[str, str] = {}  # each reducer's slice of the average, hashed beside the next base's hash
            digesting = None
            if check.ok and result["clean"]:
                def digest(slices=result.get("slices") or []):
                    with self.averager.get_tensors() as tensors:  # the result, unchanged until the next all-reduce
                        digests.update(slice_digests(tensors, slices))
                digesting = threading.Thread(target=digest, name="slice-digests", daemon=True)
                digesting.start()
            new_body, new_hash, new_norm, reason = None, "", 0.0, check.reason
            if check.ok:
                averaged, avg_norm, avg_clipped = clip_to_norm(averaged, bound, norm=check.norm)
                new_norm = avg_norm  # the committed delta's norm: the check's, unless it was scaled down
                if avg_clipped:
                    reason = f"averaged delta norm {avg_norm:.4g} scaled down to the round's bound {bound:.4g}"
                    new_norm = delta_norm(averaged)
                new_body = self.strategy.step(base.body, names, averaged, consume=True)  # the copy is ours
                new_hash = M.hash_body(new_body)
            clean = bool(result["clean"]) and check.ok
            group, group_id = result["group"], result["group_id"]
            why_unclean = result.get("error") or (f"incomplete all-reduce (failed {result['failed_size']} values, banned {len(result['banned'])} "
                                                  f"sender(s), {len(result.get('offenders', {}))} offender(s))"
                                                  + "".join(f"; {why}" for why in list(result.get("failure_reasons", {}).values())[:1])
                                                  + "".join(f"; banned {peer[:12]}…: {why}" for peer, why in list(result.get("ban_reasons", {}).items())[:1]))
            cert = Certificate(self.manifest.name, base.version + 1, base.hash, new_hash or "0" * 64, group_id, tuple(sorted(group)))
            signature = sign_certificate(cert, me, self.dht.identity) if clean else ""
            cert = cert.with_signature(me, self.dht.identity.public_key, signature) if clean else cert
            if digesting is not None:
                digesting.join()
            if digests:  # before the verdict: a member that reads the verdict as a dissent then finds these too
                self.records.publish_slices({"v": base.version, "base": base.hash, "redo": redo, "group_id": group_id,
                                             "slices": [{"reducer": r, "digest": d} for r, d in sorted(digests.items())][:256]})
            self.records.publish_verdict({
                "v": base.version, "base": base.hash, "redo": redo, "group_id": group_id, "members": sorted(group)[:256],
                "result": new_hash if clean else "", "clean": clean, "reason": (reason or ("" if result["clean"] else why_unclean))[:300],
                "offenders": sorted(result.get("offenders", {}))[:256], "signature": signature,
            })
            t_published = time.perf_counter()
            decision, signed = self._await_verdicts(redo, group, group_id, cert, new_hash, clean)
            t_verdicts = time.perf_counter() - t_published  # of verify: waiting for the group's verdicts
            if self.admission.private:  # the signers' tokens (checked by the averager when it took up the group) go with it
                signed = signed.with_tokens({**{p: g.get("token") for p, g in result["gathered"].items() if isinstance(g, dict)},
                                             me: self.token})
            t_verify = time.perf_counter() - t1
            # a new version never counts a revoked peer's signature, whatever its line (that is for history)
            admitted = (lambda peer, token, version: self.admission.signed_by_member(peer, token)) if self.admission.private else None
            if decision.action == "commit" and check_certificate(signed, self.manifest.name, r.min_group_size, admitted).ok:
                self.absentees.seen(group)
                self._commit(new_body, new_hash, signed, decision, redo, result, new_norm,
                             {"gather_s": t_gather, "matchmaking_s": t_match, "allreduce_s": t_allreduce, "verify_s": t_verify,
                              "verdicts_s": t_verdicts})
                return "committed"
            own = "" if clean else (reason or why_unclean)  # what was wrong with this peer's own view, said too
            why = f"{decision.reason}: {own}" if decision.reason and own else (decision.reason or own)
            self.events.emit(
                "unverified",
                f"round on v{base.version} not verified ({why or 'disagreement'}"
                f"{f', {len(decision.silent)} member(s) silent' if decision.silent else ''}); keeping v{base.version}",
                redo=redo, reasons=[why] if why else [], missing=len(decision.silent),
            )
            # a member whose reducer failed us or whose parts never came (dead, or stalling on purpose)
            # is left out of this round's redos: it cannot hold every redo of the round
            dissent, silent = set(decision.dissent), set(decision.silent)
            if decision.dissent and digests:
                dissent, silent = self._blame(redo, group, group_id, digests, new_hash, decision)
            blamed = (set(result.get("failed_reducers", [])) | set(result.get("banned", [])) | dissent | silent) - {me}
            suspects |= blamed
            self.absentees.seen(set(group) - blamed)  # the members that came and were not to blame
            mates |= set(group) - blamed - set(self.offenders)
            spoilers = newcomers_to_blame(group, blamed, known, me)
            for peer in sorted(blamed & known):
                out = self.blamed.blame(peer, base.version)
                if out:
                    self.events.emit("blamed", f"peer {peer[:12]} failed a group again on v{base.version}: leaving it out of the next "
                                     f"{out} version(s)", peer=peer, until=base.version + out)
            guard = self.newcomers.spoiled(base.version) if spoilers else 0
            if guard:  # the next attempt leaves them out (``left_out``), where the known peers can form a group alone
                self.events.emit("newcomers", f"a group with {len(spoilers)} newcomer(s) to blame failed on v{base.version}: leaving "
                                 f"newcomers out of this round's redos and the next {guard} version(s)", peers=spoilers[:64],
                                 until=self.newcomers.until, why="spoiled")
                told_left_out = True
            redo = min(redo + 1, self._top_level())  # past the top, the next attempt meets at the top key again
            failures += 1
            self._set_phase("ready", examples, redo)
        return "kept"

    def _dht_load(self) -> dict[str, int]:
        """DHT requests this peer's node has sent and served, and reads and writes of records it made, so far."""
        from coldfusion_p2p.swarm import dht_requests

        counts = dht_requests(self.dht) if self.dht is not None else {}
        if not counts:
            return {}
        # hivemind's find and store handlers call its ping handler themselves: served pings are not requests
        load = {"sent": sum(v for k, v in counts.items() if k.startswith("sent_")),
                "served": counts.get("served_find", 0) + counts.get("served_store", 0), **counts}
        if self.records is not None:
            load.update(reads=self.records.calls["get"], writes=self.records.calls["store"])
        return load

    def _allreduce_started(self) -> None:
        self._metrics["phase"] = "averaging"
        self.events.emit("allreduce", None, version=self.base.version)  # no log line: the progress bar shows it
        self._publish_metrics()

    def _commit(self, new_body, new_hash, cert: Certificate, decision: CommitDecision, redo, result, norm, timings) -> None:
        t_store = time.perf_counter()
        base = self.base
        group = sorted(cert.members)
        stats = {k: round(v, 3) for k, v in timings.items()}
        stats.update({
            "group_size": len(group), "answered": len(group) - len(decision.silent), "signers": len(cert.signatures),
            "redo": redo, "delta_norm": round(norm, 6), "strategy": self.strategy.name,
            "part_kib": int(result.get("part_bytes") or 0) // 1024,  # the all-reduce's part size (``group_part_bytes``)
            # members whose parts this peer's reducer found far from the result (distance / median's)
            "outliers": {p: float(x) for p, x in sorted(result.get("outliers", {}).items())[:256]},
            # other members' words: kept only as plain counts within the manifest's budget
            "examples": {p: g["examples"] for p, g in result["gathered"].items() if isinstance(p, str) and isinstance(g, dict)
                         and type(g.get("examples")) is int and 0 <= g["examples"] <= self.manifest.training.examples_per_round},
            # from the start of training to the commit; stored, so that re-published history keeps it
            "round_s": round(time.monotonic() - self._round_started, 3),
        })
        now = self._dht_load()  # this peer's load on the DHT since its last commit (bench/scale.py reads it)
        if now and self._dht_mark:
            stats["dht"] = {k: v - self._dht_mark.get(k, 0) for k, v in now.items()}
        self._dht_mark = now
        info = VersionInfo(base.version + 1, new_hash, parent=base.hash, contributors=group,
                           averaged_tensors=list(self.names), round_stats=stats)
        self._set_phase("storing")
        if self.history.chain.add(cert) is not None:  # cannot happen with a certificate checked above
            raise WorkError(f"could not certify v{info.version}")
        # the certificate before the body: a stop between the two (SIGTERM, a crash) leaves a certificate without a
        # body, which nothing lists or uses, never a stored version without its certificate
        self.history.record_commit(cert)
        self.store.save(new_body, info)
        stats["store_s"] = round(time.perf_counter() - t_store, 3)
        # the reducers whose lane this peer could not use (for `cfp2p status`: a lane port that others cannot reach)
        missed = [p for p in result.get("lane_missed", []) if isinstance(p, str)][:16]
        self._metrics.update(rounds=self._metrics["rounds"] + 1, last_round_seconds=stats["round_s"], lane_missed=missed)
        self.base = Base(info.version, new_hash, new_body, group)
        self.no_shows.seen(group)
        self.records.announce_base(self.base.version, self.base.hash)  # not waited for: the heartbeat announces it again
        with contextlib.suppress(Exception):  # the history is a courtesy for `cfp2p status`
            self._publish_history()
        self.events.emit(
            "committed",
            f"committed v{info.version} ({new_hash[:12]}) with {len(group)} contributor(s), {len(cert.signatures)} signature(s): "
            f"matchmaking {stats['matchmaking_s']:.1f}s, all-reduce {stats['allreduce_s']:.1f}s, verify {stats['verify_s']:.1f}s, "
            f"store {stats['store_s']:.1f}s",
            version=info.version, hash=new_hash, contributors=group, stats=stats,
        )

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        """Join and contribute; returns the number of rounds this peer committed."""
        opts = self.opts
        data = load_private_data(opts.data, opts.text_column, opts.label_column)  # bad data fails before the network
        device = pick_device(opts.device)
        amp_dtype_for(opts.precision, device, 0)  # an unknown --precision is refused before joining
        self._device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.weighting not in (None, "uniform", "examples"):
            raise UserError(f"--weight must be uniform or examples, not {opts.weighting!r}")
        self.events.emit("data", f"data: {len(data.train_texts)} training and {len(data.eval_texts)} held-out examples, {data.num_labels} classes ({', '.join(data.labels[:6])})", train=len(data.train_texts), labels=data.labels)
        return self._session(lambda model_dir: self._rounds(data, device, model_dir))

    def serve(self, stop: threading.Event | None = None, ready: Callable[[list[str]], None] | None = None) -> None:
        """A second meeting point (`cfp2p bootstrap --initial-peers`): it joins like a member (the authority's
        signed manifest, the model files checked against it, certified bases by the fork rule), then serves the
        model files and the bases it follows, re-publishes the manifest and keeps the DHT reachable; it never
        trains and never averages. Returns when ``stop`` is set; Ctrl+C and SIGTERM stop it too."""
        self._role, self._metrics["phase"] = "mirror", "serving"
        stop = stop or threading.Event()

        def serving(_model_dir: Path) -> int:
            from coldfusion_p2p.swarm import visible_maddrs

            self.events.emit("serving", f"serving the model files and v{self.base.version} of swarm {self.manifest.name!r}; "
                             "it never trains or averages", version=self.base.version)
            if ready is not None:
                ready(visible_maddrs(self.dht))
            while not stop.wait(SERVE_SYNC_SECONDS):
                self._check_standing()  # raises once membership has ended
                self._sync()
            return 0

        self._session(serving)

    def _session(self, work: Callable[[Path], int]) -> int:
        """Join the swarm (DHT, manifest, model, base, averager, heartbeat), run ``work(model_dir)``, leave."""
        opts = self.opts
        self.store = VersionStore(opts.store)
        from coldfusion_p2p.swarm import SwarmRecords, authority_of, make_averager, quiet_hivemind

        quiet_hivemind()
        previous = signal.signal(signal.SIGTERM, _raise_terminate)
        try:
            self.authority = authority_of(opts.initial_peers, opts.authority)
            identity, self.token = self._credentials(self.authority)
            self.dht = self._start_dht(identity)
            self.reach = self._reachability()
            self.records = SwarmRecords(self.dht)
            self.manifest = self._fetch_manifest(self.records)
            self.strategy = self.manifest.strategy()
            if self.manifest.admission.mode != "open" and self.token is None:
                raise UserError(f"swarm {self.manifest.name!r} admits members only: send your public key (`cfp2p id --identity KEY`) "
                                "to its lab and join with --identity KEY --token FILE")
            if opts.weighting not in (None, self.manifest.fusion.weighting):
                raise UserError(f"the swarm's manifest sets weighting = {self.manifest.fusion.weighting!r}; every reducer enforces it, "
                                f"so --weight {opts.weighting} would get this peer banned from rounds: drop --weight")
            self.records = SwarmRecords(self.dht, self.manifest.name)
            self._apply_admission(self.manifest)
            self._check_standing()
            _store_identity(self.store, self.manifest, self.authority)
            private = self.admission.private  # the heartbeat may replace or update self.admission: look it up each time
            chain = CertChain(self.manifest.name, self.manifest.model.v0_hash, self.manifest.round.min_group_size,
                              (lambda peer, token, version=None: self.admission.signed_by_member(peer, token, version)) if private else None,
                              (lambda: self.admission.lines()) if private else None)
            self.history = HistorySync(self.store, chain, self.records.peer_id, self.manifest.fusion.max_delta_ratio,
                                       self._fetch, self._servers, self.log, strategy=self.strategy)
            self.history.line_source = self.authority if private else None  # keeps revocation lines' paths
            self.history.load_local()
            self.events.emit("joined", f"joined swarm {self.manifest.name!r} as {self.records.peer_id[:12]}… (model {self.manifest.model.source}, v0 {self.manifest.model.v0_hash[:12]})", peer=self.records.peer_id, swarm=self.manifest.name)
            model_dir, local_v0 = self._prepare_model()
            self.base = self._initial_base(local_v0)
            self.names = M.averaged_names(self.base.body)
            self._sync()
            self.averager = make_averager(
                self.dht, self.manifest.name, [torch.zeros_like(self.base.body[n], dtype=torch.float32) for n in self.names],
                self.store.root, self.manifest.fusion.compression, self.manifest.round.matchmaking_time,
                self.manifest.round.allreduce_timeout, self.manifest.round.min_group_size, self.manifest.round.chunk_timeout,
                admission=self.admission.state() if self.admission.private else None, label=f"[{opts.name}] " if opts.name else "",
                client_mode=self.reach == "client", lane=opts.lane_port >= 0, lane_port=max(0, opts.lane_port),
            )
            if self.admission.private:
                self._admission_changed = False
                self.averager.set_admission(self.admission.state(), f"[{opts.name}] " if opts.name else "")
                self.records.publish_membership(self.token)
            self.records.announce_base(self.base.version, self.base.hash, wait=True)
            self.records.publish_manifest(self.signed_manifest)
            heartbeat = threading.Thread(target=self._heartbeat, daemon=True)
            heartbeat.start()
            return work(model_dir)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.shutdown()

    def _rounds(self, data: PrivateData, device: torch.device, model_dir: Path) -> int:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        head = self._load_head(data, model_dir)
        trainer = LocalTrainer(tokenizer, data, head, self.manifest.training, self.manifest.tokenizer.max_length, device,
                               precision=self.opts.precision)
        committed = 0
        while self.opts.rounds is None or committed < self.opts.rounds:
            self._check_standing()
            self._sync()
            base = self.base
            self._round_started = time.monotonic()
            self._dht_mark = self._dht_mark or self._dht_load()
            self._metrics.update(step=0, total=0, loss=None, examples_per_second=None)
            self._set_phase("training")
            if self._body_module is None or not M.refill_body_module(self._body_module, base.body):
                self._body_module = M.load_body_module(model_dir, base.body)
            body = self._body_module
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

            try:
                result = trainer.train(body, seed, progress)
            except FloatingPointError as e:  # nothing was applied, shared or saved: the store holds what it held
                raise WorkError(f"{e} on v{base.version}: nothing was shared or saved (the manifest's training.lr may be too high for this data)") from None
            finetuned = M.body_state(body)
            body.zero_grad(set_to_none=True)  # the kept module's last gradients: as large as the body, and not needed
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
            elif outcome == "withdrawn":
                self.events.emit("stale", f"a revocation withdrew the certificate of v{base.version}; dropping this peer's delta on it")
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
