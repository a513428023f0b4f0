"""Membership of a private swarm: tokens the swarm's authority signs, and who they admit. No networking.

A token says "the key K (peer id P) may take part in swarm S until time T", signed by the swarm's
authority (the bootstrap peer's identity key, whose peer id every member pins). It is bound to the
member's key: every path that checks it also knows the caller's peer id, which libp2p authenticates
on each connection, and a token whose key does not hash to that peer id is refused, so a stolen
token is useless without the key. The swarm's signed manifest carries the admission mode
(``open``, ``members`` or ``enroll``) and a list of revoked peer ids.

Expiry gates access (DHT calls, rounds, downloads) but not history: a certificate's signature
counts if its signer's token was issued by the authority for this swarm, so the versions a member
co-signed before its token expired stay certified. Revocation also withdraws the key's signatures,
but only from a point in the history on. Certificates carry no trustworthy time, so the manifest's
``signed_until`` pins, for each revoked peer, one certified version (number and body hash, the head
of the history the bootstrap peer followed when it published the revocation): the revoked key's
signature counts on that version and its ancestors, and on nothing else (``CertChain`` walks the
lineage). A version number alone would not do: the revoked key and one accomplice could still sign
new versions below it, and a forged high number would keep the key signing for ever. Every peer, a
newcomer included, draws the same line. A revoked peer missing from ``signed_until`` has every
signature withdrawn (a stolen key).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from coldfusion_p2p.certs import Signer, canonical, peer_id_of_public_key, verify_signature

TOKEN_KIND = "cfp2p-token/1"
CLOCK_SLACK = 300.0  # seconds: peers' clocks may differ by a few minutes
MODES = ("open", "members", "enroll")
MAX_TOKEN_BYTES = 4096
_FIELDS = {"kind", "swarm", "name", "member", "key", "authority", "issued", "expires", "id", "signature"}
_KEY = re.compile(r"^ssh-rsa [A-Za-z0-9+/=]{100,2000}$")
_PEER = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,60}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,40}$")
_ID = re.compile(r"^[0-9a-f]{16,64}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenError(ValueError):
    """A token that cannot be used; the message is one line for the user or the refusing peer's log."""


def parse_duration(text: str) -> float:
    """Seconds in '30d', '12h', '90m', '45s', '2w' (a bare number is seconds)."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _payload(token: dict) -> bytes:
    return canonical({k: v for k, v in token.items() if k != "signature"})


def peer_of_key(public_key: str) -> str:
    """The peer id of an ssh-rsa public key; TokenError if it is not one."""
    if not isinstance(public_key, str) or not _KEY.match(public_key):
        raise TokenError("not an ssh-rsa public key")
    try:
        return peer_id_of_public_key(public_key.encode())
    except ValueError as e:
        raise TokenError(str(e)) from None


def make_token(authority: Signer, swarm: str, name: str, member_key: str, lifetime: float, now: float | None = None) -> dict:
    """A membership token for ``member_key`` in ``swarm``, valid for ``lifetime`` seconds, signed by ``authority``."""
    if not _NAME.match(name):
        raise TokenError(f"member name {name!r} must be 1-40 letters, digits or . _ @ -")
    now = time.time() if now is None else now
    token = {"kind": TOKEN_KIND, "swarm": swarm, "name": name, "member": peer_of_key(member_key.strip()), "key": member_key.strip(),
             "authority": authority.public_key, "issued": float(now), "expires": float(now + lifetime), "id": secrets.token_hex(8)}
    signature = authority.sign(_payload(token))
    token["signature"] = signature.decode() if isinstance(signature, bytes) else signature
    return token


def parse_token(data: Any) -> dict:
    """A token's fields, checked for exact types and formats (not yet for validity); raises TokenError."""
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_TOKEN_BYTES:
            raise TokenError("the token is too large")
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            raise TokenError("the token is not JSON") from None
    if not isinstance(data, dict) or data.get("kind") != TOKEN_KIND or set(data) != _FIELDS:
        raise TokenError("not a cfp2p membership token")
    strings = ("swarm", "name", "member", "key", "authority", "id", "signature")
    if not all(type(data[k]) is str for k in strings) or not all(type(data[k]) is float for k in ("issued", "expires")):
        raise TokenError("the token's fields have the wrong types")
    if not (_KEY.match(data["key"]) and _KEY.match(data["authority"]) and _PEER.match(data["member"]) and _NAME.match(data["name"])
            and _ID.match(data["id"]) and 0 < len(data["swarm"]) <= 48 and len(data["signature"]) < 2100):
        raise TokenError("the token's fields are malformed")
    return data


def token_problem(token: Any, swarm: str, authority: str, now: float, peer: str | None = None, revoked: Iterable[str] = (),
                  check_expiry: bool = True) -> str | None:
    """Why ``token`` does not admit ``peer`` (the caller's authenticated peer id) to ``swarm``, or None.

    ``authority`` is the peer id whose signature a token must carry. ``check_expiry=False`` is for
    history (certificates): a token that was valid keeps counting after it expires.
    """
    if token is None or token == "" or token == {}:
        return "no membership token"
    try:
        token = parse_token(token)
    except TokenError as e:
        return str(e)
    if token["swarm"] != swarm:
        return f"the token is for swarm {token['swarm'][:48]!r}"
    if peer is not None and token["member"] != peer:  # before any signature check: the cheap refusal first
        return f"the token was issued for {token['member'][:12]}…, not for this peer (a token works only with its own key)"
    try:
        if peer_of_key(token["authority"]) != authority:
            return "the token is not signed by this swarm's authority"
        if peer_of_key(token["key"]) != token["member"]:
            return "the token's key and peer id do not match"
    except TokenError as e:
        return f"the token's keys are malformed ({e})"
    if not verify_signature(token["authority"], _payload(token), token["signature"]):
        return "the token's signature is not valid"
    if token["member"] in set(revoked):
        return f"member {token['name']!r} was revoked by the swarm's authority"
    if check_expiry:
        if token["expires"] + CLOCK_SLACK < now:
            return f"the token of {token['name']!r} expired at {_when(token['expires'])}"
        if token["issued"] - CLOCK_SLACK > now:
            return "the token is issued in the future (is this clock right?)"
    return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def describe(token: dict) -> str:
    return f"{token['name']} ({token['member'][:12]}…, expires {_when(token['expires'])})"


@dataclass
class Admission:
    """Who may take part: the swarm's mode, its authority, the revoked peer ids, and tokens seen so far.

    ``admits(peer, token)`` checks a token a caller presented (and remembers it); ``knows(peer)``
    answers for a caller that presents none (e.g. an all-reduce part) from the tokens remembered.
    In an open swarm everyone is admitted.
    """

    mode: str = "open"
    swarm: str = ""
    authority: str = ""
    revoked: frozenset = frozenset()
    signed_until: dict = field(default_factory=dict)  # revoked peer -> {"version", "hash"}: the version its signature counts up to
    _valid: dict = field(default_factory=dict)  # peer -> its token, checked

    @property
    def private(self) -> bool:
        return self.mode != "open"

    def problem(self, peer: str, token: Any, now: float | None = None) -> str | None:
        if not self.private:
            return None
        now = time.time() if now is None else now
        why = token_problem(token, self.swarm, self.authority, now, peer=peer, revoked=self.revoked)
        if why is None:
            self._valid[peer] = token if isinstance(token, dict) else parse_token(token)
            if len(self._valid) > 100_000:
                self._valid.clear()
        return why

    def admits(self, peer: str, token: Any, now: float | None = None) -> bool:
        return self.problem(peer, token, now) is None

    def knows(self, peer: str, now: float | None = None) -> str | None:
        """Why ``peer`` is not admitted on what this peer has seen of it, or None."""
        if not self.private:
            return None
        token = self._valid.get(peer)
        if token is None:
            return "no membership token seen from it"
        return self.problem(peer, token, now)

    def token_of(self, peer: str) -> dict | None:
        return self._valid.get(peer)

    def signed_by_member(self, peer: str, token: Any, version: int | None = None) -> bool:
        """Whether ``peer``'s signature on the certificate of ``version`` may count: its token was issued for it
        in this swarm (expiry aside: a token that was valid keeps its signatures) and, for a revoked peer, the
        version is not above its line (``signed_until``; without a version, a revoked peer's signature never
        counts). For a revoked peer this is necessary, not enough: ``CertChain`` counts it only on the line's
        lineage (``lines``), so that the key and one accomplice cannot sign new versions below the line.
        """
        if not self.private:
            return True
        if peer in self.revoked:
            line = parse_line(self.signed_until.get(peer))
            if version is None or line is None or version > line[0]:
                return False
        return token_problem(token, self.swarm, self.authority, time.time(), peer=peer, check_expiry=False) is None

    def lines(self) -> dict[str, tuple[int, str, str]]:
        """Revoked peer -> (version, hash, lineage digest) its signatures count up to, along that lineage only."""
        if not self.private:
            return {}
        out = {}
        for peer in self.revoked:
            line = parse_line(self.signed_until.get(peer))
            if line is not None:
                out[peer] = line
        return out

    def withdrawn(self, peer: str, version: int) -> bool:
        """Whether ``peer``'s signatures on ``version`` were withdrawn outright (above its line, or no line)."""
        line = parse_line(self.signed_until.get(peer))
        return self.private and peer in self.revoked and (line is None or version > line[0])

    def state(self) -> dict:
        """What another process needs to rebuild this (see ``from_state``)."""
        return {"mode": self.mode, "swarm": self.swarm, "authority": self.authority, "revoked": sorted(self.revoked),
                "signed_until": dict(self.signed_until)}

    @classmethod
    def from_state(cls, state: dict) -> "Admission":
        return cls(state["mode"], state["swarm"], state["authority"], frozenset(state["revoked"]), dict(state.get("signed_until") or {}))


_LINE_HASH = re.compile(r"^[0-9a-f]{64}$")


def parse_line(value: Any) -> tuple[int, str, str] | None:
    """A revocation line, ``{"version": v, "hash": h, "lineage": d}``, as (v, h, d); None for anything else.
    ``d`` is ``certs.lineage_digest`` of the hashes from v0 to (v, h): it pins the path, not only its end."""
    if not isinstance(value, dict) or set(value) != {"version", "hash", "lineage"}:
        return None
    version, body_hash, lineage = value["version"], value["hash"], value["lineage"]
    if type(version) is not int or not 0 <= version < 2**53:
        return None
    if not all(isinstance(x, str) and _LINE_HASH.match(x) for x in (body_hash, lineage)):
        return None
    return version, body_hash, lineage


def make_line(version: int, body_hash: str, lineage: str) -> dict:
    line = {"version": version, "hash": body_hash, "lineage": lineage}
    if parse_line(line) is None:
        raise ValueError(f"not a revocation line: v{version} {body_hash[:16]!r}")
    return line


def public_key_line(public_key: str) -> str:
    """The one line a member sends its lab: the ssh-rsa key (its peer id follows from it)."""
    return public_key.strip()


def token_bytes(token: dict) -> bytes:
    return canonical(token)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
