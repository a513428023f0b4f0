"""The bootstrap peer: a meeting point with a persistent identity that publishes the swarm manifest.

It holds v0 and the model files so that a contributor without the model can download them, and it
re-publishes the manifest; it takes no part in averaging, and rounds go on without it once the
peers know each other.
"""

from __future__ import annotations

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


def newest_certified(records, manifest: SwarmManifest, admission) -> int:
    """The newest version whose certificate, as members published it in their history records, checks out
    under ``admission`` (the rules before a revocation); 0 when none does."""
    from coldfusion_p2p.certs import Certificate, check_certificate

    admitted = admission.signed_by_member if admission is not None and admission.private else None
    best = 0
    for record in records.history().values():
        for entry in record.entries:
            try:
                cert = Certificate.from_dict(entry.cert)
            except (ValueError, TypeError, KeyError):
                continue
            if cert.version > best and check_certificate(cert, manifest.name, manifest.round.min_group_size, admitted).ok:
                best = cert.version
    return best


def _draw_revocation_line(lab: str, manifest: SwarmManifest, records, admission, pending: set[str], log) -> None:
    """Newly revoked peers' signatures count up to the newest certified version the members published (so
    the history they helped make stays certified for everyone, newcomers included) and on nothing later."""
    from coldfusion_p2p.bootstrap import lab as L

    pending = {p for p in pending if p not in manifest.admission.signed_until}
    if not pending:
        return
    try:
        head = newest_certified(records, manifest, admission)
    except Exception as e:  # noqa: BLE001 - records another peer wrote are no reason to stop
        log(f"could not read the members' history ({type(e).__name__}); the revoked keys' signatures count on nothing")
        return
    lines = {p: head for p in sorted(pending)}
    L.record_signed_until(lab, lines)
    manifest.admission.signed_until = {**lines, **manifest.admission.signed_until}
    log(f"revoked {len(lines)} peer(s): their signatures count on versions up to v{head}, the newest certified one the members published")


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
    from coldfusion_p2p.swarm.gate import EnrollDesk, EnrollService, RefusalLog, push_revoked
    from coldfusion_p2p.swarm.node import Identity, _new_identity_file, load_identity

    from coldfusion_p2p.bootstrap import lab as L

    if lab is not None:
        manifest = L.lab_manifest(lab)
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
            _new_identity_file(identity)
        if private:  # the authority admits itself: its DHT calls carry a token like every member's
            me = Identity(load_identity(identity))
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
        if lab is not None:  # revoked while this peer was down: draw the line at the history the members hold now
            pending = set(L.revoked(lab)) - set(L.signed_until(lab))
            if pending:
                for _ in range(5):  # members' records reach a restarted node within seconds
                    if records.history() or stop.wait(2.0):
                        break
                before = Admission(admission.mode, admission.swarm, admission.authority, admission.revoked - pending,
                                   dict(admission.signed_until)) if admission is not None else None
                _draw_revocation_line(lab, manifest, records, before, pending, log)
                if admission is not None:
                    admission.signed_until = dict(manifest.admission.signed_until)
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
        beats = 0
        while not stop.wait(ANNOUNCE_SECONDS):
            beats += 1
            if lab is not None and not set(L.revoked(lab)) <= set(manifest.admission.revoked):  # `cfp2p bootstrap revoke` ran
                pending = set(L.revoked(lab)) - set(manifest.admission.revoked)
                _draw_revocation_line(lab, manifest, records, admission, pending, log)
                manifest.admission.revoked = sorted(set(manifest.admission.revoked) | set(L.revoked(lab)))
                signed = sign_manifest(dht.identity, manifest.to_dict(), manifest_serial(store.root, manifest.to_dict()))
                records.publish_manifest(signed)
                if admission is not None:
                    admission.signed_until = dict(manifest.admission.signed_until)
                    admission.revoked = frozenset(manifest.admission.revoked)
                    push_revoked(dht, manifest.admission.revoked)
                    averager.set_admission(admission.state(), "[bootstrap] ")
                log(f"published manifest serial {signed['serial']}: {len(manifest.admission.revoked)} revoked peer(s)")
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
