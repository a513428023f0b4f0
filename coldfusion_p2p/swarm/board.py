"""The swarm's records in the DHT: writing this peer's own, reading everyone's, parsed and checked.

Every record is written under this peer's owner subkey (signed by its identity key) with an
expiration within its kind's TTL, and read back through ``records.owned``: a record that fails any
check is dropped, never raised. Results are keyed by the writer's peer id, which the signature proves.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hivemind.dht import DHT

from coldfusion_p2p import records as R
from coldfusion_p2p.certs import canonical, verify_signature
from coldfusion_p2p.errors import WorkError
from coldfusion_p2p.swarm.node import dht_time, peer_of_maddr

RECORD_TTL = 20.0  # seconds a progress/holder record lives without a refresh
MANIFEST_TTL = 600.0
HISTORY_TTL = 3600.0  # committed versions, re-published by their holders while they run
VERDICT_TTL = 120.0
MEMBERS_TTL = 600.0
DHT_CALL_TIMEOUT = 20.0  # seconds; a DHT call that has not answered by then is given up, never waited for forever
METRICS_TTL = 12.0  # a peer that stops publishing (every heartbeat) disappears after this


def manifest_payload(swarm: str, serial: int, manifest: dict) -> bytes:
    """What the swarm's authority signs: the swarm's name, the serial, and the manifest's canonical JSON."""
    return canonical({"kind": "cfp2p-manifest/1", "swarm": swarm, "serial": serial, "manifest": manifest})


def sign_manifest(identity, manifest: dict, serial: int) -> dict:
    """A ManifestRecord value signed by ``identity`` (the bootstrap peer's key: the swarm's authority)."""
    return {"swarm": manifest["name"], "serial": int(serial), "manifest": canonical(manifest), "authority": identity.public_key,
            "signature": identity.sign(manifest_payload(manifest["name"], serial, manifest))}


def open_manifest(record: R.ManifestRecord, authority: str | None) -> dict | None:
    """The manifest a signed record carries, if its signature is the authority's (a peer id); else None."""
    import json

    if authority is not None and R.peer_id_of_owner(record.authority) != authority:
        return None
    try:
        manifest = json.loads(record.manifest)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("name") != record.swarm:
        return None
    if not verify_signature(record.authority, manifest_payload(record.swarm, record.serial, manifest), record.signature):
        return None
    return manifest


class SwarmRecords:
    """This peer's view of a swarm's records. Thread-safe: hivemind's DHT pipe is not, so every send holds a lock."""

    def __init__(self, dht: DHT, swarm_name: str = ""):
        self.dht, self.swarm = dht, swarm_name
        from coldfusion_p2p.swarm.node import peer_str

        self.peer_id = peer_str(dht.peer_id)
        self._lock = threading.Lock()
        self.public_keys: dict[str, str] = {}  # peer id -> ssh-rsa key, from the owner subkeys of records read
        self.revoked: frozenset = frozenset()  # peers the swarm's authority revoked: their records are ignored
        self.calls = {"get": 0, "store": 0}  # reads and writes this peer made (each is several DHT requests)

    def _store(self, key: str, value: dict, ttl: float, wait: bool = True) -> bool:
        with self._lock:
            self.calls["store"] += 1
            future = self.dht.store(key, value, expiration_time=dht_time() + ttl, subkey=self.dht.owner_subkey, return_future=True)
        if not wait:
            return True
        try:
            return bool(future.result(timeout=DHT_CALL_TIMEOUT))
        except Exception:  # noqa: BLE001 - a store that failed or hung is a store that did not happen
            future.cancel()
            return False

    def _read(self, key: str) -> dict[str, Any]:
        """Every valid record at ``key``, by writer's peer id; only this swarm's (all, for the manifest key)."""
        with self._lock:
            self.calls["get"] += 1
            future = self.dht.get(key, latest=True, return_future=True)
        try:
            found = future.result(timeout=DHT_CALL_TIMEOUT)
        except Exception:  # noqa: BLE001 - a lookup that failed (or hung) is a lookup that found nothing
            future.cancel()  # hivemind 1.1.12 now and then never answers a lookup: waiting for it would stall the peer
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        raw = {sub: (item.value, item.expiration_time) for sub, item in found.value.items()}
        parsed = R.owned(R.KINDS[key], raw, dht_time(), self.public_keys)
        if self.revoked:
            parsed = {peer: rec for peer, rec in parsed.items() if peer not in self.revoked}
        if key == R.MANIFEST_KEY or not self.swarm:
            return parsed
        return {peer: rec for peer, rec in parsed.items() if rec.swarm == self.swarm}

    # --- manifest -------------------------------------------------------------------------
    def publish_manifest(self, signed: dict) -> bool:
        """Publish a manifest record signed by the authority (``sign_manifest``), under this peer's subkey."""
        return self._store(R.MANIFEST_KEY, signed, MANIFEST_TTL)

    def manifests(self, authority: str | None) -> dict[str, tuple[int, dict, dict]]:
        """The newest manifest signed by ``authority`` per swarm: name -> (serial, manifest, record)."""
        out: dict[str, tuple[int, dict, dict]] = {}
        for rec in self._read(R.MANIFEST_KEY).values():
            manifest = open_manifest(rec, authority)
            if manifest is not None and (rec.swarm not in out or rec.serial > out[rec.swarm][0]):
                out[rec.swarm] = (rec.serial, manifest, rec.dict())
        return out

    def wait_for_manifest(self, wanted: str | None, authority: str | None, timeout: float) -> tuple[str, int, dict, dict]:
        """(name, serial, manifest, signed record) of swarm ``wanted`` (or the only one) signed by ``authority``."""
        from coldfusion_p2p.errors import UserError

        deadline = time.monotonic() + timeout
        while True:
            found = self.manifests(authority)
            if wanted is not None:
                found = {k: v for k, v in found.items() if k == wanted}
            if len(found) == 1:
                name, (serial, manifest, record) = next(iter(found.items()))
                return name, serial, manifest, record
            if len(found) > 1:
                raise UserError(f"this DHT hosts several swarms ({', '.join(sorted(found))}); pick one with --swarm")
            if time.monotonic() > deadline:
                which = f"swarm {wanted!r}" if wanted else "a swarm manifest"
                who = f" signed by {authority[:16]}…" if authority else ""
                raise WorkError(f"found no {which}{who} in the DHT within {timeout:.0f}s; is the bootstrap peer running, "
                                "and is the first --initial-peers its address (or pass --authority PEER_ID)?")
            time.sleep(1.0)

    # --- members of a private swarm -------------------------------------------------------
    def publish_membership(self, token: dict, wait: bool = False) -> bool:
        import json

        return self._store(R.MEMBERS_KEY, {"swarm": self.swarm, "peer": self.peer_id, "token": json.dumps(token, sort_keys=True)},
                           MEMBERS_TTL, wait=wait)

    def memberships(self) -> dict[str, str]:
        """peer id -> the token JSON it shows (unchecked: the reader checks it against the authority)."""
        return {peer: rec.token for peer, rec in self._read(R.MEMBERS_KEY).items()}

    # --- metrics and history --------------------------------------------------------------
    def publish_metrics(self, metrics: dict[str, Any], wait: bool = False) -> bool:
        return self._store(R.METRICS_KEY, metrics, METRICS_TTL, wait=wait)

    def metrics(self) -> dict[str, R.MetricsRecord]:
        return self._read(R.METRICS_KEY)

    def publish_history(self, entries: list[dict], wait: bool = False) -> bool:
        """This peer's newest versions (at most 10), for ``cfp2p status``."""
        return self._store(R.HISTORY_KEY, {"swarm": self.swarm, "entries": entries[-10:]}, HISTORY_TTL, wait=wait)

    def history(self) -> dict[str, R.HistoryRecord]:
        return self._read(R.HISTORY_KEY)

    # --- holders of bases -----------------------------------------------------------------
    def announce_base(self, version: int, body_hash: str, wait: bool = False) -> None:
        self._store(R.BASES_KEY, {"swarm": self.swarm, "v": int(version), "hash": body_hash}, RECORD_TTL, wait=wait)

    def announced(self) -> dict[str, tuple[int, str]]:
        """peer id -> (v, hash) it announces."""
        return {peer: (rec.v, rec.hash) for peer, rec in self._read(R.BASES_KEY).items()}

    # --- rounds -----------------------------------------------------------------------------
    def set_progress(self, version: int, body_hash: str, state: str, examples: int = 0, wait: bool = False,
                     since: float | None = None, redo: int = 0) -> None:
        value = {"swarm": self.swarm, "v": int(version), "hash": body_hash, "state": state, "examples": int(examples),
                 "t": float(since if since is not None else dht_time()), **({"redo": int(redo)} if redo else {})}
        self._store(R.PROGRESS_KEY, value, RECORD_TTL, wait=wait)

    def progress(self, version: int, body_hash: str) -> dict[str, R.ProgressRecord]:
        return {p: r for p, r in self._read(R.PROGRESS_KEY).items() if (r.v, r.hash) == (version, body_hash)}

    def publish_verdict(self, verdict: dict) -> None:
        # not waited for: the peer goes on to read the others' verdicts (a failed store was never retried either)
        self._store(R.VERDICTS_KEY, {"swarm": self.swarm, **verdict}, VERDICT_TTL, wait=False)

    def verdicts(self, version: int, body_hash: str) -> dict[str, R.VerdictRecord]:
        """Every member's latest verdict on a round of base (v, hash)."""
        return {p: r for p, r in self._read(R.VERDICTS_KEY).items() if (r.v, r.base) == (version, body_hash)}

    def publish_slices(self, slices: dict) -> None:
        self._store(R.SLICES_KEY, {"swarm": self.swarm, **slices}, VERDICT_TTL, wait=False)

    def slices(self, version: int, body_hash: str) -> dict[str, R.SlicesRecord]:
        """Every member's latest slice digests on a round of base (v, hash)."""
        return {p: r for p, r in self._read(R.SLICES_KEY).items() if (r.v, r.base) == (version, body_hash)}


def authority_of(initial_peers: list[str], explicit: str | None) -> str | None:
    """The peer id whose signature a swarm manifest must carry: ``--authority``, else the first initial peer's."""
    if explicit:
        return explicit
    for maddr in initial_peers:
        peer = peer_of_maddr(maddr)
        if peer:
            return peer
    return None


def metrics_record(*, swarm: str, peer: str, role: str, version: int, hash: str, phase: str, uptime: float,
                   name: str | None = None, device: str = "-", step: int = 0, total: int = 0, loss: float | None = None,
                   examples_per_second: float | None = None, last_round_seconds: float | None = None, rounds: int = 0,
                   reach: str | None = None, lane_missed: list[str] | None = None) -> dict:
    """A MetricsRecord with every field present and the exact types the schema wants (no conversions)."""

    def real(x):
        return None if x is None else float(x)

    return {
        "swarm": swarm, "peer": peer, "name": name[:40] if name else None, "role": role, "version": int(version), "hash": hash,
        "phase": phase, "step": int(step), "total": int(total), "loss": real(loss), "examples_per_second": real(examples_per_second),
        "device": device[:80], "uptime": float(uptime), "last_round_seconds": real(last_round_seconds), "rounds": int(rounds),
        "reach": reach, "lane_missed": None if lane_missed is None else [str(p) for p in lane_missed][:16], "t": float(dht_time()),
    }
