"""An outsider attacking a swarm with nothing but its address and a plain hivemind DHT node.

Usage: python -m tests.outsider INITIAL_PEER SWARM WORKDIR ATTACK [ATTACK ...]

It joins the DHT with fresh keys (any number of them: it signs records as each) and keeps its
attacks going every two seconds until it is killed. It writes what it did to WORKDIR/outsider.json.

Attacks:
  replace     announces v(current+3) and serves a real body under that hash, with a forged
              certificate chain (signed by itself, listing the swarm's members)
  unservable  announces v(current+5) with a hash nothing serves
  nexthash    announces v(current+1) with a wrong hash, before the honest commit
  plain       plain values (no subkey) at every protocol key, expiring in ten years
  phantoms    'training' progress records from 20 identities on the current base
  verdicts    'unclean' verdicts from its identities on the current round
  levels      'ready' progress records on the round the honest peers are in, once a second, from 4 identities that
              never join a group, each saying it looks for its group at a higher redo level each time (1 up to the
              highest that counts), and at levels past it
  manifest    a manifest for the same swarm name with a higher serial, signed by itself
  history     history with forged versions, and metrics claiming to be the bootstrap peer
  malformed   values of every record kind that break the schema, under its own owner subkey
  leader      declares itself a matchmaking leader of the current round (every redo key) four times a
              second, always earlier than any member, takes every member that asks in and forms no
              group: it holds a member until just before the member would give up on it, sends it back to
              itself, or begins a group of the member alone, in turn (members follow only their round's
              ready peers, so none should ask it)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p import model as M
from coldfusion_p2p import records as R
from coldfusion_p2p.certs import Certificate, sign_certificate  # noqa: I001
from coldfusion_p2p.store import VersionInfo, VersionStore
from coldfusion_p2p.certs import peer_id_of_public_key
from coldfusion_p2p.swarm import Identity, make_averager, sign_manifest


async def _declare(dht, node, key: str, subkey: bytes, expiration: float):
    """A matchmaking declaration, as hivemind's ``GroupKeyManager.declare_averager`` stores it."""
    return await node.store(key, True, expiration, subkey=subkey)


def _hostile_leader(joins: Path, behaviours: tuple[str, ...] = ("hold",)):
    """``rpc_join_group`` of a leader that takes every member in and forms no group with it (set before the averager
    forks). The n-th join gets ``behaviours[n % len(behaviours)]``:

    - hold: disband a moment before the member, waiting for its own start and the request timeout, would give up
    - loop: disband at once, sending the member back to this leader (hivemind's follower asks whomever it is
      sent to from inside the same request, as deep as it is sent)
    - alone: begin at once with a group of the member alone
    - without: begin at once with a group of this leader and a made-up peer, without the member
    - silent: answer nothing
    - slow_no: say no (not looking for a group) after 2 s, before the member's request timeout"""
    from hivemind.proto import averaging_pb2

    async def rpc_join_group(self, request, context):
        with open(joins, "a") as fh:
            fh.write(f"{context.remote_id}\n")
        behaviour = behaviours[(len(joins.read_text().split()) - 1) % len(behaviours)]
        if behaviour == "silent":
            await asyncio.sleep(3600)
        if behaviour == "slow_no":
            await asyncio.sleep(2.0)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        yield averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED)
        if behaviour == "loop":
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.GROUP_DISBANDED, suggested_leader=self.peer_id.to_bytes())
            return
        if behaviour in ("alone", "without"):
            made_up = b"\x12\x20" + os.urandom(32)
            ids = [context.remote_id.to_bytes()] if behaviour == "alone" else [self.peer_id.to_bytes(), made_up]
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.BEGIN_ALLREDUCE, group_id=os.urandom(20), ordered_peer_ids=ids,
                                                  gathered=[request.gather] * len(ids))
            return
        # the member waits for its own expiration and the request timeout (1.5 s here): disbanded just before
        await asyncio.sleep(max(0.0, request.expiration - get_dht_time()) + 1.0)
        yield averaging_pb2.MessageFromLeader(code=averaging_pb2.GROUP_DISBANDED)

    from typing import AsyncIterator

    from hivemind.p2p import P2PContext

    # hivemind reads a handler's message types from its annotations, which this module keeps as strings
    rpc_join_group.__annotations__ = {"request": averaging_pb2.JoinRequest, "context": P2PContext,
                                      "return": AsyncIterator[averaging_pb2.MessageFromLeader]}
    return rpc_join_group


async def _store_as(dht, node, key: str, value, expiration: float, private_key=None, plain: bool = False):
    """Store on the DHT as the owner of ``private_key`` (hivemind's signer only signs with the node's own key)."""
    if plain:
        return await node.store(key, value, expiration)
    signer = RSASignatureValidator(private_key)
    saved = node.protocol.record_validator
    node.protocol.record_validator = CompositeValidator([signer])
    try:
        return await node.store(key, value, expiration, subkey=signer.local_public_key)
    finally:
        node.protocol.record_validator = saved


class Outsider:
    def __init__(self, initial_peer: str, swarm: str, workdir: Path):
        self.swarm, self.workdir = swarm, workdir
        self.key = RSAPrivateKey()
        self.identities = [RSAPrivateKey() for _ in range(24)]
        self.level = 0  # ``attack_levels``' last level
        self.levels: dict | None = None  # ``attack_levels``' node, and what it stored
        from hivemind.proto import crypto_pb2

        key_file = workdir / "outsider.key"  # its libp2p identity is the key it signs with, like any peer's
        key_file.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=self.key.to_bytes()).SerializeToString())
        self.dht = DHT(initial_peers=[initial_peer], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, identity_path=str(key_file),
                       record_validators=[RSASignatureValidator(self.key)])
        self.me = self.dht.peer_id.to_base58()
        self.log: list[dict] = []
        self.served: dict[int, str] = {}
        self.averager = None
        self.initial_peer, self.leader = initial_peer, None  # ``attack_leader``'s node and averager
        self.declared = 0  # its declarations as a leader that the DHT took
        self.mine = {self.me} | {peer_id_of_public_key(Identity(k).public_key.encode()) for k in self.identities}

    def store(self, key, value, ttl=15.0, identity=None, plain=False, expiration=None):
        expiration = expiration if expiration is not None else get_dht_time() + ttl
        future = self.dht.run_coroutine(functools.partial(_store_as, key=key, value=value, expiration=expiration,
                                                          private_key=identity or self.key, plain=plain), return_future=True)
        return bool(future.result(timeout=20))

    @functools.cached_property
    def reader(self):
        """A node with a member's record validators, to read the swarm's records: its own node keeps the "plain"
        values it stored at the same keys (with the latest expiration), and read through that one, the attacks that
        needed the current version or the manifest failed or aimed at v0."""
        from coldfusion_p2p.swarm import start_dht

        return start_dht([self.initial_peer], ["/ip4/127.0.0.1/tcp/0"])

    def honest_bases(self, dht=None) -> dict[str, tuple[int, str]]:
        """Each honest peer's announced base, read through ``dht`` (default: ``reader``): with its own announcements
        of v+1 and v+5 counted, its "current" version ran ahead of the swarm's and the attacks on the current
        round (phantoms, levels, verdicts) aimed at versions no peer was on after their first turn."""
        found = (dht or self.reader).get(R.BASES_KEY, latest=True, return_future=True).result(timeout=20)
        out = {}
        if found is not None and isinstance(found.value, dict):
            for sub, item in found.value.items():
                # its own "plain" values stand at the same keys on its own node (no validators): a plain dict's items
                # are no records. Read as one, every attack that needed the current version failed or aimed at v0
                v = getattr(item, "value", None)
                peer = R.peer_id_of_owner(R.owner_of(sub) or "")
                if isinstance(v, dict) and v.get("swarm") == self.swarm and peer and peer not in self.mine:  # not its own forgeries
                    out[peer] = (v["v"], v["hash"])
        return out

    def current(self) -> tuple[int, str]:
        bases = self.honest_bases()
        return max(bases.values()) if bases else (0, "0" * 64)

    def note(self, attack: str, **fields):
        self.log.append({"attack": attack, "t": time.time(), **fields})
        (self.workdir / "outsider.json").write_text(json.dumps(self.log))

    # --- attacks ---------------------------------------------------------------------------------
    def serve_forged_chain(self, v_cur: int) -> tuple[int, str]:
        """A store with a real-looking body at v_cur+3 and a certificate chain signed only by itself."""
        version = v_cur + 3
        if version in self.served:
            return version, self.served[version]
        store = VersionStore(self.workdir / "forged-store")
        body = M.body_state(M.load_body_module(M.resolve_model_source("tiny-bert", cache_dir=self.workdir / "cache")))
        body = {k: (v * -3.0 if v.is_floating_point() else v) for k, v in body.items()}  # the model, destroyed
        body_hash = M.hash_body(body)
        store.save(body, VersionInfo(version, body_hash, parent="f" * 64))
        parent = "0" * 64  # the chain claims to start from some v0; its signatures are the outsider's alone
        members = tuple(sorted([self.me] + [p for p in self.honest_bases() if p.startswith("Qm")][:2]))
        me = Identity(self.key)
        certs = []
        for v in range(1, version + 1):
            new = body_hash if v == version else f"{v:064x}"
            cert = Certificate(self.swarm, v, parent, new, "ab" * 8, members)
            cert = cert.with_signature(self.me, me.public_key, sign_certificate(cert, self.me, me))
            certs.append(cert.to_dict())
            parent = new
        store.save_certificates(certs)
        if self.averager is None:
            names = M.averaged_names(body)
            self.averager = make_averager(self.dht, self.swarm, [body[n].float() for n in names], store.root, "none", 3.0, 30.0, 2)
        self.served[version] = body_hash
        return version, body_hash

    def run(self, attacks: list[str]) -> None:
        while True:
            try:
                v_cur, h_cur = self.current()
            except Exception:  # noqa: BLE001 - a lookup that timed out: attack the last version it saw
                v_cur, h_cur = getattr(self, "_last", (0, "0" * 64))
            self._last = (v_cur, h_cur)
            for attack in attacks:
                try:
                    getattr(self, f"attack_{attack}")(v_cur, h_cur)
                except Exception as e:  # noqa: BLE001 - an attacker keeps going
                    self.note(attack, error=f"{type(e).__name__}: {e}"[:200])
            time.sleep(2.0)

    def attack_replace(self, v_cur, h_cur):
        version, body_hash = self.serve_forged_chain(v_cur)
        ok = self.store(R.BASES_KEY, {"swarm": self.swarm, "v": version, "hash": body_hash})
        self.note("replace", version=version, hash=body_hash, stored=ok)

    def attack_unservable(self, v_cur, h_cur):
        value = {"swarm": self.swarm, "v": v_cur + 5, "hash": "%064x" % random.getrandbits(256)}
        self.note("unservable", stored=self.store(R.BASES_KEY, value, identity=self.identities[0]), version=v_cur + 5)

    def attack_nexthash(self, v_cur, h_cur):
        value = {"swarm": self.swarm, "v": v_cur + 1, "hash": "%064x" % random.getrandbits(256)}
        self.note("nexthash", stored=self.store(R.BASES_KEY, value, identity=self.identities[1]), version=v_cur + 1)

    def attack_plain(self, v_cur, h_cur):
        far = get_dht_time() + 10 * 365 * 86400
        for key in R.KINDS:
            self.note("plain", key=key, stored=self.store(key, {"swarm": self.swarm, "v": v_cur}, plain=True, expiration=far))

    def attack_phantoms(self, v_cur, h_cur):
        stored = 0
        for ident in self.identities[2:20]:
            value = {"swarm": self.swarm, "v": v_cur, "hash": h_cur, "state": "training", "examples": 0, "t": get_dht_time(), "redo": 0}
            stored += self.store(R.PROGRESS_KEY, value, identity=ident)
        self.note("phantoms", stored=stored, version=v_cur)

    def attack_levels(self, v_cur, h_cur):
        if self.levels is None:  # a node and a thread of its own: it keeps up with rounds of a second or two
            from coldfusion_p2p.swarm import start_dht

            self.levels = {"node": start_dht([self.initial_peer], ["/ip4/127.0.0.1/tcp/0"]), "stored": 0, "peers": set()}
            threading.Thread(target=self._claim_levels, args=(self.levels,), daemon=True).start()
        self.note("levels", stored=self.levels["stored"], level=self.level, peers=sorted(self.levels["peers"]))

    def _claim_levels(self, levels: dict) -> None:
        # every honest ready peer moves up to the highest level a ready peer it waits for shows: levels that only
        # rise, to at most 2 * max_attempts - 1 (5 by default), and no further however high the record says.
        # Ready records on the round the honest peers are in, once a second, from keys that never join a group
        dht = levels["node"]
        while True:
            with contextlib.suppress(Exception):
                v, h = max(vh for peer, vh in self.honest_bases(dht).items() if peer not in self.mine)
                self.level = self.level % 5 + 1
                for ident, redo in zip(self.identities[20:], (self.level, 5, 6, 10**6)):  # the last: past the records' bound
                    value = {"swarm": self.swarm, "v": v, "hash": h, "state": "ready", "examples": 64, "t": get_dht_time(), "redo": redo}
                    if dht.run_coroutine(functools.partial(_store_as, key=R.PROGRESS_KEY, value=value, expiration=get_dht_time() + 15,
                                                           private_key=ident), return_future=True).result(timeout=20):
                        levels["stored"] += 1
                        levels["peers"].add(peer_id_of_public_key(Identity(ident).public_key.encode()))
            time.sleep(1.0)  # a look a second (records last 15 s): the peers' rounds, and the other attacks, go on beside it

    def attack_verdicts(self, v_cur, h_cur):
        members = sorted(p for p in self.honest_bases() if p.startswith("Qm"))[:8] or [self.me]
        for redo in (0, 1):
            value = {"swarm": self.swarm, "v": v_cur, "base": h_cur, "redo": redo, "group_id": "ab" * 8, "members": members,
                     "result": "", "clean": False, "reason": "forged", "offenders": members, "signature": ""}
            self.note("verdicts", stored=self.store(R.VERDICTS_KEY, value, ttl=100.0, identity=self.identities[redo]))

    def attack_manifest(self, v_cur, h_cur):
        found = self.reader.get(R.MANIFEST_KEY, latest=True, return_future=True).result(timeout=20)
        for item in (found.value.values() if found is not None and isinstance(found.value, dict) else []):
            rec = R.parse(R.KINDS[R.MANIFEST_KEY], getattr(item, "value", None))
            if rec is not None and rec.swarm == self.swarm:
                manifest = json.loads(rec.manifest)
                manifest["round"]["min_group_size"] = 2
                manifest["model"]["v0_hash"] = "e" * 64  # locks newcomers out if believed
                signed = sign_manifest(Identity(self.key), manifest, rec.serial + 1000)
                self.note("manifest", stored=self.store(R.MANIFEST_KEY, signed, ttl=600.0))
                return

    def attack_history(self, v_cur, h_cur):
        me = Identity(self.key)
        cert = Certificate(self.swarm, v_cur + 7, "1" * 64, "2" * 64, "ab" * 8, (self.me,))
        cert = cert.with_signature(self.me, me.public_key, sign_certificate(cert, self.me, me))
        entry = {"v": v_cur + 7, "hash": "2" * 64, "parent": "1" * 64, "contributors": 99, "time": time.time(), "round_s": 1.0,
                 "cert": cert.to_dict()}
        self.note("history", stored=self.store(R.HISTORY_KEY, {"swarm": self.swarm, "entries": [entry]}, ttl=600.0))
        metrics = {"swarm": self.swarm, "peer": self.me, "name": "bootstrap", "role": "bootstrap", "version": v_cur + 7,
                   "hash": "2" * 64, "phase": "serving", "step": 0, "total": 0, "loss": None, "examples_per_second": None,
                   "device": "-", "uptime": 1.0, "last_round_seconds": None, "rounds": 99, "t": get_dht_time()}
        self.note("history-metrics", stored=self.store(R.METRICS_KEY, metrics, ttl=12.0))

    def attack_leader(self, v_cur, h_cur):
        if self.leader is None:  # a node of its own (one more free identity), driven by a thread of its own
            from coldfusion_p2p.swarm import start_dht

            dht = start_dht([self.initial_peer], ["/ip4/127.0.0.1/tcp/0"])  # a member's node: it reads records as members do
            # any tensors: a leader is never asked for its schema
            self.leader = (dht, make_averager(dht, self.swarm, [torch.zeros(4)], self.workdir / "leader-store", "none", 3.0, 30.0, 2))
            threading.Thread(target=self._declare_as_leader, args=(dht,), daemon=True).start()
        joins = self.workdir / "leader_joins.txt"
        self.note("leader", version=v_cur, joins=len(joins.read_text().split()) if joins.is_file() else 0, declared=self.declared)

    def _declare_as_leader(self, dht) -> None:
        from coldfusion_p2p.swarm import averager_prefix

        subkey, prefix = dht.peer_id.to_bytes(), averager_prefix(self.swarm)
        v, h, looked = 0, "0" * 64, 0.0
        while True:
            if time.monotonic() - looked > 1.0:  # the round the members are in (not its own forged ones), looked up
                looked = time.monotonic()       # on its own: the other attacks take seconds
                with contextlib.suppress(Exception):  # through its own node: ``reader`` is the main thread's
                    v, h = max(vh for peer, vh in self.honest_bases(dht).items() if peer not in self.mine)
            expiration = get_dht_time() + 0.6  # earlier than any member's (now + matchmaking_time)
            for redo in range(4):
                with contextlib.suppress(Exception):
                    self.declared += bool(dht.run_coroutine(functools.partial(
                        _declare, key=f"{prefix}_r{v}_{h[:16]}_x{redo}.0b", subkey=subkey, expiration=expiration), return_future=True).result(timeout=5))
            time.sleep(0.25)

    def attack_malformed(self, v_cur, h_cur):
        junk = [{"swarm": self.swarm, "v": "1", "hash": h_cur}, {"swarm": self.swarm, "v": -1, "hash": h_cur}, [1, 2, 3], "text",
                {"swarm": self.swarm, "v": v_cur, "hash": h_cur, "state": "ready", "examples": 1.5, "t": 1.0},
                {"swarm": self.swarm, "entries": "all of them"}, {"swarm": self.swarm, "v": 1e300, "hash": h_cur}]
        for key in R.KINDS:
            for value in junk:
                self.note("malformed", key=key, stored=self.store(key, value, identity=self.identities[3]))


def main() -> None:
    initial_peer, swarm, workdir, *attacks = sys.argv[1:]
    torch.set_num_threads(1)
    if "leader" in attacks:  # its averager process forks from here with it, whichever attack makes that averager
        from coldfusion_p2p.swarm.averager import FusionAverager

        FusionAverager.rpc_join_group = _hostile_leader(Path(workdir) / "leader_joins.txt", ("hold", "loop", "alone"))
    outsider = Outsider(initial_peer, swarm, Path(workdir))
    outsider.note("start", peer=outsider.me, identities=[peer_id_of_public_key(Identity(k).public_key.encode()) for k in outsider.identities])
    try:
        outsider.run(attacks)
    except KeyboardInterrupt:
        pass
    finally:
        if outsider.averager is not None:
            outsider.averager.shutdown()
        if outsider.leader is not None:
            outsider.leader[1].shutdown()
            outsider.leader[0].shutdown()
        if outsider.levels is not None:
            outsider.levels["node"].shutdown()
        if "reader" in outsider.__dict__:
            outsider.reader.shutdown()
        outsider.dht.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
