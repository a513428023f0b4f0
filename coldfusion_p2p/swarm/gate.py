"""Admission control for private swarms, where hivemind has none: DHT calls, enrollment, refusal logs.

hivemind 1.1.12's p2pd has no pre-shared network key, so anyone who can reach a peer can open a
connection to it. What it does have: libp2p authenticates the peer id of every connection, and the
DHT accepts an ``authorizer`` that signs each request and response and checks the other side's
access token. ``MemberAuthorizer`` plugs the swarm's membership tokens (``coldfusion_p2p.membership``)
into that hook, so in a private swarm every DHT call, read or write, from or to a node without a
valid token is refused in both directions. The averager's and transfer calls are gated by peer id in
``averager.FusionAverager``. ``Enroller`` is the bootstrap peer's desk for ``admission = "enroll"``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Callable

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import AuthRole, AuthRPCWrapper, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from coldfusion_p2p.membership import Admission, TokenError, make_token, parse_token, peer_of_key
from coldfusion_p2p.swarm.node import peer_str

ENROLL_NAMESPACE = "cfp2p"
_NAME_OK = __import__("re").compile(r"^[A-Za-z0-9_.@-]{1,40}$")
MAX_ENROLL_REQUEST = 4096


class RefusalLog:
    """One line on stderr per kind of call, refused caller and reason, at most once a minute, with a count of the rest."""

    def __init__(self, label: str = "", every: float = 60.0, write: Callable[[str], None] | None = None, per_minute: int = 30):
        self.label, self.every, self.per_minute = label, every, per_minute
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._recent: deque[float] = deque()  # times of lines written: callers choose names, so the total is capped too
        self._muted = 0
        self._lock = threading.Lock()

    def __call__(self, what: str, who: str, why: str) -> None:
        now = time.monotonic()
        key = (what.split(" of ")[0], who, why)  # downloads of different files count as one kind
        with self._lock:
            last, hidden = self._last.get(key, (-1e9, 0))
            if now - last < self.every:
                self._last[key] = (last, hidden + 1)
                return
            if len(self._last) > 10_000:
                self._last.clear()
            self._last[key] = (now, 0)
            while self._recent and self._recent[0] < now - 60:
                self._recent.popleft()
            if len(self._recent) >= self.per_minute:
                self._muted += 1
                return
            self._recent.append(now)
            muted, self._muted = self._muted, 0
        more = f" (and {hidden} more since the last line)" if hidden else ""
        more += f" ({muted} other refusal(s) not shown: over {self.per_minute} lines a minute)" if muted else ""
        self.write(f"{time.strftime('%H:%M:%S')} {self.label}refused {what} from {who}: {why}{more}")


class MemberAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer with this swarm's membership tokens.

    Our token rides in every request and response (in ``AccessToken.username``, as JSON; ``public_key``
    is the member's key, which signs each message). A request or response without a token that
    admits its signer to the swarm is dropped; the refusal is logged on this node.
    """

    _MAX_CLIENT_SERVICER_TIME_DIFF = timedelta(minutes=5)  # clocks may differ by a few minutes

    def __init__(self, key: RSAPrivateKey, token: dict, admission: Admission, log: RefusalLog | None = None):
        super().__init__(key)
        self.token, self.admission = token, admission
        self.log = log or RefusalLog()
        if token["key"].encode() != key.get_public_key().to_bytes():
            raise TokenError("the membership token was issued for another key")

    async def get_token(self) -> AccessToken:
        return AccessToken(username=json.dumps(self.token, sort_keys=True), public_key=self.token["key"].encode(),
                           expiration_time=str(self.token["expires"]))

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # a token is issued once; the peer stops when its own expires (Contributor)

    def _problem(self, access_token: AccessToken) -> tuple[str, str | None]:
        if not access_token.username:
            return "a node without a membership token", "no membership token"
        try:
            token = parse_token(access_token.username)
        except TokenError as e:
            return "a node", str(e)
        who = f"{token['member'][:12]}… (as {token['name']!r})"
        if access_token.public_key != token["key"].encode():
            return who, "the message is signed with another key than the token's"
        return who, self.admission.problem(token["member"], token)

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self._problem(access_token)[1] is None

    async def validate_request(self, request) -> bool:
        ok = await super().validate_request(request)
        if not ok:
            who, why = self._problem(request.auth.client_access_token)
            self.log("a DHT call", who, why or "the request's signature, time or nonce is not valid")
        return ok

    async def validate_response(self, response, request) -> bool:
        ok = await super().validate_response(response, request)
        if not ok:
            who, why = self._problem(response.auth.service_access_token)
            self.log("a DHT answer", who, why or "the answer's signature is not valid")
        return ok


def _claimed_member(access_token: AccessToken) -> str | None:
    try:
        return parse_token(access_token.username)["member"] if access_token.username else None
    except TokenError:
        return None


class BoundAuthRPCWrapper(AuthRPCWrapper):
    """hivemind's wrapper of DHT calls, with each signed message bound to the connection it came over.

    hivemind checks a request's token and signature but not that the token's member is the peer on
    the other end, so a signed request or answer could be replayed or relayed by another node (one
    that was revoked, say) within the clock window. Here a servicer refuses a request whose token
    names another peer than the caller libp2p authenticated, and a client an answer from another
    peer than the one it called.
    """

    def __getattribute__(self, name: str):
        method = super().__getattribute__(name)
        if not name.startswith("rpc_"):
            return method
        authorizer = object.__getattribute__(self, "_authorizer")
        if not isinstance(authorizer, MemberAuthorizer):
            return method
        role, stub = object.__getattribute__(self, "_role"), object.__getattribute__(self, "_stub")

        async def bound(request, *args, **kwargs):
            if role == AuthRole.SERVICER:
                context = args[0] if args else kwargs.get("context")
                caller = peer_str(context.remote_id) if context is not None else None
                if _claimed_member(request.auth.client_access_token) != caller:
                    authorizer.log("a DHT call", f"{str(caller)[:12]}…", "its token is not its own (a replayed or relayed request)")
                    return None
                return await method(request, *args, **kwargs)
            response = await method(request, *args, **kwargs)
            called = peer_str(stub._peer) if hasattr(stub, "_peer") else None
            if response is not None and _claimed_member(response.auth.service_access_token) != called:
                authorizer.log("a DHT answer", f"{str(called)[:12]}…", "the answer is signed by another peer than the one called")
                return None
            return response

        return bound


def _bind_dht_messages() -> None:
    import hivemind.dht.protocol as protocol

    protocol.AuthRPCWrapper = BoundAuthRPCWrapper  # the name DHTProtocol wraps its stubs and handlers with


_bind_dht_messages()


async def _set_revoked(revoked: list, _dht, node) -> None:
    authorizer = node.protocol.authorizer
    if isinstance(authorizer, MemberAuthorizer):
        authorizer.admission.revoked = frozenset(revoked)


def push_revoked(dht, revoked: list[str]) -> None:
    """Hand a new revocation list to the DHT process's authorizer."""
    import functools

    future = dht.run_coroutine(functools.partial(_set_revoked, list(revoked)), return_future=True)
    try:
        future.result(timeout=20)
    except Exception:  # noqa: BLE001 - the averager and the readers refuse revoked peers anyway
        future.cancel()


# --- enrollment (admission = "enroll") ---------------------------------------------------------
class EnrollDesk:
    """The bootstrap peer's rules for handing out tokens; no networking (``Enroller`` serves it).

    A key already enrolled gets a fresh token (renewal) at any time; a new key counts against the
    limits: ``per_address`` new keys per source address and ``per_hour`` in all, over the last hour.
    The registry (name, peer, key, expiry) is kept in a JSON file so that limits and names survive
    restarts.
    """

    def __init__(self, authority, swarm: str, mode: str, lifetime: float, per_address: int, per_hour: int,
                 registry: Path | None, revoked: Callable[[], frozenset] = frozenset):
        self.authority, self.swarm, self.mode, self.lifetime = authority, swarm, mode, lifetime
        self.per_address, self.per_hour, self.registry, self.revoked = per_address, per_hour, registry, revoked
        self._recent: deque[tuple[float, str]] = deque()  # (time, address) of new keys enrolled
        self._lock = threading.Lock()

    def decide(self, peer: str, request: dict, address: str, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        if self.mode != "enroll":
            return {"admission": self.mode, "refused": "this swarm admits members only: send your public key "
                    "(`cfp2p id --identity KEY`) to the swarm's lab and join with the token it gives you (--token)"
                    if self.mode == "members" else "this swarm is open: join without a token"}
        key = request.get("key")
        try:
            if peer_of_key(key) != peer:
                return {"admission": "enroll", "refused": "the key to enroll is not the caller's own"}
        except TokenError as e:
            return {"admission": "enroll", "refused": f"the key to enroll is malformed ({e})"}
        if peer in self.revoked():
            return {"admission": "enroll", "refused": "this key was revoked by the swarm's authority"}
        with self._lock:
            members = self._load()
            known = members.get(peer) if isinstance(members.get(peer), dict) else None
            if known is not None:  # a renewal: not a new identity, but not more than once a minute either
                if now - float(known.get("issued") or 0) < 60:
                    return {"admission": "enroll", "refused": "a token was issued to this key less than a minute ago"}
                name = str(known.get("name"))
            else:
                # the limits count new keys over the last hour, from the registry (they survive a restart)
                recent = [m for m in members.values() if isinstance(m, dict) and m.get("source") == "enroll"
                          and now - 3600 <= float(m.get("enrolled") or 0) <= now + 60]
                if sum(m.get("address") == address for m in recent) >= self.per_address:
                    return {"admission": "enroll", "refused": f"{self.per_address} new keys were enrolled from {address} "
                            "in the last hour; try again later"}
                if len(recent) >= self.per_hour:
                    return {"admission": "enroll", "refused": f"{self.per_hour} new keys were enrolled in the last hour; try again later"}
                name = self._unique_name(request.get("name"), peer, members)
            token = make_token(self.authority, self.swarm, name, key, self.lifetime, now)
            entry = {"name": name, "peer": peer, "key": key, "expires": token["expires"], "issued": token["issued"], "source": "enroll",
                     "enrolled": float((known or {}).get("enrolled") or now), "address": (known or {}).get("address", address)}
            members[peer] = entry
            self._save(members)
        return {"admission": "enroll", "token": token}

    @staticmethod
    def _unique_name(asked, peer: str, members: dict) -> str:
        """The name a volunteer asked for if it is well-formed and nobody has it; else one made from its peer id."""
        taken = {str(m.get("name")) for m in members.values() if isinstance(m, dict)} | {"bootstrap"}
        if isinstance(asked, str) and _NAME_OK.match(asked) and asked not in taken:
            return asked
        return f"peer-{peer[2:12]}"

    def _load(self) -> dict:
        return load_registry(self.registry)

    def _save(self, members: dict) -> None:
        if self.registry is not None:
            save_registry(self.registry, members)


def load_registry(path: Path | None) -> dict:
    """The lab's members file: peer id -> {name, peer, key, expires, source}; empty if missing or unreadable."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_registry(path: Path, members: dict) -> None:
    import os

    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps(members, indent=1, sort_keys=True))
    os.replace(tmp, path)


class Enroller(ServicerBase):
    """Serves ``EnrollDesk`` to anyone who can reach the bootstrap peer (there is no token yet to ask for)."""

    def __init__(self, desk: EnrollDesk, log: RefusalLog, p2p: P2P | None = None):
        self.desk, self.log, self.p2p = desk, log, p2p

    async def rpc_enroll(self, request: averaging_pb2.DownloadData, context: P2PContext) -> averaging_pb2.DownloadData:
        peer = peer_str(context.remote_id)
        try:
            if len(request.metadata) > MAX_ENROLL_REQUEST:
                raise ValueError("too large")
            asked = json.loads(request.metadata)
            if not isinstance(asked, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            asked = {}
        address = await self._address(context.remote_id)
        loop = asyncio.get_event_loop()
        answer = await loop.run_in_executor(None, self.desk.decide, peer, asked, address)
        if "refused" in answer and answer.get("admission") == "enroll":
            self.log("an enrollment", f"{peer[:12]}… at {address}", answer["refused"])
        return averaging_pb2.DownloadData(metadata=json.dumps(answer).encode())

    async def _address(self, remote: PeerID) -> str:
        try:
            for info in await self.p2p.list_peers():
                if info.peer_id == remote:
                    for addr in info.addrs:
                        parts = str(addr).split("/")
                        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                            return parts[2]
        except Exception:  # noqa: BLE001 - an address we cannot tell is counted as one unknown source
            pass
        return "unknown"


class EnrollService:
    """Runs an ``Enroller`` on the DHT's p2pd from a thread of its own (the bootstrap peer's main loop is synchronous)."""

    def __init__(self, dht, desk: EnrollDesk, log: RefusalLog):
        self.dht, self.desk, self.log = dht, desk, log
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.p2p = None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        self.p2p = await self.dht.replicate_p2p()
        await Enroller(self.desk, self.log, self.p2p).add_p2p_handlers(self.p2p, namespace=ENROLL_NAMESPACE)

    def stop(self) -> None:
        async def _stop():
            if self.p2p is not None:
                try:
                    await self.p2p.shutdown()
                except Exception:  # noqa: BLE001 - p2pd may be gone already (Ctrl+C reaches it too)
                    pass

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def ask_to_enroll(initial_peers: list[str], identity_path: str, authority: str, name: str | None, public_key: str,
                  timeout: float = 30.0) -> dict:
    """Ask the swarm's authority for a token: its answer ({admission, token} or {admission, refused}).

    Raises ConnectionError when the authority cannot be reached at all.
    """

    async def _ask() -> dict:
        p2p = await P2P.create(initial_peers=initial_peers, identity_path=identity_path, check_if_identity_free=False)
        try:
            stub = Enroller.get_stub(p2p, PeerID.from_base58(authority), namespace=ENROLL_NAMESPACE)
            request = averaging_pb2.DownloadData(metadata=json.dumps({"key": public_key, "name": name}).encode())
            response = await stub.rpc_enroll(request)
            answer = json.loads(response.metadata[:65536])
            if not isinstance(answer, dict):
                raise ValueError("not an object")
            return answer
        finally:
            await p2p.shutdown()

    try:
        return asyncio.run(asyncio.wait_for(_ask(), timeout))
    except Exception as e:  # noqa: BLE001 - no answer of any kind from the authority
        raise ConnectionError(f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
