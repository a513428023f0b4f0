"""Version certificates: what makes a base version legitimate, with no networking.

A verified round proves that its members hold the same bytes, not that the bytes came from a round
on the parent. So every member of a committed round signs (swarm, v, parent hash, new hash, group
id, members) with its libp2p identity key (RSA; the key's hash is its peer id). A version counts
only with valid signatures from at least ``min_signers`` of its listed members, and only if its
parent is a version already accepted: a chain back to v0, which the swarm manifest names.

Signatures use the scheme hivemind signs DHT records with (RSA-PSS, SHA-256, base64), so the same
identity key serves both; verification here needs only ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CERT_KIND = "cfp2p-certificate/1"
MAX_MEMBERS = 256
_HASH = re.compile(r"^[0-9a-f]{64}$")
_GROUP = re.compile(r"^[0-9a-f]{2,128}$")
_PEER = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,60}$")
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class Signer(Protocol):
    """A peer's identity: its ssh-rsa public key and a signing function (hivemind's RSAPrivateKey fits)."""

    public_key: str

    def sign(self, data: bytes) -> str: ...


def _base58(raw: bytes) -> str:
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """The libp2p peer id (base58) of an ssh-rsa public key: sha2-256 multihash of its protobuf form.

    Raises ValueError for anything that is not an RSA public key.
    """
    try:
        key = serialization.load_ssh_public_key(ssh_public_key)
    except Exception as e:  # noqa: BLE001 - cryptography raises several kinds for junk
        raise ValueError(f"not an ssh public key: {e}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _base58(b"\x12\x20" + hashlib.sha256(rsa_key_message(der)).digest())


def rsa_key_message(der: bytes) -> bytes:
    """libp2p's crypto.pb PublicKey or PrivateKey {key_type: RSA (0), data: der}, serialized by hand."""
    return b"\x08\x00\x12" + _varint(len(der)) + der


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def verify_signature(public_key: str, data: bytes, signature: str) -> bool:
    """True when ``signature`` (base64) is ``public_key``'s RSA-PSS signature of ``data``; never raises."""
    try:
        key = serialization.load_ssh_public_key(public_key.encode())
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(base64.b64decode(signature, validate=True), data, RSA_PSS, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    except Exception:  # noqa: BLE001 - a malformed key or signature is simply not valid
        return False


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Certificate:
    """A base version and the signatures of the members of the round that made it."""

    swarm: str
    version: int
    parent: str
    hash: str
    group_id: str
    members: tuple[str, ...]
    signatures: dict[str, tuple[str, str]] = field(default_factory=dict, compare=False)  # peer -> (public key, signature)
    tokens: dict[str, dict] = field(default_factory=dict, compare=False)  # private swarms: signer -> its membership token

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(sorted(self.members)))

    def payload(self) -> bytes:
        """What each member signs: everything but the signatures."""
        return canonical({"kind": CERT_KIND, "swarm": self.swarm, "version": self.version, "parent": self.parent,
                          "hash": self.hash, "group_id": self.group_id, "members": sorted(self.members)})

    def with_signature(self, peer: str, public_key: str, signature: str) -> "Certificate":
        sigs = dict(self.signatures)
        sigs[peer] = (public_key, signature)
        return Certificate(self.swarm, self.version, self.parent, self.hash, self.group_id, self.members, sigs, self.tokens)

    def with_tokens(self, tokens: dict[str, dict]) -> "Certificate":
        """The same certificate carrying its signers' membership tokens (evidence a private swarm checks)."""
        kept = {p: t for p, t in tokens.items() if p in self.signatures and isinstance(t, dict)}
        return Certificate(self.swarm, self.version, self.parent, self.hash, self.group_id, self.members, self.signatures, kept)

    def to_dict(self) -> dict:
        return {"kind": CERT_KIND, "swarm": self.swarm, "version": self.version, "parent": self.parent, "hash": self.hash,
                "group_id": self.group_id, "members": sorted(self.members),
                "signatures": {p: {"key": k, "sig": s} for p, (k, s) in sorted(self.signatures.items())},
                **({"tokens": {p: t for p, t in sorted(self.tokens.items())}} if self.tokens else {})}

    @classmethod
    def from_dict(cls, data) -> "Certificate":
        """Parse strictly; raises ValueError on anything malformed (types, sizes, formats)."""
        if not isinstance(data, dict) or data.get("kind") != CERT_KIND:
            raise ValueError("not a certificate")
        fields = {"kind", "swarm", "version", "parent", "hash", "group_id", "members", "signatures"}
        if set(data) != fields and set(data) != fields | {"tokens"}:
            raise ValueError("certificate has missing or extra fields")
        swarm, version, parent, new, group, members, sigs = (data[k] for k in
                                                             ("swarm", "version", "parent", "hash", "group_id", "members", "signatures"))
        if not (isinstance(swarm, str) and 0 < len(swarm) <= 48):
            raise ValueError("bad swarm name")
        if type(version) is not int or version < 1:
            raise ValueError("bad version")
        if not (isinstance(parent, str) and _HASH.match(parent) and isinstance(new, str) and _HASH.match(new)):
            raise ValueError("bad hash")
        if not (isinstance(group, str) and _GROUP.match(group)):
            raise ValueError("bad group id")
        if not (isinstance(members, list) and 0 < len(members) <= MAX_MEMBERS and all(isinstance(m, str) and _PEER.match(m) for m in members)
                and len(set(members)) == len(members)):
            raise ValueError("bad member list")
        if not isinstance(sigs, dict) or len(sigs) > len(members):
            raise ValueError("bad signatures")
        parsed = {}
        for peer, item in sigs.items():
            if not (isinstance(item, dict) and set(item) == {"key", "sig"} and isinstance(item["key"], str)
                    and isinstance(item["sig"], str) and len(item["key"]) < 2100 and len(item["sig"]) < 2100):
                raise ValueError("bad signature entry")
            parsed[peer] = (item["key"], item["sig"])
        tokens = data.get("tokens", {})
        if not (isinstance(tokens, dict) and set(tokens) <= set(parsed) and all(isinstance(t, dict) and len(t) <= 16 for t in tokens.values())):
            raise ValueError("bad tokens")
        return cls(swarm, version, parent, new, group, tuple(members), parsed, dict(tokens))


def sign_certificate(cert: Certificate, peer: str, signer: Signer) -> str:
    """This member's signature on ``cert`` (base64)."""
    sig = signer.sign(cert.payload())
    return sig.decode() if isinstance(sig, bytes) else sig


@dataclass(frozen=True)
class CertCheck:
    ok: bool
    reason: str = ""
    signers: tuple[str, ...] = ()


def check_certificate(cert: Certificate, swarm: str, min_signers: int, admitted=None) -> CertCheck:
    """Valid signatures of listed members (peer id = hash of the signing key), at least ``min_signers``.

    ``admitted(peer, token, version) -> bool``, when given, restricts whose signatures count (private
    swarms: the token the certificate carries for that signer must have been issued for it, and the
    signer not revoked before this version).
    """
    if cert.swarm != swarm:
        return CertCheck(False, f"certificate is for swarm {cert.swarm!r}")
    payload = cert.payload()
    signers = []
    for peer, (key, sig) in cert.signatures.items():
        if peer not in cert.members or (admitted is not None and not admitted(peer, cert.tokens.get(peer), cert.version)):
            continue
        try:
            if peer_id_of_public_key(key.encode()) != peer:
                continue
        except ValueError:
            continue
        if verify_signature(key, payload, sig):
            signers.append(peer)
    if len(signers) < min_signers:
        return CertCheck(False, f"{len(signers)} valid member signature(s), the swarm needs {min_signers}", tuple(sorted(signers)))
    return CertCheck(True, "", tuple(sorted(signers)))


def lineage_digest(v0_hash: str, hashes: Iterable[str]) -> str:
    """One hash for a path of versions: v0's hash, then each version's body hash in order (v1 first)."""
    digest = hashlib.sha256(v0_hash.encode()).hexdigest()
    for body_hash in hashes:
        digest = hashlib.sha256((digest + body_hash).encode()).hexdigest()
    return digest


def signed_by_any(peers):
    """``suspect`` for ``CertChain.recheck``: certificates any of ``peers`` signed (a revocation's)."""
    peers = frozenset(peers)
    return lambda cert: any(p in peers for p in cert.signatures)


MAX_PENDING = 4096  # versions kept waiting for a revocation line's version to show up


class CertChain:
    """The certified versions this peer accepts: v0 (from the manifest), then each certificate whose
    parent is already accepted. Forks are kept side by side; the fork rule picks among them.

    ``lines() -> {revoked peer: (version, hash, lineage digest)}`` (private swarms, ``Admission.lines``): a revoked
    peer's signature counts only on the line's version and its ancestors. A certificate that needs such
    a signature is linked (its descendants can be checked) but not accepted until the line's version
    is linked through the very path the line's digest names and the certificate lies on it; once that
    path is known, one off it is refused for good. So a revoked key and one accomplice gain nothing by signing new
    versions below its line, and a newcomer still accepts the history the key helped make.
    """

    def __init__(self, swarm: str, v0_hash: str, min_signers: int, admitted=None, lines=None):
        self.swarm, self.v0_hash, self.min_signers, self.admitted = swarm, v0_hash, min_signers, admitted
        self.lines = lines
        self._certs: dict[tuple[int, str], Certificate] = {}
        self._signers: dict[tuple[int, str], int] = {(0, v0_hash): 0}  # linked versions -> signatures counted
        self._plain: dict[tuple[int, str], int] = {}  # -> signatures that count without any revocation line
        self._leans: dict[tuple[int, str], frozenset] = {}  # -> revoked signers counted on the strength of their line
        self._valid: dict[tuple[int, str], frozenset[str]] = {}  # -> the members whose signatures on it are valid
        self._pending: set[tuple[int, str]] = set()  # linked, not accepted: waiting for a line's version

    def accepts(self, version: int, body_hash: str) -> bool:
        key = (version, body_hash)
        return key in self._signers and key not in self._pending

    def signers(self, version: int, body_hash: str) -> int:
        return self._signers.get((version, body_hash), 0) if self.accepts(version, body_hash) else 0

    def certificate(self, version: int, body_hash: str) -> Certificate | None:
        return self._certs.get((version, body_hash)) if self.accepts(version, body_hash) else None

    def recent_signers(self, version: int, body_hash: str, depth: int) -> frozenset[str]:
        """The members whose signatures are valid on (version, hash) or on its ``depth - 1`` nearest ancestors: the
        peers that made this line lately (``protocol.Newcomers``). Empty for v0 and for a version not linked."""
        keys = itertools.islice(self._down((version, body_hash)), depth)
        return frozenset().union(*(self._valid.get(key, frozenset()) for key in keys))

    def links(self, version: int, body_hash: str) -> bool:
        """Whether (version, hash) is linked: accepted, or waiting for a revocation line's version."""
        return (version, body_hash) in self._signers

    def waiting(self) -> int:
        """How many linked versions wait for a revocation line's version."""
        return len(self._pending)

    def unlinked_lines(self) -> dict:
        """Revoked peer -> its line (version, hash, digest), for lines whose path this chain has not linked."""
        return {peer: line for peer, line in self._current_lines().items() if self._line_path(*line) is None}

    def _down(self, key: tuple[int, str]):
        """``key`` and its linked ancestors, newest first (v0 not included)."""
        while key in self._certs:
            yield key
            key = (key[0] - 1, self._certs[key].parent)

    def _line_path(self, version: int, body_hash: str, digest: str) -> set | None:
        """The versions of a line's path when this chain links (version, hash) through the very path ``digest``
        names; else None (not linked yet, or reached through other parents: certificates forged for the same
        versions, on which the revoked key must not count)."""
        if (version, body_hash) not in self._signers:
            return None
        walk = list(self._down((version, body_hash)))  # a linked version's ancestors are linked, down to v0
        return set(walk) if lineage_digest(self.v0_hash, [h for _, h in reversed(walk)]) == digest else None

    def _current_lines(self) -> dict[str, tuple[int, str]]:
        return dict(self.lines()) if self.lines is not None else {}

    def _link(self, cert: Certificate, lines: dict) -> str | None:
        key = (cert.version, cert.hash)
        if key in self._signers:
            return None
        if (cert.version - 1, cert.parent) not in self._signers:
            return f"v{cert.version}'s parent {cert.parent[:12]} is not a version this peer accepts"
        result = check_certificate(cert, self.swarm, self.min_signers, self.admitted)
        if not result.ok:
            return f"v{cert.version} ({cert.hash[:12]}): {result.reason}"
        leaning = frozenset(p for p in result.signers if p in lines)
        self._certs[key] = cert
        self._signers[key] = len(result.signers)
        self._plain[key] = len(result.signers) - len(leaning)
        self._valid[key] = frozenset(result.signers)
        if leaning:
            self._leans[key] = leaning
        return None

    def _settle(self, lines: dict) -> list[tuple[int, str]]:
        """Recompute which linked versions wait for a line; drop (and return) those that never can be accepted:
        they need a revoked signature, the line's version is known, and they are not on its lineage."""
        self._pending = set()
        if not self._leans:
            return []
        # a line whose path is not linked (not yet, or only through forged parents) is unknown: what leans on it waits
        on_line = {peer: self._line_path(*line) for peer, line in lines.items()}
        doomed: set[tuple[int, str]] = set()
        for key in sorted(self._certs):
            parent = (key[0] - 1, self._certs[key].parent)
            if parent in doomed:
                doomed.add(key)
                continue
            leaning = self._leans.get(key, frozenset())
            counted = self._plain[key] + sum(1 for p in leaning if on_line.get(p) and key in on_line[p])
            if counted >= self.min_signers:
                if parent in self._pending:
                    self._pending.add(key)
                continue
            if all(on_line.get(p) is not None for p in leaning):
                doomed.add(key)  # every line it leans on is known, and it is not on enough of them
            else:
                self._pending.add(key)
        for key in doomed:
            self._forget(key)
        return sorted(doomed)

    def _forget(self, key: tuple[int, str]) -> None:
        del self._certs[key], self._signers[key], self._plain[key]
        self._valid.pop(key, None)
        self._leans.pop(key, None)
        self._pending.discard(key)

    def add(self, cert: Certificate) -> str | None:
        """Accept ``cert``; None when accepted, linked waiting for a revocation line (``accepts`` says which),
        or already known; else why not."""
        lines = self._current_lines()
        key = (cert.version, cert.hash)
        known = key in self._signers
        reason = self._link(cert, lines)
        if reason is None and not known and self._leans:  # nothing new linked: nothing to settle
            if key in self._settle(lines):
                return f"v{cert.version} ({cert.hash[:12]}) needs a revoked peer's signature off the history its revocation kept"
            self._bound_waiting(key)
            if key not in self._certs:
                return f"v{cert.version} ({cert.hash[:12]}): too many versions already wait for a revocation line"
        return reason

    def _bound_waiting(self, keep: tuple[int, str] | None) -> None:
        """At most MAX_PENDING versions wait for a line: beyond that the newest waiting ones are let go (each comes
        back when its holders are asked again), except ``keep`` and its lineage, the one this peer asked for."""
        if len(self._pending) <= MAX_PENDING:
            return
        below = set(self._down(keep)) if keep is not None else set()
        for gone in sorted(self._pending - below, reverse=True):  # descendants before their parents
            if len(self._pending) <= MAX_PENDING:
                break
            if gone in self._certs:
                self._forget(gone)

    def add_many(self, certs: Iterable[Certificate], target: tuple[int, str] | None = None) -> str | None:
        """Accept certificates in version order; stops at the first refused one and says why.

        ``target`` (version, hash): only the certificates on its lineage within ``certs`` are looked at (a
        holder's answer for one version: whatever else it sent is no business of this peer's chain)."""
        certs = list(certs)
        if target is not None:
            by_key: dict[tuple[int, str], Certificate] = {}
            for cert in certs:
                by_key.setdefault((cert.version, cert.hash), cert)
            path, key = [], target
            while key in by_key and key not in self._signers and len(path) <= len(certs):
                path.append(by_key[key])
                key = (key[0] - 1, by_key[key].parent)
            certs = path
        lines = self._current_lines()
        reason, linked, seen = None, 0, set()
        for cert in sorted(certs, key=lambda c: c.version):
            key = (cert.version, cert.hash)
            if key in seen or key in self._signers:
                continue
            seen.add(key)
            reason = self._link(cert, lines)
            if reason is not None:
                break
            linked += 1
        if self._leans and linked:
            doomed = [k for k in self._settle(lines) if k in seen]  # others dropped now were never part of this batch
            if doomed and reason is None:
                v, h = doomed[0]
                reason = f"v{v} ({h[:12]}) needs a revoked peer's signature off the history its revocation kept"
            self._bound_waiting(target)
        return reason

    def recheck(self, suspect=None, dry_run: bool = False) -> list[tuple[int, str]]:
        """Check the accepted certificates again (the rules behind ``admitted`` or ``lines`` changed: a revocation)
        and drop those that fail now, with every version built on them; the dropped versions that were accepted
        before, oldest first. One that needs a line whose version this peer has not seen yet is kept, waiting
        (not accepted, not dropped). ``dry_run``: only say which (any thread; changes nothing).

        ``suspect(cert) -> bool``, when given, picks the certificates worth checking again (for example
        those a revoked peer signed); the others keep their verdict.
        """
        before = {k for k in self._certs if k not in self._pending}
        fresh = CertChain(self.swarm, self.v0_hash, self.min_signers, self.admitted, self.lines)
        lines = fresh._current_lines()
        for key in sorted(self._certs):
            cert = self._certs[key]
            if (key[0] - 1, cert.parent) not in fresh._signers:
                continue
            if suspect is None or suspect(cert):
                fresh._link(cert, lines)
            else:  # keeps its verdict, and its count
                fresh._certs[key], fresh._signers[key] = cert, self._signers[key]
                fresh._plain[key] = self._plain[key]
                if key in self._leans:
                    fresh._leans[key] = self._leans[key]
        fresh._settle(lines)  # versions waiting for a line's version (a line ahead of this peer) are kept, waiting
        dropped = sorted(k for k in before if k not in fresh._certs)
        if not dry_run:
            self._certs, self._signers, self._plain = fresh._certs, fresh._signers, fresh._plain
            self._leans, self._pending = fresh._leans, fresh._pending
        return dropped

    def lineage(self, version: int, body_hash: str) -> list[Certificate]:
        """The certificates from v1 to (version, hash), oldest first."""
        out = []
        while version > 0:
            cert = self._certs.get((version, body_hash))
            if cert is None or (version, body_hash) in self._pending:
                raise KeyError(f"v{version} ({body_hash[:12]}) is not accepted")
            out.append(cert)
            version, body_hash = version - 1, cert.parent
        return out[::-1]


def max_drift(base_norm: float, ratio: float, steps: int) -> float:
    """The furthest ``steps`` honest rounds can move a body of norm ``base_norm``.

    Each round moves the body by at most ``ratio`` times its norm, so the norm grows by at most
    (1 + ratio) per round and the distance after k rounds is at most ``norm * ((1 + ratio)^k - 1)``.
    """
    return base_norm * ((1.0 + ratio) ** max(steps, 0) - 1.0)
