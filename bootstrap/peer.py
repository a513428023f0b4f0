"""The bootstrap peer: a meeting point with a persistent identity that publishes the swarm manifest.

It holds v0 and the model files so that a contributor without the model can download them, and it
re-publishes the manifest; it takes no part in averaging, and rounds go on without it once the
peers know each other.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from coldfusion_p2p import model as M
from coldfusion_p2p.config import SwarmManifest
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.store import VersionInfo, VersionStore

ANNOUNCE_SECONDS = 5.0


def complete_manifest(manifest: SwarmManifest, cache_dir: Path) -> tuple[SwarmManifest, Path, M.BodyState]:
    """Fill in the model's v0 hash and file hashes from the local model."""
    folder = M.resolve_model_source(manifest.model.source, cache_dir=cache_dir)
    body = M.body_state(M.load_body_module(folder))
    v0 = M.hash_body(body)
    if manifest.model.v0_hash and manifest.model.v0_hash != v0:
        raise UserError(f"the config names v0 {manifest.model.v0_hash[:12]}, but {manifest.model.source} hashes to {v0[:12]}")
    manifest.model.v0_hash = v0
    manifest.model.files = M.model_file_hashes(folder)
    return manifest, folder, body


def manifest_serial(store_root: Path, manifest: dict) -> int:
    """The manifest's serial: the same as last time for the same settings, one more when they changed.

    Peers keep the highest serial the authority signed, so a changed manifest must never go back."""
    path = store_root / "published-manifest.json"
    try:
        last = json.loads(path.read_text())
        serial = int(last["serial"]) + (last["manifest"] != manifest)
    except (OSError, ValueError, KeyError, TypeError):
        serial = 1
    _write_atomically(path, json.dumps({"serial": serial, "manifest": manifest}, sort_keys=True))
    return serial


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


HISTORY_GRACE_SECONDS = 75.0  # members publish their history on every new base, and at least once a minute
SUPPORT_DEPTH = 64  # versions below the newest announced one that members' support is counted for
FOLLOW_BUDGET = 128  # certificates checked per heartbeat (each costs up to MAX_MEMBERS signature checks)


class HistoryFollower:
    """The certified history the members publish, checked as a member checks it (a chain back to v0,
    the revocations so far): a new revocation's line is drawn at its head. Records come from other
    peers: a certificate that does not chain to v0 or check out never moves the head, an empty or
    failed read keeps the last head, and a version is linked only along the lineage of one that is
    announced (from the history records, or fetched from its holders as a member syncing would)."""

    def __init__(self, manifest: SwarmManifest, admission, me: str, head: tuple[int, str] | None = None,
                 fetch=None, store=None, members=None):
        from coldfusion_p2p.certs import CertChain
        from coldfusion_p2p.sync import HistorySync

        private = admission is not None and admission.private
        self.chain = CertChain(manifest.name, manifest.model.v0_hash, manifest.round.min_group_size,
                               (lambda peer, token, version=None: admission.signed_by_member(peer, token, version)) if private else None,
                               (lambda: admission.lines()) if private else None)
        self.me, self.v0 = me, (0, manifest.model.v0_hash)
        # members(peer, token) -> whether a membership record admits its writer (private swarms), else None
        self.members = members if members is not None else (
            (lambda peer, raw: admission.problem(peer, raw) is None) if private else None)
        self.head = head  # (version, hash): from the lab's file at start, then the best seen
        self.fresh = False  # whether the head was seen announced since this peer started
        self.announcers: dict[tuple[int, str], set[str]] = {}  # accepted versions -> who announced them last
        self.paths: dict[str, list[dict]] = {}  # lineage digest -> the certificates of a drawn line's path
        self._announced: dict = {}
        self._sync = HistorySync(store, self.chain, me, manifest.fusion.max_delta_ratio, fetch, lambda: dict(self._announced),
                                 log=lambda _msg: None) if fetch is not None and store is not None else None

    def _rank(self, key: tuple[int, str]) -> tuple:
        """The fork rule: highest version, then most signatures, then the smaller hash."""
        return (key[0], self.chain.signers(*key), tuple(-ord(c) for c in key[1]))

    def update(self, records) -> tuple[int, str] | None:
        """Take the members' newest history and announcements; the head (None: nothing seen yet)."""
        from coldfusion_p2p.certs import Certificate

        announced = dict(records.announced())
        if self.members is not None:  # only members' announcements count (a member can write under throwaway keys)
            try:
                admitted = {p for p, raw in records.memberships().items() if self.members(p, raw)}
            except Exception:  # noqa: BLE001 - no membership records read: keep the last view
                admitted = None
            if admitted is None:
                return self.head
            announced = {p: key for p, key in announced.items() if p in admitted}
        self._announced = announced
        by_key: dict[tuple[int, str], dict] = {}
        for record in records.history().values():
            for entry in record.entries[:16]:
                if isinstance(entry.cert, dict):
                    by_key.setdefault((entry.v, entry.hash), entry.cert)
        batch = []
        for target in sorted(set(self._announced.values()), reverse=True)[:64]:
            if self.chain.accepts(*target) or target[0] <= 0:
                continue
            path, key = [], target  # only along an announced version's lineage: other entries cost nothing
            while key in by_key and not self.chain.accepts(*key) and len(path) < FOLLOW_BUDGET:
                try:
                    cert = Certificate.from_dict(by_key[key])
                except (ValueError, TypeError, KeyError, RecursionError):
                    break
                if (cert.version, cert.hash) != key:
                    break
                path.append(cert)
                key = (key[0] - 1, cert.parent)
            batch += path
        if batch:  # one settle for all of them
            self.chain.add_many(batch)
        if self._sync is not None:  # versions whose lineage the records do not reach: ask their holders
            try:
                self._sync.look(self.head)
            except Exception:  # noqa: BLE001 - a holder's answer is no reason to stop
                pass
        self.announcers = {}
        for peer, key in self._announced.items():
            if key[0] > 0 and self.chain.accepts(*key):
                self.announcers.setdefault(key, set()).add(peer)
        if self.announcers:  # where members go: the fork rule over what they announce (an old version never lowers it)
            self.head, self.fresh = max(self.announcers, key=self._rank), True
        return self.head

    def head_for(self, revoked) -> tuple[int, str] | None:
        """The head to pin a line at for ``revoked``: by the fork rule (what members will follow), among the
        accepted versions that at least two members announce, themselves or through a descendant, not counting
        the peers being revoked (the key and one accomplice cannot aim the line at a fork of their own, nor pull
        it down). With one such member, its own version; with none, the head members last went to."""
        peers = {p: k for k, ps in self.announcers.items() for p in ps if p not in revoked}
        if len(peers) == 1:
            return next(iter(peers.values()))
        if not peers:
            return self.head
        top = max(k[0] for k in peers.values())
        support: dict[tuple[int, str], set[str]] = {}
        for peer, key in peers.items():  # each member supports its version and its ancestors, SUPPORT_DEPTH down
            for _ in range(SUPPORT_DEPTH):
                if key[0] < top - SUPPORT_DEPTH or key[0] <= 0:
                    break
                support.setdefault(key, set()).add(peer)
                cert = self.chain.certificate(*key)
                if cert is None:
                    break
                key = (key[0] - 1, cert.parent)
        pool = [key for key, who in support.items() if len(who) >= 2]
        return max(pool, key=self._rank) if pool else max(peers.values(), key=self._rank)

    def forget_revoked(self, revoked) -> None:
        """A revocation was applied: drop what no longer checks out (the head falls back with it)."""
        from coldfusion_p2p.certs import signed_by_any

        self.chain.recheck(suspect=signed_by_any(revoked))
        if self.head is not None and self.head != self.v0 and not self.chain.accepts(*self.head):
            self.head = None
        self.announcers = {k: v for k, v in self.announcers.items() if self.chain.accepts(*k)}


def _draw_revocation_line(lab: str, manifest: SwarmManifest, follower: HistoryFollower | None, pending: set[str], log,
                          waited: float) -> bool:
    """Newly revoked peers' signatures count on the head of the history the bootstrap peer follows and its
    ancestors (so what they helped make stays certified for everyone, newcomers included) and on nothing
    else. False while no head is known and the members may not have published their history yet."""
    from coldfusion_p2p.certs import lineage_digest
    from coldfusion_p2p.membership import make_line

    pending = {p for p in pending if p not in manifest.admission.signed_until}
    if not pending:
        return True
    head = follower.head_for(pending) if follower is not None else None
    if (head is None or not follower.fresh) and waited < HISTORY_GRACE_SECONDS:
        return False  # the members' history may not have reached this peer yet (a restart): a line too low costs versions
    v0 = follower.v0 if follower is not None else (0, manifest.model.v0_hash)
    if head is None:
        head = v0
        log(f"no certified history seen in {waited:.0f} s: the revoked keys' signatures count on nothing")
    path = []
    if head[0] > 0:
        try:  # the line pins the path to the head, not only the head (see certs.lineage_digest)
            path = follower.chain.lineage(*head)
        except KeyError:  # the last head this peer followed, not verified since it started: wait for the members
            return False
    digest = lineage_digest(v0[1], [c.hash for c in path])
    if follower is not None and path:
        follower.paths[digest] = [c.to_dict() for c in path]  # kept and served: the branch may lose a fork later
    lines = {p: make_line(head[0], head[1], digest) for p in sorted(pending)}
    manifest.admission.signed_until = {**manifest.admission.signed_until, **lines}
    log(f"revoked {len(lines)} peer(s): their signatures count on v{head[0]} ({head[1][:12]}) and its ancestors, "
        "the head of the certified history the members announce, and on nothing else")
    return True


def _recover_published_lines(lab: str, manifest: SwarmManifest, log) -> None:
    """Lines this peer published before (its last signed manifest) that the lab's file lacks (lost, or an older
    format): kept, so that a restart never takes a published revocation back while a new line is drawn."""
    from coldfusion_p2p.bootstrap import lab as L
    from coldfusion_p2p.membership import parse_line

    try:
        lines = json.loads((Path(lab) / L.STORE_DIR / "published-manifest.json").read_text())["manifest"]["admission"]["signed_until"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(lines, dict):
        return
    revoked = set(L.revoked(lab))
    found = {p: v for p, v in lines.items() if p in revoked and p not in manifest.admission.signed_until and parse_line(v) is not None}
    if found:
        manifest.admission.signed_until = {**manifest.admission.signed_until, **found}
        manifest.admission.revoked = sorted(set(manifest.admission.revoked) | set(found))
        L.record_signed_until(lab, found)
        log(f"kept the published revocation line(s) of {len(found)} peer(s) that {L.SIGNED_UNTIL_FILE} lacked")


def _publish_revocations(lab, manifest, follower, admission, pending, dht, store, records, averager, log, waited) -> dict | bool | None:
    """Draw the newly revoked peers' line, then sign and publish the manifest with them; the signed manifest,
    None while the line waits for the members' history, False when the result would not be a valid manifest."""
    from coldfusion_p2p.bootstrap import lab as L
    from coldfusion_p2p.swarm import sign_manifest
    from coldfusion_p2p.swarm.gate import push_revoked

    if not _draw_revocation_line(lab, manifest, follower, pending, log, waited):
        return None
    before = (list(manifest.admission.revoked), dict(manifest.admission.signed_until))
    manifest.admission.revoked = sorted(set(manifest.admission.revoked) | set(pending))
    try:
        manifest.validate()
    except UserError as e:  # never sign what members would refuse: the serial would be spent for nothing
        manifest.admission.revoked, manifest.admission.signed_until = before
        log(f"not publishing the revocation of {len(pending)} peer(s): {e}")
        return False
    L.record_signed_until(lab, {p: manifest.admission.signed_until[p] for p in pending if p in manifest.admission.signed_until})
    from coldfusion_p2p.swarm.transfer import LINES_DIR

    for digest, certs in follower.paths.items():  # served as line/<digest>: who waits for the line can fetch its path
        path = store.root / LINES_DIR / f"{digest}.json"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            _write_atomically(path, json.dumps(certs))
    signed = sign_manifest(dht.identity, manifest.to_dict(), manifest_serial(store.root, manifest.to_dict()))
    records.publish_manifest(signed)
    if admission is not None:
        admission.signed_until = dict(manifest.admission.signed_until)
        admission.revoked = frozenset(manifest.admission.revoked)
        records.revoked = admission.revoked  # their records are ignored from now on
        push_revoked(dht, manifest.admission.revoked)
        averager.set_admission(admission.state(), "[bootstrap] ")
    follower.forget_revoked(frozenset(manifest.admission.revoked))
    log(f"published manifest serial {signed['serial']}: {len(manifest.admission.revoked)} revoked peer(s)")
    return signed


def run_bootstrap(
    config: str | None,
    host_maddrs: list[str],
    identity: str | None,
    maddrs_file: str | None,
    store_dir: str | None,
    announce_maddrs: list[str] | None = None,
    log: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    lab: str | None = None,
) -> None:
    """Serve until ``stop`` is set, Ctrl+C or SIGTERM. With ``lab`` (a folder from `cfp2p bootstrap init`) the
    settings, key and store come from it, and a revocation written there is published within seconds."""
    from coldfusion_p2p.membership import Admission, make_token
    from coldfusion_p2p.swarm import (
        SwarmRecords, make_averager, metrics_record, quiet_hivemind, sign_manifest, start_dht, stop_process, visible_maddrs,
    )
    from coldfusion_p2p.swarm.gate import EnrollDesk, EnrollService, RefusalLog
    from coldfusion_p2p.identity import load_identity, new_identity_file

    from coldfusion_p2p.bootstrap import lab as L

    if lab is not None:
        manifest = L.lab_manifest(lab)
        _recover_published_lines(lab, manifest, log)
        # revoked while this peer was down: published from the loop once its line is drawn (at the head of the
        # history the members announce), never before: without a line every signature of the key would go
        manifest.admission.revoked = sorted(p for p in manifest.admission.revoked
                                            if p in manifest.admission.signed_until or p not in L.revoked(lab))
        identity, store_dir = str(Path(lab) / L.KEY_FILE), str(Path(lab) / L.STORE_DIR)
        registry = Path(lab) / L.MEMBERS_FILE
    else:
        if config is None:
            raise UserError("give --lab DIR (from `cfp2p bootstrap init`) or --config swarm.toml")
        manifest = SwarmManifest.from_toml(config)
        registry = Path(store_dir) / "members.json"
    if identity and not Path(identity).parent.exists():
        raise UserError(f"the folder for --identity does not exist: {Path(identity).parent}")
    private = manifest.admission.mode != "open"
    if private and not identity:
        raise UserError("a private swarm needs the authority's key to persist: create a lab with `cfp2p bootstrap init` "
                        "and run `cfp2p bootstrap --lab DIR` (or give --identity KEY)")
    store = VersionStore(store_dir)
    manifest, folder, body = complete_manifest(manifest, store.root / "cache")
    store.model_dir.mkdir(exist_ok=True)
    for name in manifest.model.files:
        shutil.copy(folder / name, store.model_dir / name)
    store.save(body, VersionInfo(0, manifest.model.v0_hash, parent=None))
    quiet_hivemind()
    stop = stop or threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dht = averager = enroll = None
    try:
        token = admission = None
        refusals = RefusalLog("[bootstrap] ")
        if identity and not Path(identity).is_file():
            new_identity_file(identity)
        if private:  # the authority admits itself: its DHT calls carry a token like every member's
            me = load_identity(identity)
            from coldfusion_p2p.certs import peer_id_of_public_key

            admission = Admission(manifest.admission.mode, manifest.name, peer_id_of_public_key(me.public_key.encode()),
                                  frozenset(manifest.admission.revoked), dict(manifest.admission.signed_until))
            token = make_token(me, manifest.name, "bootstrap", me.public_key, 365 * 86400.0)
        dht = start_dht([], host_maddrs, identity_path=identity, announce_maddrs=announce_maddrs, token=token,
                        admission=admission, refusals=refusals)
        names = M.averaged_names(body)
        averager = make_averager(  # serves v0 and the model files; never steps, so never averages
            dht, manifest.name, [body[n].float() for n in names], store.root, "none", 5.0, 60.0, 2,
            admission=admission.state() if admission is not None else None, label="[bootstrap] ",
        )
        records = SwarmRecords(dht, manifest.name)
        if admission is not None:
            records.revoked = admission.revoked  # their records are ignored
        from coldfusion_p2p.swarm import fetch_blob

        followed = L.followed_head(lab) if lab is not None else None  # the head last written to the lab
        follower = HistoryFollower(manifest, admission, records.peer_id, followed,
                                   fetch=functools.partial(fetch_blob, dht, manifest.name, token=token), store=store)
        # signed with this peer's identity key: the swarm's authority, which `/p2p/<id>` in --initial-peers pins
        signed = sign_manifest(dht.identity, manifest.to_dict(), manifest_serial(store.root, manifest.to_dict()))
        records.publish_manifest(signed)
        records.announce_base(0, manifest.model.v0_hash, wait=True)
        a = manifest.admission
        desk = EnrollDesk(dht.identity, manifest.name, a.mode, a.enroll_days * 86400.0, a.enroll_per_address, a.enroll_per_hour,
                          registry, revoked=lambda: frozenset(manifest.admission.revoked))
        enroll = EnrollService(dht, desk, refusals)
        enroll.start()
        maddrs = visible_maddrs(dht)
        if maddrs_file:
            _write_atomically(Path(maddrs_file), " ".join(maddrs) + "\n")
        log(f"bootstrap peer of swarm {manifest.name!r} is up (model {manifest.model.source}, v0 {manifest.model.v0_hash[:12]}, "
            f"manifest serial {signed['serial']}, admission {a.mode}, signed by this peer: {records.peer_id})")
        log("hand this to contributors:  --initial-peers " + " --initial-peers ".join(maddrs))
        started = time.monotonic()

        def metrics() -> dict:  # a bootstrap peer serves v0 and never trains
            return metrics_record(swarm=manifest.name, peer=records.peer_id, name="bootstrap", role="bootstrap", version=0,
                                  hash=manifest.model.v0_hash, phase="serving", uptime=time.monotonic() - started)

        records.publish_metrics(metrics())
        beats, unpublishable = 0, set()
        while not stop.wait(ANNOUNCE_SECONDS):
            beats += 1
            try:  # only a lab's private swarm revokes: an open swarm has no line to draw, and no history to follow
                head = follower.update(records) if lab is not None and private else None
                if head is not None and head != followed:
                    L.record_followed_head(lab, head)
                    followed = head
            except Exception as e:  # noqa: BLE001 - records other peers wrote are no reason to stop
                if beats % 12 == 1:
                    log(f"could not read the members' history ({type(e).__name__}); keeping the last head")
            pending = set(L.revoked(lab)) - set(manifest.admission.revoked) - unpublishable if lab is not None else set()
            if pending:  # `cfp2p bootstrap revoke` ran
                published = _publish_revocations(lab, manifest, follower, admission, pending, dht, store, records, averager,
                                                 log, time.monotonic() - started)
                if published is None and beats % 12 == 0:
                    log(f"the revocation of {len(pending)} peer(s) waits for a member to announce a certified version")
                if published is False:
                    unpublishable |= pending  # said once; fix the lab's files and restart
                elif published is not None:
                    signed = published
            records.announce_base(0, manifest.model.v0_hash)
            records.publish_metrics(metrics())
            if beats % 12 == 0:
                records.publish_manifest(signed)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if enroll is not None:
            enroll.stop()
        stop_process(averager)
        stop_process(dht)
        log("bootstrap peer stopped")
