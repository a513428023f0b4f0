"""``cfp2p status``: what a swarm looks like from the DHT, as data (``snapshot``) and as a Rich view (``render``).

Everything here is read from the DHT by a client node that never averages: the swarm manifest,
the bases peers announce (shown only with a certificate chain back to v0), their signed metrics
records (``records.MetricsRecord``; a peer that stops publishing drops out when its record expires)
and the versions they committed.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

PHASE_STYLE = {"training": "cyan", "matchmaking": "yellow", "averaging": "magenta", "syncing": "blue", "idle": "dim", "serving": "green"}
HISTORY_ROWS = 10


class StatusView:
    """What ``cfp2p status`` keeps between refreshes: the certificate chain it has verified so far."""

    def __init__(self, records, swarm: str | None = None, authority: str | None = None, token: dict | None = None):
        self.records, self.swarm, self.authority, self.token = records, swarm, authority, token
        self._history = None
        self._tmp = None

    def _sync_for(self, name: str, manifest: dict):
        import functools
        import tempfile

        from coldfusion_p2p.certs import CertChain, signed_by_any
        from coldfusion_p2p.store import VersionStore
        from coldfusion_p2p.swarm import SwarmRecords, fetch_blob
        from coldfusion_p2p.sync import HistorySync

        if self._history is None or self._history.chain.swarm != name:
            rec = SwarmRecords(self.records.dht, name)
            self._tmp = tempfile.TemporaryDirectory(prefix="cfp2p-status-")
            admission = self._chain_admission = self._admission(name, manifest)
            chain = CertChain(name, manifest["model"]["v0_hash"], int(manifest["round"]["min_group_size"]),
                              admission.signed_by_member if admission.private else None,
                              admission.lines if admission.private else None)
            fetch = functools.partial(fetch_blob, rec.dht, name, token=self.token)  # HistorySync passes the rest by name

            from coldfusion_p2p.config import SwarmManifest

            strategy = SwarmManifest.from_dict(manifest, where="the swarm manifest").strategy()  # nesterov's bases move further
            self._history = HistorySync(VersionStore(self._tmp.name), chain, rec.peer_id, float(manifest["fusion"]["max_delta_ratio"]),
                                        fetch, rec.announced, log=lambda _msg: None, strategy=strategy)
            self._history.line_source = self.authority if admission.private and self.authority else None
            self._rec = rec
        else:  # a newer manifest (watch mode): its revocations apply to the history verified so far
            admission, now = self._chain_admission, self._admission(name, manifest)
            if admission.private and (now.revoked, now.signed_until) != (admission.revoked, admission.signed_until):
                admission.signed_until, admission.revoked = now.signed_until, now.revoked
                self._history.chain.recheck(suspect=signed_by_any(now.revoked))
        return self._history, self._rec

    def _admission(self, name: str, manifest: dict):
        from coldfusion_p2p.membership import Admission, parse_line

        a = manifest.get("admission") or {}
        until = a.get("signed_until")
        until = {p: v for p, v in until.items() if isinstance(p, str) and parse_line(v) is not None} if isinstance(until, dict) else {}
        return Admission(a.get("mode", "open"), name, self.authority or "", frozenset(a.get("revoked", ())), until)

    def _members(self, rec, admission) -> list[dict]:
        """A private swarm's members as their own records show them: tokens issued by the authority, with expiry."""
        from coldfusion_p2p.membership import parse_token, token_problem

        out = []
        now = time.time()
        for peer, raw in rec.memberships().items():
            if token_problem(raw, admission.swarm, admission.authority, now, peer=peer, check_expiry=False) is not None:
                continue  # not a token the authority issued to this writer
            token = parse_token(raw)
            out.append({"name": token["name"], "peer": peer, "expires": token["expires"], "expired": token["expires"] < now,
                        "revoked": peer in admission.revoked})
        return sorted(out, key=lambda m: (m["name"], m["peer"]))

    def snapshot(self, wait: float = 15.0) -> dict[str, Any]:
        """One consistent-enough look at the swarm, as plain JSON-able data.

        Only what can be checked is shown: the manifest the authority signed, versions with a valid
        certificate chain back to v0, metrics signed by the peer they describe, and the bootstrap row
        only for the authority's own peer id.
        """
        from coldfusion_p2p.config import SwarmManifest
        from coldfusion_p2p.swarm import dht_time

        name, _serial, manifest, _signed = self.records.wait_for_manifest(self.swarm, self.authority, wait)
        manifest = SwarmManifest.from_dict(manifest, where=f"swarm manifest {name!r}").to_dict()
        history, rec = self._sync_for(name, manifest)
        now = dht_time()
        choice = history.look(None)
        chain = history.chain

        peers = peer_rows({peer: m.dict() for peer, m in rec.metrics().items()}, self.authority, now)

        from coldfusion_p2p.certs import Certificate

        entries = [e for record in rec.history().values() for e in record.entries]
        certs = []
        for e in entries:
            try:
                certs.append(Certificate.from_dict(e.cert))
            except ValueError:
                continue
        for cert in sorted(certs, key=lambda c: c.version):  # each one is accepted only if its parent is
            chain.add(cert)
        by_key: dict[tuple[int, str], dict] = {}
        for writer, record in rec.history().items():
            for e in record.entries:
                cert = chain.certificate(e.v, e.hash)
                # a row counts only from a member who signed the version: its times are that member's word,
                # its contributor count is the certificate's
                if cert is None or writer not in cert.signatures or e.parent != cert.parent:
                    continue
                by_key[(e.v, e.hash)] = {**{k: v for k, v in e.dict().items() if k != "cert"}, "contributors": len(cert.members)}
        times = {h: e.get("time") for (_, h), e in by_key.items()}
        rounds = []
        for (v, h), e in sorted(by_key.items(), key=lambda kv: (-kv[0][0], kv[0][1]))[:HISTORY_ROWS]:
            parent_time = times.get(e.get("parent"))
            rounds.append({
                "version": v, "hash": h, "parent": e.get("parent") or None, "contributors": e.get("contributors"),
                "signers": chain.signers(v, h), "time": e.get("time"), "round_s": e.get("round_s") or None,
                "interval_s": round(e["time"] - parent_time, 1) if isinstance(parent_time, (int, float)) else None,
            })
        top = (choice.version, choice.hash) if choice is not None else None
        if rounds and (top is None or rounds[0]["version"] > top[0]):  # a newer certified version whose makers all left
            top = (rounds[0]["version"], rounds[0]["hash"])
        newest = None
        if top is not None:
            online = {p["peer"] for p in peers}  # base records outlive metrics by a few seconds
            announced = rec.announced()
            newest = {"version": top[0], "hash": top[1], "signers": chain.signers(*top),
                      "holders": sum(1 for p, key in announced.items() if key == top and p in online)}
        admission = self._admission(name, manifest)
        return {
            "swarm": name,
            "authority": self.authority,
            "admission": admission.mode,
            **({"members": self._members(rec, admission)} if admission.private else {}),
            "model": manifest["model"]["source"],
            "v0_hash": manifest["model"]["v0_hash"],
            "min_group_size": manifest["round"]["min_group_size"],
            "time": now,
            "newest": newest,
            "rounds_completed": newest["version"] if newest else 0,
            "peers_online": len(peers),
            "contributors_online": sum(1 for p in peers if p["role"] == "contributor"),
            "peers": peers,
            "rounds": rounds,
        }

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def snapshot(records, swarm: str | None = None, wait: float = 15.0, authority: str | None = None) -> dict[str, Any]:
    """One snapshot (``StatusView.snapshot``) without keeping the verified chain."""
    view = StatusView(records, swarm, authority)
    try:
        return view.snapshot(wait)
    finally:
        view.close()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _progress_cell(p: dict) -> Any:
    if p["phase"] == "training" and p["total"]:
        bar = ProgressBar(total=p["total"], completed=min(p["step"], p["total"]), width=14)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(bar, Text(f"{p['step']}/{p['total']}"))
        return grid
    return Text("-", style="dim")


def peer_rows(metrics: dict[str, dict[str, Any]], authority: str | None, now: float) -> list[dict[str, Any]]:
    """The peers' rows of the view from their checked metrics records (peer id -> the record's fields): the bootstrap
    row only for the authority, each with its age, and with ``lane_missed_by``: how many other online peers said they
    could not use its direct lane in their last committed round (its port closed, or no lane served: its parts then
    went over p2pd, which is slower). Each is that peer's word, counted once per peer."""
    peers = []
    for peer, m in metrics.items():
        if m["role"] == "bootstrap" and peer != authority:
            continue  # only the authority is the swarm's bootstrap peer
        peers.append({**m, "age_s": round(max(0.0, now - m["t"]), 1)})
    peers.sort(key=lambda p: (p["role"] != "bootstrap", p.get("name") or "", p["peer"]))
    missed_by = collections.Counter(p for q in peers for p in set(q.get("lane_missed") or ()) if p != q["peer"])
    for p in peers:
        p["lane_missed_by"] = missed_by.get(p["peer"], 0)
    return peers


def _reach_cell(p: dict[str, Any]) -> Text:
    """direct, client or relayed; with ", no lane ×N" where N online peers said they could not use its direct lane in
    their last committed round (its lane port cannot be reached: open it, or choose one with ``--lane-port``)."""
    cell = Text(p.get("reach") or "-", style="yellow" if p.get("reach") == "client" else "")
    if p.get("lane_missed_by"):
        cell.append(f", no lane ×{p['lane_missed_by']}", style="yellow")
    return cell


def render(snap: dict[str, Any]) -> Group:
    """The live view: a header, the peers, the version history."""
    newest = snap.get("newest")
    head = Text()
    head.append(f"swarm {snap['swarm']!r}", style="bold")
    head.append(f"  model {snap.get('model')}  v0 {str(snap.get('v0_hash'))[:12]}\n", style="dim")
    if newest:
        head.append("newest base ")
        head.append(f"v{newest['version']}", style="bold green")
        head.append(f" ({newest['hash'][:12]}) held by {newest['holders']} online peer(s)   ")
    else:
        head.append("no base announced yet   ", style="yellow")
    head.append(f"{snap['peers_online']} peer(s) online ({snap['contributors_online']} contributing)   ")
    head.append(f"{snap['rounds_completed']} round(s) completed")
    if snap.get("admission", "open") != "open":
        members = snap.get("members") or []
        live = sum(1 for m in members if not m["expired"] and not m["revoked"])
        soon = min((m["expires"] for m in members if not m["expired"] and not m["revoked"]), default=None)
        head.append(f"\nadmission {snap['admission']}: {live} member(s) with a valid token"
                    + (f", the first expires {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(soon))}" if soon else ""), style="dim")
    contributors = snap["contributors_online"]
    if snap.get("min_group_size") and contributors < snap["min_group_size"]:
        head.append(f"\nfewer contributors online than the minimum group size ({snap['min_group_size']}): rounds wait", style="yellow")

    peers = Table(title="peers", title_justify="left", expand=False, pad_edge=False)
    for col, kw in (("name", {}), ("peer", {"style": "dim"}), ("reach", {}), ("phase", {}), ("base", {}), ("progress", {}), ("loss", {"justify": "right"}),
                    ("ex/s", {"justify": "right"}), ("device", {}), ("uptime", {"justify": "right"}), ("last round", {"justify": "right"})):
        peers.add_column(col, **kw)
    for p in snap["peers"]:
        stale = newest is not None and p["version"] < newest["version"]
        peers.add_row(  # names and devices are other peers' words: Text, never markup
            Text(p.get("name") or "-"), Text(p["peer"][:12]), _reach_cell(p),
            Text(p["phase"], style=PHASE_STYLE.get(p["phase"], "")),
            Text(f"v{p['version']}", style="yellow" if stale else ""), _progress_cell(p),
            f"{p['loss']:.4f}" if p.get("loss") is not None else "-",
            f"{p['examples_per_second']:.1f}" if p.get("examples_per_second") is not None else "-",
            Text(p["device"]), _duration(p["uptime"]), _duration(p.get("last_round_seconds")),
        )
    if not snap["peers"]:
        peers.add_row("(no peer is publishing metrics)", *[""] * 10)

    history = Table(title="versions", title_justify="left", pad_edge=False)
    for col in ("version", "hash", "contributors", "round", "since parent", "committed"):
        history.add_column(col)
    for r in snap["rounds"]:
        history.add_row(
            f"v{r['version']}", r["hash"][:12], str(r["contributors"] if r["contributors"] is not None else "-"),
            _duration(r.get("round_s")), _duration(r.get("interval_s")),
            time.strftime("%H:%M:%S", time.localtime(r["time"])) if r.get("time") else "-",
        )
    if not snap["rounds"]:
        history.add_row("(no round committed yet)", "", "", "", "", "")
    return Group(Panel(head, title="cfp2p status", title_align="left"), peers, history)
