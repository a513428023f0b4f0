"""Everything that touches hivemind: the DHT, the swarm's records, the verifying averager, transfers.

No other room imports hivemind, so the method stays testable without a network and the engine
stays replaceable.

DHT records (``P`` is ``cfp2p.<swarm name>``):

- ``cfp2p.manifests`` subkey swarm name: the swarm manifest, re-published by every peer that holds it.
- ``P.bases`` subkey peer id: ``{v, hash}``, the newest base a peer holds and serves.
- ``P.r<v>.<hash16>.progress`` subkey peer id: ``{state: training|ready, examples, t}`` for the round on
  that base; it expires unless refreshed, so a dead trainer stops holding the round back.
- ``P.r<v>.<hash16>.x<k>.verify`` subkey peer id: ``{hash, clean, group_id, reason}`` after the k-th redo.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Optional, Sequence

import pydantic.v1 as pydantic  # hivemind's schema validation speaks pydantic v1

import torch

os.environ.setdefault("HIVEMIND_LOGLEVEL", "CRITICAL")  # we report hivemind's failures in our own one-liners

from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.averaging.allreduce import AllReduceRunner  # noqa: E402
from hivemind.averaging.control import AveragingStage  # noqa: E402
from hivemind.compression import Float16Compression, NoCompression, deserialize_torch_tensor, serialize_torch_tensor  # noqa: E402
from hivemind.averaging.partition import BannedException, TensorPartReducer  # noqa: E402
from hivemind.dht import DHT  # noqa: E402
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator  # noqa: E402
from hivemind.utils.serializer import MSGPackSerializer  # noqa: E402
from hivemind.p2p import P2PContext, PeerID  # noqa: E402
from hivemind.proto import averaging_pb2, runtime_pb2  # noqa: E402
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip  # noqa: E402
from hivemind.utils.mpfuture import MPFuture  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402

from coldfusion_p2p.errors import UserError, WorkError  # noqa: E402
from coldfusion_p2p.model import MODEL_FILE_NAMES  # noqa: E402
from coldfusion_p2p.store import BODY_FILE, MANIFEST_FILE  # noqa: E402

CHUNK_BYTES = 1 << 20
RECORD_TTL = 20.0  # seconds a progress/holder record lives without a refresh
MANIFEST_TTL = 600.0
HISTORY_TTL = 3600.0  # committed versions, re-published by their holders while they run


def quiet_hivemind() -> None:
    """hivemind logs expected outcomes (no group this time, a peer gone) with tracebacks; a user
    needs our one-line summaries instead. HIVEMIND_LOGLEVEL=INFO brings them back for debugging."""
    level = os.environ.get("HIVEMIND_LOGLEVEL", "CRITICAL")
    for name in ("hivemind", "hivemind.averaging", "hivemind.dht", "hivemind.p2p"):
        logging.getLogger(name).setLevel(level)


def _children_keep_default_sigterm() -> None:
    # hivemind forks its DHT and averager processes from ours: they must not inherit the handler
    # that turns SIGTERM into KeyboardInterrupt, or a group-wide SIGTERM prints their tracebacks
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_children_keep_default_sigterm)


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
        except EOFError as e:
            raise ConnectionError(f"a DHT request's sender exited before it was read: {e!r}") from None

    def __getattr__(self, name):
        return getattr(self._conn, name)


class SwarmDHT(DHT):
    """hivemind's DHT, but a request from a process that has since exited cannot kill it."""

    def run(self) -> None:
        self._inner_pipe = _SturdyPipe(self._inner_pipe)
        super().run()


def swarm_prefix(name: str) -> str:
    return f"cfp2p.{name}"


def peer_str(peer_id: PeerID) -> str:
    return peer_id.to_base58()


def dht_time() -> float:
    return get_dht_time()


def start_dht(
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    identity_path: str | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] | None = None,
) -> DHT:
    """Start a DHT node (a child process plus its p2pd); one-line errors for bad or dead addresses.

    The node's libp2p identity is an RSA key that this process also holds: it signs the peer's
    metrics records, and a reader checks that the signing key hashes to the peer id the record
    claims (``MetricsValidator``). Without ``identity_path`` a fresh key is made for this run.
    """
    from hivemind.utils.multiaddr import Multiaddr

    for addr in list(initial_peers) + list(host_maddrs):
        try:
            Multiaddr(addr)
        except Exception as e:
            raise UserError(f"not a multiaddress: {addr!r} ({e}); expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm...") from None
    fresh = None
    if identity_path is None or not os.path.isfile(identity_path):
        fresh = _new_identity_file(identity_path)
    key = _load_identity(identity_path or fresh)
    extra = {} if identity_path else {"check_if_identity_free": False}  # a key made a moment ago is nobody's
    signer = RSASignatureValidator(key)
    try:
        dht = SwarmDHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=identity_path or fresh,
            client_mode=client_mode,
            record_validators=[signer, MetricsValidator()],
            start=True,
            await_ready=True,
            **extra,
        )
        dht.owner_subkey = signer.local_public_key  # records under this subkey are signed by our key
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


def _new_identity_file(path: str | None) -> str:
    """An RSA identity in libp2p's protobuf format, at ``path`` or in a private temporary file."""
    import tempfile

    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes()).SerializeToString()
    if path is None:
        fd, path = tempfile.mkstemp(prefix="cfp2p-identity-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
    else:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(blob)
    return path


def _load_identity(path: str):
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    try:
        with open(path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": proto.data})
        return key
    except Exception as e:  # noqa: BLE001 - a damaged or foreign key file
        raise UserError(f"identity file {path} is not a libp2p RSA private key ({type(e).__name__}: {str(e)[:80]})") from None


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form, as in hivemind's PeerID.from_identity."""
    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2

    der = serialization.load_ssh_public_key(ssh_public_key).public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()


# --- signed metrics -------------------------------------------------------------------------
METRICS_KEY = "cfp2p_metrics"  # subkey: "[owner:<ssh-rsa public key>]"; value: PeerMetrics
METRICS_TTL = 12.0  # a peer that stops publishing (every HEARTBEAT seconds) disappears after this
PHASES = ("syncing", "training", "matchmaking", "averaging", "idle", "serving")
PHASE_RE = "^(" + "|".join(PHASES) + ")$"


class PeerMetrics(pydantic.BaseModel):
    """One peer's live metrics. Strict types: hivemind's SchemaValidator forbids conversions."""

    swarm: pydantic.constr(strict=True, min_length=1, max_length=100)
    peer: pydantic.constr(strict=True, regex=r"^[1-9A-HJ-NP-Za-km-z]{30,60}$")
    name: Optional[pydantic.constr(strict=True, max_length=40)] = None
    role: pydantic.constr(strict=True, regex=r"^(contributor|bootstrap)$")
    version: pydantic.conint(strict=True, ge=0)
    hash: pydantic.constr(strict=True, regex=r"^[0-9a-f]{64}$")
    phase: pydantic.constr(strict=True, regex=PHASE_RE)
    step: pydantic.conint(strict=True, ge=0)
    total: pydantic.conint(strict=True, ge=0)
    loss: Optional[pydantic.confloat(strict=True, allow_inf_nan=False)] = None
    examples_per_second: Optional[pydantic.confloat(strict=True, ge=0, allow_inf_nan=False)] = None
    device: pydantic.constr(strict=True, max_length=80)
    uptime: pydantic.confloat(strict=True, ge=0, allow_inf_nan=False)
    last_round_seconds: Optional[pydantic.confloat(strict=True, ge=0, allow_inf_nan=False)] = None
    rounds: pydantic.conint(strict=True, ge=0)
    t: pydantic.confloat(strict=True, allow_inf_nan=False)

    class Config:
        extra = pydantic.Extra.forbid


def metrics_record(*, swarm: str, peer: str, role: str, version: int, hash: str, phase: str, uptime: float,
                   name: str | None = None, device: str = "-", step: int = 0, total: int = 0, loss: float | None = None,
                   examples_per_second: float | None = None, last_round_seconds: float | None = None, rounds: int = 0) -> dict:
    """A PeerMetrics record with every field present and the exact types the schema wants (no conversions)."""

    def real(x):
        return None if x is None else float(x)

    return {
        "swarm": swarm, "peer": peer, "name": name[:40] if name else None, "role": role, "version": int(version), "hash": hash,
        "phase": phase, "step": int(step), "total": int(total), "loss": real(loss), "examples_per_second": real(examples_per_second),
        "device": device[:80], "uptime": float(uptime), "last_round_seconds": real(last_round_seconds), "rounds": int(rounds),
        "t": float(dht_time()),
    }


class MetricsSchema(pydantic.BaseModel):
    metrics: Dict[BytesWithPublicKey, PeerMetrics]  # the DHT key "cfp2p_metrics" (prefix "cfp2p")


class MetricsValidator(SchemaValidator):
    """The metrics schema, plus: the record's signing key must hash to the peer id it claims.

    ``RSASignatureValidator`` (run first) proves the writer holds the subkey's private key; this
    ties that key to ``peer``, so nobody can publish metrics under another peer's id.
    """

    def __init__(self):
        super().__init__(MetricsSchema, allow_extra_keys=True, prefix="cfp2p")
        self._metrics_key = DHTID.generate(source=METRICS_KEY).to_bytes()

    def validate(self, record) -> bool:
        if not super().validate(record):
            return False
        if record.key != self._metrics_key:
            return True
        try:
            owner = RSASignatureValidator._PUBLIC_KEY_RE.search(record.subkey).group(1)
            claimed = MSGPackSerializer.loads(record.value)["peer"]
            return peer_id_of_public_key(owner) == claimed
        except Exception:  # noqa: BLE001 - anything malformed is simply not a valid record
            return False

    def merge_with(self, other) -> bool:
        return False  # keep the peer-id check; SchemaValidator would fold us into a plain one


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


@dataclass
class Holder:
    peer: str
    version: int
    hash: str


MANIFEST_KEY = "cfp2p.manifests"  # subkey: swarm name; one DHT may host several swarms


def _neg(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)  # so that max() prefers the smaller string


class SwarmRecords:
    """The swarm's DHT records. Thread-safe: hivemind's DHT pipe is not, so every send holds a lock."""

    def __init__(self, dht: DHT, swarm_name: str = ""):
        self.dht, self.prefix = dht, swarm_prefix(swarm_name)
        self.peer_id = peer_str(dht.peer_id)
        self._lock = threading.Lock()

    def _store(self, key: str, value: Any, ttl: float, subkey: str | None = None, wait: bool = True) -> bool:
        with self._lock:
            future = self.dht.store(key, value, expiration_time=dht_time() + ttl, subkey=subkey, return_future=True)
        return bool(future.result()) if wait else True

    def _get_dict(self, key: str) -> dict[str, Any]:
        with self._lock:
            future = self.dht.get(key, latest=True, return_future=True)
        found = future.result()
        if found is None or not isinstance(found.value, dict):
            return {}
        return {sub: item.value for sub, item in found.value.items()}

    # --- manifest -------------------------------------------------------------------------
    def publish_manifest(self, manifest: dict[str, Any]) -> bool:
        return self._store(MANIFEST_KEY, manifest, MANIFEST_TTL, subkey=manifest["name"])

    def fetch_manifests(self) -> dict[str, dict[str, Any]]:
        """Every swarm manifest announced in this DHT, by swarm name."""
        return {name: m for name, m in self._get_dict(MANIFEST_KEY).items() if isinstance(m, dict)}

    def wait_for_manifest(self, wanted: str | None, timeout: float) -> tuple[str, dict[str, Any]]:
        """(name, manifest) of swarm ``wanted``, or of the only swarm in this DHT; waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            manifests = self.fetch_manifests()
            if wanted is not None:
                manifests = {k: v for k, v in manifests.items() if k == wanted}
            if len(manifests) == 1:
                return next(iter(manifests.items()))
            if len(manifests) > 1:
                raise UserError(f"this DHT hosts several swarms ({', '.join(sorted(manifests))}); pick one with --swarm")
            if time.monotonic() > deadline:
                which = f"swarm {wanted!r}" if wanted else "any swarm manifest"
                raise WorkError(f"found no {which} in the DHT within {timeout:.0f}s; is the bootstrap peer's swarm running?")
            time.sleep(1.0)

    # --- signed metrics and the version history -----------------------------------------------
    def publish_metrics(self, metrics: dict[str, Any], wait: bool = False) -> bool:
        """Sign and publish this peer's metrics (every field of PeerMetrics, strict types)."""
        return self._store(METRICS_KEY, metrics, METRICS_TTL, subkey=self.dht.owner_subkey, wait=wait)

    def metrics(self) -> list[dict[str, Any]]:
        """Every live, validly signed metrics record in this DHT (all swarms)."""
        return [m for m in self._get_dict(METRICS_KEY).values() if isinstance(m, dict)]

    def publish_history(self, entry: dict[str, Any], wait: bool = False) -> bool:
        """A committed version, for ``cfp2p status``: {v, hash, parent, contributors, time, round_s}."""
        return self._store(f"{self.prefix}.history", entry, HISTORY_TTL, subkey=f"v{entry['v']}.{entry['hash'][:16]}", wait=wait)

    def history(self) -> list[dict[str, Any]]:
        return [e for e in self._get_dict(f"{self.prefix}.history").values()
                if isinstance(e, dict) and isinstance(e.get("v"), int) and isinstance(e.get("hash"), str)]

    # --- holders of bases -----------------------------------------------------------------
    def announce_base(self, version: int, body_hash: str, wait: bool = False) -> None:
        self._store(f"{self.prefix}.bases", {"v": version, "hash": body_hash}, RECORD_TTL, subkey=self.peer_id, wait=wait)

    def holders(self) -> list[Holder]:
        out = []
        for peer, value in self._get_dict(f"{self.prefix}.bases").items():
            if isinstance(value, dict) and isinstance(value.get("v"), int) and isinstance(value.get("hash"), str):
                out.append(Holder(str(peer), value["v"], value["hash"]))
        return out

    def best_base(self, holders: list[Holder] | None = None) -> tuple[int, str, list[str]] | None:
        """The base the swarm should be on, with the other peers that hold it (sorted by peer id).

        The rule that ends any fork: the highest version wins; at the same version, the hash held by
        the most peers; at a tie, the smaller hash. Every peer applies it to the same records.
        ``holders``: records already fetched with ``holders()``, to spare a lookup.
        """
        votes: dict[tuple[int, str], list[str]] = {}
        for h in self.holders() if holders is None else holders:
            votes.setdefault((h.version, h.hash), []).append(h.peer)
        if not votes:
            return None
        (version, body_hash), peers = max(votes.items(), key=lambda kv: (kv[0][0], len(kv[1]), _neg(kv[0][1])))
        return version, body_hash, sorted(p for p in peers if p != self.peer_id)

    # --- rounds -----------------------------------------------------------------------------
    @staticmethod
    def round_key(version: int, body_hash: str) -> str:
        return f"r{version}.{body_hash[:16]}"

    def set_progress(self, version: int, body_hash: str, state: str, examples: int = 0, wait: bool = False,
                     since: float | None = None) -> None:
        value = {"state": state, "examples": examples, "t": since if since is not None else dht_time()}
        self._store(f"{self.prefix}.{self.round_key(version, body_hash)}.progress", value, RECORD_TTL, subkey=self.peer_id, wait=wait)

    def progress(self, version: int, body_hash: str) -> dict[str, dict]:
        return self._get_dict(f"{self.prefix}.{self.round_key(version, body_hash)}.progress")

    def publish_verdict(self, version: int, body_hash: str, redo: int, verdict: dict) -> None:
        key = f"{self.prefix}.{self.round_key(version, body_hash)}.x{redo}.verify"
        self._store(key, verdict, 120.0, subkey=self.peer_id)

    def verdicts(self, version: int, body_hash: str, redo: int) -> dict[str, dict]:
        return self._get_dict(f"{self.prefix}.{self.round_key(version, body_hash)}.x{redo}.verify")


class ExactPartReducer(TensorPartReducer):
    """Sums each part in float64 and returns the float32 average.

    hivemind adds senders' parts into a float32 accumulator in arrival order, so the average's last
    bits depend on network timing: the same deltas give a different B[v+1] run to run. Adam turns
    such differences in the base into ~1e-5 differences after the next round (measured with 4
    MiniLM contributors). A float64 sum of float32 values is exact in practice, hence independent
    of order, and ``fusion.mean_delta`` computes the same thing without a network.
    """

    def reset_accumulators(self):
        super().reset_accumulators()
        if not self.finished.is_set() and getattr(self, "accumulator", None) is not None:  # finalize() deletes it
            self.accumulator = self.accumulator.double()

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result((self.accumulator / self.denominator).float())
            self.reset_accumulators()


class CanonicalAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose result is bit-identical on every member.

    hivemind's runner has each reducer send back ``average - sender_part`` and each sender compute
    ``local + (average - local)``, which in floating point differs from ``average`` in the last bits,
    differently on each peer: even a clean round leaves members with different hashes. Here a
    reducer sends the average itself (compressed once, the same bytes to every sender, its own copy
    round-tripped through the same compression) and members copy it in place. A part whose reducer
    failed keeps the local values, as before, and is counted in ``failed_size``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_part_container.return_deltas = False  # failed parts then hold local values, not zeros
        self.tensor_part_reducer = ExactPartReducer(self.tensor_part_reducer.part_shapes, self.tensor_part_reducer.num_senders)

    def _canonical(self, averaged_part: torch.Tensor) -> torch.Tensor:
        compression = self.tensor_part_container.compression
        if isinstance(compression, NoCompression):
            return averaged_part.clone()
        return deserialize_torch_tensor(serialize_torch_tensor(averaged_part, compression.compression_type))

    async def _communicate_with_peer(self, peer_id: PeerID):
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)  # registers what the reducer sent: the average
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            averaged_part = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=self.weight)
            self.tensor_part_container.register_processed_part(peer_index, part_index, self._canonical(averaged_part))

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=weight)
                    part_index += 1
                except BannedException:
                    break  # this sender was banned: its part is no longer aggregated
                serialized = await loop.run_in_executor(None, lambda: serialize_torch_tensor(averaged_part, part_compression))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class FusionAverager(DecentralizedAverager):
    """A DecentralizedAverager that (1) reports whether its own view of each all-reduce was clean,
    (2) moves to a per-round matchmaking key, and (3) serves the peer's bases and model files.

    hivemind 1.1.12 reports success even when a member died mid all-reduce: a dead *reducer* leaves
    its slice at each survivor's local values (``failed_size != 0``), a dead *sender* leaves a mixed
    average (``banned_senders``). Both are caught here and returned with the step's result.
    """

    def __init__(self, *args, store_root: str, **kwargs):
        self._store_root = str(store_root)
        self._runners: dict[bytes, Any] = {}
        self._step_inputs: list[torch.Tensor] | None = None
        super().__init__(*args, **kwargs)

    async def _step(self, *, step, future_for_init):
        # hivemind retries a failed all-reduce within the same step, on tensors that the failed try
        # already overwrote in part: keep this step's inputs so that every try starts from them
        with self.get_tensors() as tensors:
            self._step_inputs = [t.clone() for t in tensors]
        try:
            await super()._step(step=step, future_for_init=future_for_init)
        finally:
            self._step_inputs = None

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """The base class's all-reduce (hivemind 1.1.12) with the canonical runner, kept so its view can be checked."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = CanonicalAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        self._runners[group_id] = runner
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
            self.last_updated = get_dht_time()
            self._state_updated.set()

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        """Run the all-reduce and return the gathered data with this member's verdict on it.

        A failed all-reduce is returned as an unclean result rather than raised: hivemind would
        otherwise retry it on the same key while other members of the group move on to verify.
        """
        self._runners.pop(group_info.group_id, None)
        if self._step_inputs is not None:
            with self.get_tensors() as tensors:
                for tensor, original in zip(tensors, self._step_inputs):
                    tensor.copy_(original)
        error = ""
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the all-reduce makes this view unclean
            gathered, error = {}, f"{type(e).__name__}: {str(e)[:160]}"
        runner = self._runners.pop(group_info.group_id, None)
        failed = runner.tensor_part_container.failed_size if runner is not None else -1
        banned = sorted(peer_str(p) for p in runner.banned_senders) if runner is not None else []
        return {
            "gathered": {peer_str(p): v for p, v in gathered.items()},
            "group": [peer_str(p) for p in group_info.peer_ids],
            "group_id": group_info.group_id.hex(),
            "clean": runner is not None and not error and failed == 0 and not banned,
            "failed_size": failed,
            "banned": banned,
            "error": error,
        }

    def run_step(self, weight: float, gather: dict, timeout: float, give_up=None, on_allreduce=None) -> tuple[dict | None, float, float, str]:
        """One all-reduce: (result or None, matchmaking seconds, all-reduce seconds, error text).

        ``give_up()`` is asked every couple of seconds while still matchmaking; True cancels the step.
        ``on_allreduce()`` is called once when the group is formed and the all-reduce begins.
        """
        start = time.perf_counter()
        t_allreduce = None
        last_check = start
        try:
            control = self.step(weight=weight, gather=gather, timeout=timeout, allow_retries=True, wait=False)
            while not control.done():
                if t_allreduce is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                    t_allreduce = time.perf_counter()
                    if on_allreduce is not None:
                        on_allreduce()
                if give_up is not None and t_allreduce is None and time.perf_counter() - last_check > 2.0:
                    last_check = time.perf_counter()
                    if control.stage == AveragingStage.LOOKING_FOR_GROUP and give_up():
                        control.cancel()
                time.sleep(0.02)
            result, error = control.result(), ""
        except Exception as e:  # noqa: BLE001 - hivemind raises many kinds; each means "no result this time"
            result, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        end = time.perf_counter()
        t_allreduce = t_allreduce or end
        return result, t_allreduce - start, end - t_allreduce, error

    # --- per-round settings, called through the control pipe ------------------------------------
    async def _shutdown(self, timeout: float | None) -> None:
        # Ctrl+C in a terminal reaches p2pd too, and it may be gone before we unregister our
        # handlers: hivemind's _shutdown then dies with a traceback. Nothing is left to unregister.
        with contextlib.suppress(Exception):
            if not self.client_mode:
                await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        remaining = set()
        for group in self._running_groups.values():
            remaining.update(group.finalize(cancel=True))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*remaining), timeout)

    def set_round(self, group_prefix: str, target_group_size: int | None, min_group_size: int) -> None:
        future = MPFuture()
        self._outer_pipe.send(("_set_round", [], dict(group_prefix=group_prefix, target=target_group_size, min_size=min_group_size, future=future)))
        future.result()

    async def _set_round(self, group_prefix: str, target: int | None, min_size: int, future: MPFuture):
        mm = self._matchmaking
        mm.group_key_manager.prefix = group_prefix
        mm.target_group_size = mm.potential_leaders.target_group_size = target
        mm.group_key_manager.target_group_size = target
        mm.min_group_size = min_size
        future.set_result(None)

    # --- serving bases and model files --------------------------------------------------------
    def _blob_path(self, name: str) -> Path | None:
        root = Path(self._store_root)
        kind, _, rest = name.partition("/")
        if kind == "model" and rest in MODEL_FILE_NAMES:
            return root / "model" / rest
        if kind == "version" and rest.isdigit():
            return root / "versions" / f"v{int(rest):06d}" / BODY_FILE
        if kind == "info" and rest.isdigit():
            return root / "versions" / f"v{int(rest):06d}" / MANIFEST_FILE
        return None

    async def rpc_fetch_blob(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Stream a stored file: first message carries its size, the rest carry 1 MiB chunks."""
        name = request.metadata.decode("utf-8", errors="replace")
        path = self._blob_path(name)
        if path is None or not path.is_file():
            yield averaging_pb2.DownloadData(metadata=b"missing")
            return
        size = path.stat().st_size
        yield averaging_pb2.DownloadData(metadata=f"size:{size}".encode())
        with open(path, "rb") as f:
            while chunk := await asyncio.get_event_loop().run_in_executor(None, f.read, CHUNK_BYTES):
                yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=chunk))


def make_averager(
    dht: DHT, swarm_name: str, tensors: list[torch.Tensor], store_root: Path, compression: str,
    matchmaking_time: float, allreduce_timeout: float, min_group_size: int, chunk_timeout: float = 10.0,
) -> FusionAverager:
    """Start the averager process on the main thread (hivemind needs fork and installs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the averager must be created on the main thread")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        return FusionAverager(
            tensors,
            dht,
            prefix=averager_prefix(swarm_name),
            store_root=str(store_root),
            start=True,
            target_group_size=None,
            min_group_size=min_group_size,
            min_matchmaking_time=matchmaking_time,
            request_timeout=min(3.0, matchmaking_time / 2),
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=chunk_timeout,  # a member silent this long is dropped (2x for a reducer)
            compression=Float16Compression() if compression == "float16" else NoCompression(),
            allow_state_sharing=False,
            shutdown_timeout=5,
        )
    finally:
        signal.signal(signal.SIGINT, sigint)  # hivemind sets SIGINT to ignored in the parent: give Ctrl+C back


def averager_prefix(swarm_name: str) -> str:
    return "cfp2p_" + swarm_name.replace(".", "_")


class BlobError(Exception):
    pass


async def _fetch_blob(dht: DHT, swarm_name: str, peer: str, name: str, dest: Path, timeout: float, on_bytes=None) -> None:
    p2p = await dht.replicate_p2p()
    try:
        stub = FusionAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=averager_prefix(swarm_name))
        stream = await stub.rpc_fetch_blob(averaging_pb2.DownloadData(metadata=name.encode()))
        size, written = None, 0
        with open(dest, "wb") as f:
            async for msg in stream:
                if size is None:
                    head = msg.metadata.decode(errors="replace")
                    if not head.startswith("size:"):
                        raise BlobError(f"peer {peer[:12]} does not have {name}")
                    size = int(head[5:])
                    continue
                f.write(msg.tensor_part.buffer)
                written += len(msg.tensor_part.buffer)
                if on_bytes is not None:
                    on_bytes(written, size)
        if size is None or written != size:
            raise BlobError(f"peer {peer[:12]} sent {written} of {size} bytes of {name}")
    finally:
        await p2p.shutdown()


def fetch_blob(dht: DHT, swarm_name: str, peer: str, name: str, dest: Path, timeout: float = 120.0, on_bytes=None) -> None:
    """Download one file (``model/<file>`` or ``version/<v>``) from one peer into ``dest``.

    ``on_bytes(written, size)`` follows the transfer, for a progress bar."""
    try:
        asyncio.run(asyncio.wait_for(_fetch_blob(dht, swarm_name, peer, name, dest, timeout, on_bytes), timeout))
    except BlobError:
        raise
    except Exception as e:  # noqa: BLE001 - transport errors of many kinds; the caller tries another holder
        raise BlobError(f"download of {name} from {peer[:12]} failed: {type(e).__name__}: {str(e)[:120]}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


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
