"""A peer's DHT node and identity: starting it, its key, and stopping hivemind processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import typing
from typing import Sequence

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p.errors import UserError, WorkError
from coldfusion_p2p.identity import Identity, load_key, new_identity_file
from coldfusion_p2p.swarm.validation import ProtocolValidator, ValidCache, bounded_find, budgeted_store


def quiet_hivemind() -> None:
    """hivemind logs expected outcomes (no group this time, a peer gone) with tracebacks; a user
    needs our one-line summaries instead. HIVEMIND_LOGLEVEL=INFO brings them back for debugging."""
    level = os.environ.get("HIVEMIND_LOGLEVEL", "CRITICAL")
    for name in ("hivemind", "hivemind.averaging", "hivemind.dht", "hivemind.p2p"):
        logging.getLogger(name).setLevel(level)
    if not isinstance(sys.excepthook, _QuietHandleSharer):
        sys.excepthook = _QuietHandleSharer(sys.excepthook)


class _QuietHandleSharer:
    """Drops the traceback multiprocessing prints when a child dies while fetching a handle from us.

    hivemind passes MPFutures to its DHT and averager processes; unpickling one fetches a pipe
    handle from this process through multiprocessing's resource sharer thread. A child killed in
    between (Ctrl+C and a group-wide SIGTERM reach it at the same moment as us) resets that
    connection, and the sharer thread hands the error to ``sys.excepthook``: a full traceback on the
    user's terminal for an outcome that changes nothing (the request it carried dies with the child).
    Every other exception goes to the previous hook unchanged.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, kind, value, tb):
        if issubclass(kind, (ConnectionError, EOFError)) and tb is not None:
            frames = traceback.extract_tb(tb)
            if frames and frames[0].filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
                logging.getLogger(__name__).debug("a child process went away while fetching a shared handle: %r", value)
                return
        self.previous(kind, value, tb)


def _children_keep_default_sigterm() -> None:
    # hivemind forks its DHT and averager processes from ours: they must not inherit the handler
    # that turns SIGTERM into KeyboardInterrupt, or a group-wide SIGTERM prints their tracebacks
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_fork = {"parent": 0, "from_main_thread": False}


def _note_fork() -> None:
    _fork["parent"] = os.getpid()
    _fork["from_main_thread"] = threading.current_thread() is threading.main_thread()


def _child_pids(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc (Linux); none where there is no /proc."""
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _end_with_parent(parent: int) -> None:
    """Wait for the parent to go; then end this process's own children (p2pd) and this process."""
    while os.getppid() == parent:
        time.sleep(0.5)
    children = _child_pids(os.getpid())
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while children and time.monotonic() < deadline:
        children = [pid for pid in children if _alive(pid)]
        time.sleep(0.1)
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


def _children_end_with_their_parent() -> None:
    # hivemind's DHT and averager processes (forked from our main thread) and the p2pd they start
    # outlived a main process killed hard (SIGKILL, the OOM killer), holding ports and memory. Each
    # forked child watches its parent and ends itself and its own children when the parent is gone.
    # (Not PR_SET_PDEATHSIG: it would kill the DHT process before it could end its p2pd.)
    parent = _fork["parent"]
    if not parent or not _fork["from_main_thread"]:
        return  # a fork from another thread is not one of hivemind's processes
    if os.getppid() != parent:
        os._exit(1)  # the parent died while forking
    threading.Thread(target=_end_with_parent, args=(parent,), name="cfp2p-parent-watch", daemon=True).start()


os.register_at_fork(before=_note_fork, after_in_child=_children_keep_default_sigterm)
os.register_at_fork(after_in_child=_children_end_with_their_parent)


class _SturdyPipe:
    """The DHT process's end of its request pipe, for requests whose sender died.

    A request carries an MPFuture, and unpickling it fetches a pipe handle from the *sending*
    process. If that process exited in between (an averager shut down right after it declared
    itself for matchmaking), ``recv`` raises EOFError, which hivemind 1.1.12's DHT loop does not
    catch: the whole DHT process died with a traceback. As an OSError the loop drops the request
    and carries on.
    """

    def __init__(self, conn):
        self._conn = conn

    def recv(self):
        try:
            return self._conn.recv()
        except (EOFError, pickle.UnpicklingError) as e:  # the latter: a sender killed mid-message (seen at shutdown)
            raise ConnectionError(f"a DHT request's sender exited before it was read: {e!r}") from None

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _LockedSend:
    """The senders' end of the DHT's request pipe, one message at a time across threads and processes.

    hivemind's DHT handle is not safe to share: this process's threads (the heartbeat, a download's
    ``replicate_p2p``) and the averager (forked from it, with the same pipe) all write requests to it.
    A request longer than the pipe's atomic size (4 KiB: a history record carrying certificates) is
    written in pieces, and a request written in between corrupts the stream: the DHT process dies
    on it and every later lookup waits forever. A lock made before the averager forks is shared
    with it.
    """

    def __init__(self, conn):
        import multiprocessing as mp

        self._conn, self._lock = conn, mp.get_context("fork").Lock()

    def send(self, obj) -> None:
        with self._lock:
            self._conn.send(obj)

    def __getattr__(self, name):
        return getattr(self._conn, name)


_RPC_KINDS = ("ping", "store", "find")
_rpc_counts: dict[str, int] = {}  # in the DHT process: DHT requests this node sent ("sent_find") and served ("served_find")


def _count_dht_requests() -> None:
    """Count every DHT request the node sends and serves (called in the DHT process, before its node starts).

    One ``dht.get`` or ``dht.store`` is several requests (a lookup asks the closest nodes it knows, then
    theirs), so these counts, not the number of calls, are the load a peer puts on the swarm."""
    from hivemind.dht.protocol import DHTProtocol

    if getattr(DHTProtocol, "_cfp2p_counted", False):
        return
    for kind in _RPC_KINDS:
        for prefix, side in (("call_", "sent_"), ("rpc_", "served_")):
            original, label = getattr(DHTProtocol, prefix + kind), side + kind
            _rpc_counts[label] = 0
            if prefix == "rpc_":  # hivemind registers rpc_* handlers by their (self, request, context) signature
                async def counted(self, request, context, *, _original=original, _label=label):
                    _rpc_counts[_label] += 1
                    return await _original(self, request, context)
            else:
                async def counted(self, *args, _original=original, _label=label, **kwargs):
                    _rpc_counts[_label] += 1
                    return await _original(self, *args, **kwargs)
            setattr(DHTProtocol, prefix + kind, _in_place_of(original, counted))
    DHTProtocol._cfp2p_counted = True


def _in_place_of(original, wrapper):
    """``wrapper`` dressed as ``original``, as hivemind finds its handlers: getfullargspec must see the wrapper's
    own arguments, and the type hints are resolved where they were written."""
    functools.update_wrapper(wrapper, original)
    del wrapper.__wrapped__
    wrapper.__annotations__ = typing.get_type_hints(original)
    return wrapper


def _bound_dht_handlers() -> None:
    """Put ``validation.budgeted_store`` in place of hivemind's ``rpc_store`` and ``validation.bounded_find`` in place
    of its ``rpc_find`` (in the DHT process, before its node starts)."""
    from hivemind.dht.protocol import DHTProtocol

    if getattr(DHTProtocol, "_cfp2p_budgeted", False):
        return
    original_store, original_find = DHTProtocol.rpc_store, DHTProtocol.rpc_find

    async def rpc_store(self, request, context):
        return await budgeted_store(original_store, self, request, context)

    async def rpc_find(self, request, context):
        return await bounded_find(original_find, self, request, context)

    DHTProtocol.rpc_store = _in_place_of(original_store, rpc_store)
    DHTProtocol.rpc_find = _in_place_of(original_find, rpc_find)
    DHTProtocol.update_routing_table = _update_routing_table
    _store_without_ghosts()
    DHTProtocol._cfp2p_budgeted = True


REPLICATE_EVERY = 300.0  # seconds: how often a node offers what it stores to the same peer as to a newcomer
_offered: dict = {}  # peer id -> when this node last offered it its records (the oldest go first past 10,000)
_offers = 0  # offers made (tests read it)


async def _update_routing_table(self, node_id, peer_id, responded=True):
    """hivemind's ``DHTProtocol.update_routing_table`` (called on every request served and every answer read), with
    one node id per peer id, and a peer offered this node's records at most once every ``REPLICATE_EVERY``.

    A request names its sender's node id, and hivemind took any id a peer named as a new node: a red-team node
    pinging with a fresh id each time put 40,842 entries in a peer's routing table (about 65 MiB a minute, for as
    long as it went on), and for each new node id hivemind walked the whole of its storage to offer the newcomer its
    share (a tenth of a second or more with 15,000 records: the peer's DHT then answered 20 to 30 s late). Now a new
    id from a known peer replaces its old one (a restarted peer keeps its peer id and draws a new node id), and the
    walk happens once per peer in ``REPLICATE_EVERY``."""
    global _offers
    node_id = node_id if node_id is not None else self.routing_table.get(peer_id=peer_id)
    if responded:  # a request served, or an answer read
        if node_id is None:
            return
        known = self.routing_table.get(peer_id=peer_id)
        if known is not None and known != node_id and known in self.routing_table:
            del self.routing_table[known]
        now = time.monotonic()
        if node_id not in self.routing_table and now - _offered.get(peer_id, -REPLICATE_EVERY) >= REPLICATE_EVERY:
            _offered.pop(peer_id, None)
            _offered[peer_id] = now
            while len(_offered) > 10_000:
                _offered.pop(next(iter(_offered)))
            _offers += 1
            data_to_send = []  # what this node holds that the newcomer should store (hivemind's rule, unchanged)
            for key, item in list(self.storage.items()):
                neighbors = self.routing_table.get_nearest_neighbors(key, self.num_replicas, exclude=self.node_id)
                if neighbors:
                    nearest_distance = neighbors[0][0].xor_distance(key)
                    farthest_distance = neighbors[-1][0].xor_distance(key)
                    new_node_should_store = node_id.xor_distance(key) < farthest_distance
                    this_node_is_responsible = self.node_id.xor_distance(key) < nearest_distance
                if not neighbors or (new_node_should_store and this_node_is_responsible):
                    data_to_send.append((key, item.value, item.expiration_time))
            if data_to_send:
                asyncio.create_task(self.call_store(peer_id, *zip(*data_to_send), in_cache=False))
        maybe_node_to_ping = self.routing_table.add_or_update_node(node_id, peer_id)
        if maybe_node_to_ping is not None:  # a full bucket: check whether its least recently seen node is alive
            asyncio.create_task(self.call_ping(maybe_node_to_ping[1]))
    else:  # a request this node sent went unanswered
        if node_id is not None and node_id in self.routing_table:
            del self.routing_table[node_id]


def _store_without_ghosts() -> None:
    """hivemind's ``TimedStorage.store``, as the DHT's storage (records, and each dictionary's entries) uses it, without
    its two faults. It pushed an entry on its expiration heap at every call, also for a store it then refused (an
    expiration no later than the one held), and such entries left the heap only at their own expiration: a red-team
    node sending one tiny record again and again grew a peer's DHT process by about 200 MiB a minute (each record
    passes the store budget: it replaces its own count). And it pointed the key at that refused entry, so the record
    held was deleted at the refused, earlier expiration: a replayed older record of any peer cut its current one
    short. Now a refused store leaves storage as it was, and the heap is rebuilt when replaced entries pile up."""
    import heapq

    from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
    from hivemind.utils.timed_storage import HeapEntry, TimedStorage, ValueWithExpiration, get_dht_time

    original = TimedStorage.store
    if getattr(original, "_cfp2p", False):
        return

    def store(self, key, value, expiration_time) -> bool:
        if not isinstance(self, (DHTLocalStorage, DictionaryDHTValue)):  # hivemind's other queues keep their ways
            return original(self, key, value, expiration_time)
        if expiration_time < get_dht_time() and not self.frozen:
            return False
        held = self.data.get(key)
        if held is not None and held.expiration_time >= expiration_time:
            return False
        self.key_to_heap[key] = entry = HeapEntry(expiration_time, key)
        heapq.heappush(self.expiration_heap, entry)
        self.data[key] = ValueWithExpiration(value, expiration_time)
        if len(self.expiration_heap) > 2 * len(self.key_to_heap) + 1024:  # entries of replaced records: rebuilt
            self.expiration_heap = list(self.key_to_heap.values())
            heapq.heapify(self.expiration_heap)
        if held is None:
            self._remove_outdated()
        return True

    store._cfp2p = True
    TimedStorage.store = store


async def _read_dht_requests(_dht, _node) -> dict[str, int]:
    return dict(_rpc_counts)


def dht_requests(dht: DHT, timeout: float = 5.0) -> dict[str, int]:
    """How many DHT requests this peer's node has sent and served since it started, by kind ({} if it cannot say)."""
    try:
        return dht.run_coroutine(_read_dht_requests, return_future=True).result(timeout=timeout)
    except Exception:  # noqa: BLE001 - a count is a courtesy: never a reason to fail
        return {}


class CachedSignatureValidator(RSASignatureValidator):
    """hivemind's signature check, done once per record: a record read again is known valid (``ValidCache``)."""

    def __init__(self, private_key=None):
        super().__init__(private_key)
        self._valid = ValidCache()

    def validate(self, record) -> bool:
        return self._valid.valid(record, super().validate)


class SwarmDHT(DHT):
    """hivemind's DHT, but a request from a process that has since exited cannot kill it; it counts its requests,
    and keeps records only within ``validation.StoreBudget``s."""

    def run(self) -> None:
        self._inner_pipe = _SturdyPipe(self._inner_pipe)
        _bound_dht_handlers()
        _count_dht_requests()
        super().run()


def dht_time() -> float:
    return get_dht_time()


def start_dht(
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    identity_path: str | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] | None = None,
    token: dict | None = None,
    admission=None,
    refusals=None,
) -> DHT:
    """Start a DHT node (a child process plus its p2pd); one-line errors for bad or dead addresses.

    The node's libp2p identity is an RSA key that this process also holds (``dht.identity``): it
    signs the peer's records and certificates, and a reader checks that the signing key hashes to
    the peer id. Every record at the protocol's keys is checked by ``ProtocolValidator`` on this
    node, on store and on every answer from another node. Without ``identity_path`` a fresh key is
    made for this run. In a private swarm, ``token`` (this key's membership token) and ``admission``
    (``membership.Admission``) put ``gate.MemberAuthorizer`` on every DHT call; ``refusals`` logs what it refuses.
    """
    from hivemind.utils.multiaddr import Multiaddr

    for addr in list(initial_peers) + list(host_maddrs):
        try:
            Multiaddr(addr)
        except Exception as e:
            raise UserError(f"not a multiaddress: {addr!r} ({e}); expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm...") from None
    fresh = None
    if identity_path is None or not os.path.isfile(identity_path):
        fresh = new_identity_file(identity_path)
    key = _hivemind_key(identity_path or fresh)
    # a key made a moment ago is nobody's; a watcher (client mode) may share a member's key with its contributor
    extra = {} if identity_path and not client_mode else {"check_if_identity_free": False}
    signer = CachedSignatureValidator(key)
    authorizer = None
    if token is not None:
        from coldfusion_p2p.membership import TokenError
        from coldfusion_p2p.swarm.gate import MemberAuthorizer

        try:
            authorizer = MemberAuthorizer(key, token, admission, refusals)
        except TokenError as e:
            raise UserError(f"{e}: a token works only with the identity key it was issued for") from None
    try:
        dht = SwarmDHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=identity_path or fresh,
            client_mode=client_mode,
            record_validators=[signer, ProtocolValidator()],
            authorizer=authorizer,
            start=True,
            await_ready=True,
            **extra,
        )
        dht._outer_pipe = _LockedSend(dht._outer_pipe)
        dht.owner_subkey = signer.local_public_key  # records under this subkey are signed by our key
        dht.identity = Identity(key)
        return dht
    except Exception as e:  # noqa: BLE001 - p2pd and the DHT report a dead peer in several ways
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "bootstrap failed" in text or "failed to connect to bootstrap peers" in text:
            raise WorkError(
                f"none of the initial peers answered ({', '.join(initial_peers)}); check the address and that the bootstrap peer is running"
            ) from None
        raise WorkError(f"could not start the DHT node: {type(e).__name__}: {text}") from None
    finally:
        if fresh and not identity_path:
            os.unlink(fresh)  # p2pd has read it; this run's key lives on in memory only


def _hivemind_key(path: str) -> RSAPrivateKey:
    """The identity key in ``path`` as hivemind's key type (what its signature validator takes)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = load_key(path)
    return key


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


def peer_of_maddr(maddr: str) -> str | None:
    """The peer id in a multiaddress's ``/p2p/Qm…`` part, or None."""
    parts = maddr.rstrip("/").split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("p2p", "ipfs"):
            return parts[i + 1]
    return None


def stop_process(proc) -> None:
    """Shut a hivemind DHT or averager process down gracefully, or kill it; never raises."""
    if proc is None:
        return
    with contextlib.suppress(Exception):
        proc.shutdown()
    with contextlib.suppress(Exception):
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def peer_str(peer_id) -> str:
    return peer_id.to_base58()
