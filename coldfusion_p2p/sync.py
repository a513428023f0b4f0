"""Catching up with the swarm: which announced base to move to, and getting it without trusting anyone.

An announced base is only a claim. This room fetches its certificate chain from a holder and checks
it back to a version this peer accepts (``certs.CertChain``); only certified versions take part in
the fork rule (``protocol.choose_base``). The chosen body is downloaded to a temporary file and
checked (hash, tensor layout, distance from this peer's base within what honest rounds allow)
before anything in the store changes; a version of ours is retired only after its replacement is
verified. A version that no holder serves correctly is skipped for a while and the peer carries on
with what it has: nothing another peer announces or serves can end this process.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from coldfusion_p2p import model as M
from coldfusion_p2p.certs import Certificate, CertChain, max_drift
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.fusion import delta_norm
from coldfusion_p2p.protocol import BaseChoice, Version, choose_base, to_verify
from coldfusion_p2p.store import VersionInfo, VersionStore

_STAT_KEYS = {"gather_s", "matchmaking_s", "allreduce_s", "verify_s", "verdicts_s", "store_s", "round_s", "group_size", "answered", "signers",
              "redo", "delta_norm", "part_kib"}
SKIP_SECONDS = 600.0  # how long a version whose holders served bad bytes or certificates is not tried again
RETRY_SECONDS = 15.0  # ... and one that no holder could transfer at all (a flaky link is no lie)
CERT_FETCH_TIMEOUT = 8.0
MAX_CERT_BYTES = 64 << 20  # a certificate chain is ~1-10 KB a version; more than this is an attack
MAX_VERSION_JUMP = 100_000  # an announced version this far ahead of ours is not worth a look
MAX_VERIFY_PER_LOOK = 3  # certificate chains fetched per look; more wait for the next look


@dataclass
class SkipList:
    """Versions that failed their checks, with why, until a deadline."""

    until: dict[Version, float] = field(default_factory=dict)
    why: dict[Version, str] = field(default_factory=dict)

    def add(self, key: Version, reason: str, seconds: float = SKIP_SECONDS) -> None:
        self.until[key] = time.monotonic() + seconds
        self.why[key] = reason

    def current(self) -> set[Version]:
        now = time.monotonic()
        for key in [k for k, t in self.until.items() if t < now]:
            del self.until[key]
            self.why.pop(key, None)
        return set(self.until)


@dataclass
class Held:
    """A base this peer holds: its version, hash, body, and the members who made it."""

    version: int
    hash: str
    body: M.BodyState
    contributors: list[str] = field(default_factory=list)


class HistorySync:
    """This peer's accepted history (a ``CertChain`` seeded from its store) and the moves to another base.

    ``fetch(peer, name, dest, max_bytes)`` downloads a blob (``swarm.fetch_blob``); ``announced()``
    reads the bases records; ``log`` and ``emit`` report.
    """

    def __init__(self, store: VersionStore, chain: CertChain, me: str, max_delta_ratio: float,
                 fetch: Callable[..., None], announced: Callable[[], dict], log: Callable[[str], None], strategy=None):
        from coldfusion_p2p.strategies import Strategy

        self.strategy = strategy or Strategy()
        # one round moves the base by at most the strategy's step factor (outer lr, momentum) times the
        # round's bound on the averaged delta
        self.store, self.chain, self.me = store, chain, me
        self.ratio = max_delta_ratio * self.strategy.step_factor()
        self.delta_ratio = max_delta_ratio
        self.fetch, self.announced, self.log = fetch, announced, log
        self.skip = SkipList()
        self.store_names: list[str] = []  # the body's tensor names, to keep from a holder's info
        self._last_note, self._quiet = -1e9, 0
        self.line_source: str | None = None  # the peer that keeps revocation lines' paths (the swarm's authority)
        self._line_tries: dict[str, float] = {}

    # ---------------------------------------------------------------- the local history
    def load_local(self) -> None:
        """Accept the certificates in the store, in order; stop (and say so) at the first that fails."""
        certs = []
        for raw in self.store.certificates():
            try:
                certs.append(Certificate.from_dict(raw))
            except ValueError as e:
                self.log(f"store certificate v{raw.get('version') if isinstance(raw, dict) else '?'} is malformed ({e}); ignoring it and later ones")
                break
        reason = self.chain.add_many(certs)
        if reason:
            self.log(f"store history stops where a certificate fails: {reason}")

    def latest_local(self) -> Held | None:
        """The newest version in the store whose body matches its hash and whose certificate is accepted."""
        for info in reversed(self.store.list()):
            if not self.chain.accepts(info.version, info.hash):
                continue
            try:
                body, info = self.store.load(info.version)
            except UserError as e:
                self.log(f"skipping {e}")
                continue
            return Held(info.version, info.hash, body, self._makers(info.version, info.hash))

    def _makers(self, version: int, body_hash: str) -> list[str]:
        cert = self.chain.certificate(version, body_hash)
        return sorted(cert.members) if cert else []

    # ---------------------------------------------------------------- looking at the swarm
    def _fetch_line_paths(self) -> None:
        """Versions wait for a revocation line whose version this peer has not linked (its branch may have lost
        a fork since, and nobody else serves it): fetch the line's path from the swarm's authority, which keeps
        it. At most once a minute per line; the path is checked like any holder's answer."""
        if self.line_source is None or not self.chain.waiting():
            return
        for version, body_hash, digest in set(self.chain.unlinked_lines().values()):
            if time.monotonic() < self._line_tries.get(digest, -1e9) + 60.0:
                continue
            self._line_tries[digest] = time.monotonic()
            try:
                certs, _problem, _transport = self._fetch_cert_list(self.line_source, f"line/{digest}", version)
            except Exception:  # noqa: BLE001 - whatever went wrong, it is no reason to stop this peer
                certs = None
            if certs is not None:  # else the authority is down or does not keep it: again in a minute
                self.chain.add_many(certs, target=(version, body_hash))

    def look(self, current: Version | None) -> BaseChoice | None:
        """The base the fork rule picks over certified announcements, if it is not ``current``."""
        self._fetch_line_paths()
        announced = self.announced()
        floor = current or (0, "")
        for key, holders in to_verify(announced, self.chain.accepts, floor, self.me, self.skip.current())[:MAX_VERIFY_PER_LOOK]:
            if key[0] - floor[0] > MAX_VERSION_JUMP:
                self.skip.add(key, f"v{key[0]} is implausibly far ahead of v{floor[0]}")
                continue
            try:
                self._verify_chain(key, holders, floor[0])
            except Exception as e:  # noqa: BLE001 - whatever a holder sent, it is no reason to stop this peer
                self.skip.add(key, f"checking its certificates failed: {type(e).__name__}: {str(e)[:120]}")

        def signers(v: int, h: str) -> int | None:
            return self.chain.signers(v, h) if self.chain.accepts(v, h) else None

        return choose_base(announced, signers, current, self.me, self.skip.current())

    def newer_exists(self, current: Version) -> bool:
        choice = self.look(current)
        return choice is not None and choice.version > current[0]

    def _verify_chain(self, key: Version, holders: tuple[str, ...], have: int) -> None:
        """Fetch ``key``'s certificates from a holder and accept them, or skip ``key``."""
        version, body_hash = key
        problems, lied = [], False
        for peer in holders[:3]:
            for start in ((max(1, have - 5), 1) if have > 6 else (1,)):
                certs, problem, transport = self._fetch_certs(peer, start, version)
                if certs is None:
                    problems.append(problem)
                    lied |= not transport
                    break
                reason = self.chain.add_many(certs, target=key)
                if self.chain.links(version, body_hash) and not self.chain.accepts(version, body_hash):
                    self._fetch_line_paths()  # it waits for a revocation line's path: ask for it now
                    if not self.chain.accepts(version, body_hash):
                        self.skip.add(key, "it waits for the version a revocation line names", RETRY_SECONDS)
                        return
                if self.chain.accepts(version, body_hash):
                    return
                lied = True
                problems.append(f"{peer[:12]}: {reason or 'its certificates do not lead to this version'}")
        self.skip.add(key, "; ".join(problems)[:300] or "no holder", SKIP_SECONDS if lied else RETRY_SECONDS)
        self._note(f"not accepting the announced v{version} ({body_hash[:12]}): {self.skip.why[key][:200]}")

    def _note(self, line: str) -> None:
        """Log refusals at most every 10 s, so that a stream of bogus announcements cannot flood the log."""
        now = time.monotonic()
        if now - self._last_note < 10.0:
            self._quiet += 1
            return
        extra = f" (and {self._quiet} more refusal(s) since the last line)" if self._quiet else ""
        self._last_note, self._quiet = now, 0
        self.log(line + extra)

    def _fetch_certs(self, peer: str, start: int, version: int) -> tuple[list[Certificate] | None, str, bool]:
        """(certificates, problem, whether the problem was the transfer rather than the content)."""
        return self._fetch_cert_list(peer, f"certs/{start}", version - start)

    def _fetch_cert_list(self, peer: str, name: str, count: int) -> tuple[list[Certificate] | None, str, bool]:
        """A blob holding a JSON list of about ``count`` certificates: (certificates, problem, whether the problem
        was the transfer rather than the content)."""
        from coldfusion_p2p.swarm import BlobError

        with tempfile.TemporaryDirectory(dir=self.store.root, prefix=".certs-") as tmp:
            dest = Path(tmp) / "certs.json"
            try:
                self.fetch(peer, name, dest, max_bytes=min(MAX_CERT_BYTES, (count + 2) * 300_000), timeout=CERT_FETCH_TIMEOUT)
                raw = json.loads(dest.read_text())
                if not isinstance(raw, list):
                    raise ValueError("not a list")
                return [Certificate.from_dict(c) for c in raw], "", False
            except BlobError as e:
                return None, str(e), True
            except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
                return None, f"{peer[:12]} served malformed certificates ({type(e).__name__}: {str(e)[:80]})", False

    # ---------------------------------------------------------------- moving to a base
    def acquire(self, choice: BaseChoice, current: Held | None, on_bytes=None) -> Held | None:
        """Download, check and store ``choice``; None (and the version skipped) if no holder serves it right."""
        key = (choice.version, choice.hash)
        existing = self.store.read_info(choice.version)
        if existing is not None and existing.hash == choice.hash:
            try:
                body, info = self.store.load(choice.version)
                self._adopt_lineage(choice)
                return Held(choice.version, choice.hash, body, self._makers(*key))
            except UserError as e:
                self.log(f"{e}; downloading it again")
        tmpdir = Path(tempfile.mkdtemp(dir=self.store.root, prefix=".dl-"))
        try:
            body, problems, lied = None, [], False
            for peer in choice.holders:
                dest = tmpdir / f"body-{len(problems)}.safetensors"
                try:
                    self.fetch(peer, f"version/{choice.version}", dest, max_bytes=self._max_body_bytes(current),
                               timeout=max(120.0, self._max_body_bytes(current) / 2e6), on_bytes=on_bytes)
                except Exception as e:  # noqa: BLE001 - BlobError and anything else: try the next holder
                    problems.append(str(e)[:160])
                    continue
                try:
                    reason, body = self._check_body(dest, choice, current)
                except Exception as e:  # noqa: BLE001 - bytes that break the checker are bad bytes
                    reason, body = f"its body could not be checked ({type(e).__name__}: {str(e)[:80]})", None
                if reason is None:
                    break
                problems.append(f"{peer[:12]}: {reason}")
                self.log(f"holder {peer[:12]} served a bad version/{choice.version} ({reason}); trying another")
                body, lied = None, True
            if body is None:
                wait = SKIP_SECONDS if lied else RETRY_SECONDS
                self.skip.add(key, "; ".join(problems)[:300] or "no holder", wait)
                self.log(f"no holder served a valid v{choice.version} ({choice.hash[:12]}: {problems[0][:120] if problems else 'no holder'}); "
                         f"staying on {f'v{current.version}' if current else 'nothing yet'} and not trying it again for {wait:.0f}s")
                return None
            self.store_names = list(body)
            info = self._info(choice, tmpdir)
            # only now that its replacement is verified; and before the certificates change, so that a stop anywhere
            # in between (SIGTERM) never leaves a stored body under another version's certificate
            if existing is not None:
                self.log(f"retired our v{choice.version} ({existing.hash[:12]}) to {self.store.retire(choice.version)}")
            self._adopt_lineage(choice)
            self.store.save(body, info)
            return Held(choice.version, choice.hash, body, self._makers(*key))
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _max_body_bytes(self, current: Held | None) -> int:
        if current is not None:
            path = self.store.body_path(current.version)
            if path.is_file():
                # plus the strategy's state a base may carry (nesterov: one float32 per fused value)
                state = 4 * self.strategy.state_copies * sum(current.body[n].numel() for n in M.averaged_names(current.body))
                return int(path.stat().st_size * 1.05) + state + (1 << 20)
        return 8 << 30  # a newcomer without a base: the hash check still decides

    def _check_body(self, path: Path, choice: BaseChoice, current: Held | None) -> tuple[str | None, M.BodyState | None]:
        try:
            body = M.load_tensors(path)
        except UserError as e:
            return str(e), None
        got = M.hash_body(body)
        if got != choice.hash:
            return f"hash {got[:12]} != {choice.hash[:12]}", None
        if current is None:
            return None, body
        from coldfusion_p2p.strategies import model_tensors

        ours = {k: (tuple(v.shape), v.dtype) for k, v in model_tensors(current.body).items()}
        theirs = {k: (tuple(v.shape), v.dtype) for k, v in model_tensors(body).items()}
        if ours != theirs:
            return "its tensors are not this model's (names, shapes or dtypes differ)", None
        names = M.averaged_names(current.body)
        # the strategy's state (momentum) rides in the base: honest rounds bound it too
        problem = self.strategy.state_problem(body, names, self.delta_ratio * delta_norm([body[n].float() for n in names]) * 1.5)
        if problem is not None:
            return problem, None
        ancestor = self._common_ancestor(choice, current)
        reference, steps = current, choice.version - ancestor
        if ancestor != current.version:  # a fork: measure from the last version both histories share, if we hold it
            try:
                anc_body, anc_info = self.store.load(ancestor)
                reference = Held(ancestor, anc_info.hash, anc_body)
            except UserError:
                steps += current.version - ancestor  # only ours to go by: the rounds on both sides count
        base_norm = delta_norm([reference.body[n].float() for n in names])
        bound = max_drift(base_norm, self.ratio, steps) * 1.001 + 1e-6
        moved = delta_norm([body[n].float() - reference.body[n].float() for n in names])
        if moved > bound:
            return (f"it is {moved:.4g} away from our v{reference.version}, more than {steps} honest round(s) can move it "
                    f"({bound:.4g})"), None
        return None, body

    def _common_ancestor(self, choice: BaseChoice, current: Held) -> int:
        theirs = {(c.version, c.hash) for c in self.chain.lineage(choice.version, choice.hash)} | {(0, self.chain.v0_hash)}
        version, body_hash = current.version, current.hash
        while version > 0 and (version, body_hash) not in theirs:
            cert = self.chain.certificate(version, body_hash)
            if cert is None:
                return 0
            version, body_hash = version - 1, cert.parent
        return version

    def _info(self, choice: BaseChoice, tmpdir: Path) -> VersionInfo:
        cert = self.chain.certificate(choice.version, choice.hash)
        info = VersionInfo(choice.version, choice.hash, parent=cert.parent if cert else None,
                           contributors=sorted(cert.members) if cert else [])
        path = tmpdir / "info.json"
        for peer in choice.holders[:2]:
            try:
                self.fetch(peer, f"info/{choice.version}", path, max_bytes=1 << 20, timeout=10.0)
                theirs = json.loads(path.read_text())
                if not (isinstance(theirs, dict) and (theirs.get("version"), theirs.get("hash"), theirs.get("parent")) == (info.version, info.hash, info.parent)):
                    continue
                # a courtesy from one holder: only plain, finite numbers are kept, and names of our own tensors
                created = theirs.get("created")
                created = float(created) if type(created) in (int, float) and math.isfinite(float(created)) else time.time()
                stats = theirs.get("round_stats") if isinstance(theirs.get("round_stats"), dict) else {}
                stats = {k: float(v) for k, v in stats.items() if k in _STAT_KEYS and type(v) in (int, float) and math.isfinite(float(v))}
                names = set(self.store_names or ())
                tensors = [n for n in theirs.get("averaged_tensors", []) if isinstance(n, str) and n in names] if isinstance(theirs.get("averaged_tensors"), list) else []
                return VersionInfo(info.version, info.hash, info.parent, info.contributors, created, tensors, stats)
            except Exception:  # noqa: BLE001 - the body is verified; its history record is a courtesy
                continue
        return info

    def _adopt_lineage(self, choice: BaseChoice) -> None:
        """Make the store's certificates the chosen version's lineage, retiring bodies of another history."""
        lineage = self.chain.lineage(choice.version, choice.hash)
        keep = {(c.version, c.hash) for c in lineage}
        for info in self.store.list():
            if info.version > 0 and info.version != choice.version and (info.version, info.hash) not in keep:
                self.log(f"retired our v{info.version} ({info.hash[:12]}), not in the history of v{choice.version}, "
                         f"to {self.store.retire(info.version)}")
        self.store.save_certificates([c.to_dict() for c in lineage])

    def record_commit(self, cert: Certificate) -> str | None:
        """Accept and store the certificate of a version this peer just made; None if accepted."""
        reason = self.chain.add(cert)
        if reason is None:
            self.store.save_certificates([cert.to_dict()])
        return reason
