"""An intruder trying every path into a members-only swarm, with a plain hivemind node.

Usage: python -m tests.intruder INITIAL_PEER SWARM WORKDIR TARGETS_FILE [STOLEN_TOKEN [EXPIRED_TOKEN]]

TARGETS_FILE holds the peer ids to call directly (members and the bootstrap peer), one a line; it
may grow while the intruder runs. Each credential is tried on each path, every few seconds, until
the intruder is killed:

  credentials  none; STOLEN_TOKEN (a member's token, used with the intruder's own key);
               EXPIRED_TOKEN (a token the authority issued to the intruder's key that has expired)
  paths        dht-read (the manifest, bases and metrics records), dht-write (a metrics and a
               bases record), join (rpc_join_group of a member's averager), part (rpc_aggregate_part
               with a made-up group), download (model files, v0 and certificates, from members and
               the bootstrap peer)

WORKDIR/intruder.json gets one line per attempt: {path, credential, target, admitted, detail}.
``admitted`` is True when the swarm let the intruder in on that path (a test wants none).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p import records as R
from coldfusion_p2p.swarm.averager import FusionAverager, averager_prefix
from coldfusion_p2p.swarm.transfer import blob_request


class ShowsToken(TokenAuthorizerBase):
    """Presents someone's token (stolen, or expired) but signs with the intruder's own key, as it must."""

    def __init__(self, key, token: dict | None):
        super().__init__(key)
        self.token = token

    async def get_token(self) -> AccessToken:
        if self.token is None:
            return AccessToken()
        return AccessToken(username=json.dumps(self.token, sort_keys=True), public_key=self.token["key"].encode(),
                           expiration_time=str(self.token["expires"]))

    def is_token_valid(self, access_token) -> bool:
        return True  # it accepts anything: it only wants in

    def does_token_need_refreshing(self, access_token) -> bool:
        return False


class Intruder:
    def __init__(self, initial_peer: str, swarm: str, workdir: Path, targets: Path, credentials: dict[str, dict | None]):
        self.initial_peer, self.swarm, self.workdir, self.targets = initial_peer, swarm, workdir, targets
        self.credentials = credentials
        from coldfusion_p2p.identity import new_identity_file
        from coldfusion_p2p.swarm.node import _hivemind_key

        self.key_file = workdir / "intruder.key"  # made by the test when it wants an expired token for this key
        if not self.key_file.is_file():
            new_identity_file(str(self.key_file))
        self.key = _hivemind_key(str(self.key_file))  # what hivemind's validator and authorizer take
        self.out = open(workdir / "intruder.json", "a", buffering=1)
        self.dhts = {}
        for name, token in credentials.items():
            self.dhts[name] = DHT(initial_peers=[initial_peer], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                                  identity_path=str(self.key_file), record_validators=[RSASignatureValidator(self.key)],
                                  authorizer=ShowsToken(self.key, token) if token is not None else None,
                                  ensure_bootstrap_success=False, check_if_identity_free=False, wait_timeout=3)

    def note(self, path: str, credential: str, target: str, admitted: bool, detail: str = "") -> None:
        self.out.write(json.dumps({"path": path, "credential": credential, "target": target[:16], "admitted": admitted,
                                   "detail": detail[:200], "t": time.time()}) + "\n")

    def peers(self) -> list[str]:
        try:
            return [line.strip() for line in self.targets.read_text().splitlines() if line.strip()]
        except OSError:
            return []

    # --- the DHT: reads and writes ---------------------------------------------------------------
    def dht_paths(self, credential: str) -> None:
        dht = self.dhts[credential]
        own = RSASignatureValidator(self.key).local_public_key
        for key in (R.MANIFEST_KEY, R.BASES_KEY, R.METRICS_KEY):
            try:
                found = dht.get(key, latest=True, return_future=True).result(timeout=15)
                # its own writes stay in its own node's storage: only records of others count
                theirs = [s for s in found.value if s != own] if found is not None and isinstance(found.value, dict) else []
                self.note("dht-read", credential, key, bool(theirs), f"{len(theirs)} record(s) of others")
            except Exception as e:  # noqa: BLE001
                self.note("dht-read", credential, key, False, f"{type(e).__name__}")
        me = dht.peer_id.to_base58()
        metrics = {"swarm": self.swarm, "peer": me, "name": "intruder", "role": "contributor", "version": 0, "hash": "0" * 64,
                   "phase": "idle", "step": 0, "total": 0, "loss": None, "examples_per_second": None, "device": "-", "uptime": 1.0,
                   "last_round_seconds": None, "rounds": 0, "t": get_dht_time()}
        owner = RSASignatureValidator(self.key).local_public_key
        for key, value in ((R.METRICS_KEY, metrics), (R.BASES_KEY, {"swarm": self.swarm, "v": 99, "hash": "1" * 64})):
            try:
                # "stored" counts its own node's storage too: whether it reached the swarm, the test asks a member
                ok = dht.store(key, value, get_dht_time() + 10, subkey=owner, return_future=True).result(timeout=15)
                self.note("dht-write", credential, key, False, f"store returned {bool(ok)}")
            except Exception as e:  # noqa: BLE001
                self.note("dht-write", credential, key, False, f"{type(e).__name__}")

    # --- the averager and transfers, called directly by peer id ---------------------------------
    async def direct_paths(self, p2p: P2P, credential: str, token: dict | None) -> None:
        prefix = averager_prefix(self.swarm)
        ser = MSGPackSerializer
        for peer in self.peers():
            stub = FusionAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=prefix)
            # join a group (with the round key of v0, which is what a member looks for first)
            gather = ser.dumps([1.0, 0, ser.dumps({"examples": 48, **({"token": token} if token else {})})])
            try:
                stream = await stub.rpc_join_group(averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 10,
                                                                               gather=gather, group_key=f"{prefix}_r0.0b"))
                first = await asyncio.wait_for(stream.__anext__(), 10)
                admitted = first.code != averaging_pb2.PROTOCOL_VIOLATION
                self.note("join", credential, peer, admitted, averaging_pb2.MessageCode.Name(first.code))
            except Exception as e:  # noqa: BLE001 - a closed stream or an error is a refusal too
                self.note("join", credential, peer, False, f"{type(e).__name__}")
            # send a part of an all-reduce
            try:
                stream = await stub.rpc_aggregate_part(_one(averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING,
                                                                                          group_id=b"g" * 16, weight=1.0)))
                first = await asyncio.wait_for(stream.__anext__(), 40)
                admitted = first.code not in (averaging_pb2.PROTOCOL_VIOLATION,)
                self.note("part", credential, peer, admitted, averaging_pb2.MessageCode.Name(first.code))
            except Exception as e:  # noqa: BLE001
                self.note("part", credential, peer, False, f"{type(e).__name__}")
            # downloads
            for blob in ("model/config.json", "version/0", "certs/1"):
                try:
                    stream = await stub.rpc_fetch_blob(averaging_pb2.DownloadData(metadata=blob_request(blob, token)))
                    first = await asyncio.wait_for(stream.__anext__(), 10)
                    head = first.metadata.decode(errors="replace")
                    self.note("download", credential, peer, head.startswith("size:"), f"{blob}: {head[:60]}")
                except Exception as e:  # noqa: BLE001
                    self.note("download", credential, peer, False, f"{blob}: {type(e).__name__}")

    async def run(self) -> None:
        p2p = await P2P.create(initial_peers=[self.initial_peer], identity_path=str(self.key_file), check_if_identity_free=False)
        loop = asyncio.get_event_loop()
        try:
            while True:
                for credential, token in self.credentials.items():
                    await loop.run_in_executor(None, self.dht_paths, credential)
                    await self.direct_paths(p2p, credential, token)
                await asyncio.sleep(2.0)
        finally:
            await p2p.shutdown()


async def _one(item):
    yield item


def main() -> None:
    initial_peer, swarm, workdir, targets, *tokens = sys.argv[1:]
    credentials: dict[str, dict | None] = {"none": None}
    for name, path in zip(("stolen", "expired"), tokens):
        credentials[name] = json.loads(Path(path).read_text())
    intruder = Intruder(initial_peer, swarm, Path(workdir), Path(targets), credentials)
    try:
        asyncio.run(intruder.run())
    except KeyboardInterrupt:
        pass
    finally:
        for dht in intruder.dhts.values():
            dht.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
