"""End to end with real hivemind peers (p2pd processes) on localhost."""

from __future__ import annotations

import json
import shutil
import subprocess

import torch

from coldfusion_p2p import model as M
from coldfusion_p2p.procs import cli_command, child_env
from coldfusion_p2p.store import VersionStore


def test_three_peers_two_rounds_survive_bootstrap_loss(swarm, tiny_model_dir, tmp_path):
    """Three contributors that have no local model download it from the bootstrap peer, fuse v1
    (exactly the mean of their finetuned bodies), lose the bootstrap peer, and still fuse v2.
    The lab's checkpoint has no pooler (as many sentence-transformers exports): v0 is exactly
    what it holds, the same in every process."""
    model_copy = tmp_path / "lab-model"
    shutil.copytree(tiny_model_dir, model_copy)
    weights = M.load_tensors(model_copy / "model.safetensors")
    M.save_tensors({k: v for k, v in weights.items() if not k.startswith("pooler.")}, model_copy / "model.safetensors", metadata={"format": "pt"})
    swarm.start_bootstrap(str(model_copy))
    boot_v0 = VersionStore(tmp_path / "boot").list()[0].hash
    shutil.rmtree(model_copy)  # the contributors cannot find the model locally: the swarm must give it to them
    names = {"ada": "sms_spam", "ben": "rotten_tomatoes", "cy": "trec6"}
    procs = {n: swarm.join(n, d, "--keep-finetuned") for n, d in names.items()}

    stores = {n: VersionStore(tmp_path / n) for n in names}
    swarm.wait_for(lambda: all(s.read_info(1) for s in stores.values()), 240, "v1 on every peer")
    swarm.children.signal_group(swarm.boot, 9)  # SIGKILL the bootstrap peer and its p2pd
    swarm.boot.wait(10)
    for n, p in procs.items():
        assert swarm.wait(p, n, 240) == 0, swarm.log(n)

    infos = {n: [i for i in s.list()] for n, s in stores.items()}
    for n, versions in infos.items():
        assert [i.version for i in versions] == [0, 1, 2], (n, swarm.log(n))
        assert versions[0].hash == boot_v0
    assert len({versions[2].hash for versions in infos.values()}) == 1, "peers diverged on v2"
    assert len({versions[1].hash for versions in infos.values()}) == 1, "peers diverged on v1"
    for n, s in stores.items():  # every stored version verifies against its hash
        for i in (0, 1, 2):
            s.load(i)
        assert (tmp_path / n / "model" / "config.json").is_file()  # the model files came from a peer
        assert any(e["event"] == "download" for e in swarm.events(n))

    v0, _ = stores["ada"].load(0)
    v1, info1 = stores["ada"].load(1)
    assert info1.parent == boot_v0 and len(info1.contributors) == 3
    finetuned = [M.load_tensors(tmp_path / n / "finetuned" / "from_v000000.safetensors") for n in names]
    body_keys = set(v0)
    assert body_keys == {k for k in weights if not k.startswith("pooler.")}  # exactly the checkpoint's tensors
    assert set(info1.averaged_tensors) == {k for k in body_keys if v0[k].is_floating_point()}
    heads = {n: M.load_tensors(tmp_path / n / "head.safetensors") for n in names}
    for head in heads.values():  # heads stayed local and are not part of the body
        assert not set(head) & body_keys
        assert not any(k in info1.averaged_tensors for k in head)
    assert heads["cy"]["out.weight"].shape[0] == 6 and heads["ada"]["out.weight"].shape[0] == 2
    worst = 0.0
    for k in info1.averaged_tensors:
        mean = torch.stack([f[k].float() for f in finetuned]).mean(0)
        worst = max(worst, (v1[k].float() - mean).abs().max().item())
        assert not torch.equal(finetuned[0][k], v0[k])  # training moved the body
    assert worst <= 1e-5, f"v1 differs from the mean of the finetuned bodies by {worst}"

    listing = subprocess.run(cli_command("versions", "--store", str(tmp_path / "ben"), "--json", "--verify"),
                             capture_output=True, text=True, env=child_env(), timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [r["version"] for r in rows] == [0, 1, 2] and all(r["valid"] for r in rows)
    assert rows[2]["hash"] == infos["ada"][2].hash and rows[2]["round_stats"]["group_size"] == 3


def test_peer_with_wrong_model_is_refused(swarm, tiny_model_dir, tmp_path):
    swarm.start_bootstrap("tiny-bert")
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    body = M.load_tensors(other / "model.safetensors")
    name = M.averaged_names(body)[0]
    body[name] = body[name] + 0.01  # same architecture, different weights
    M.save_tensors(body, other / "model.safetensors", metadata={"format": "pt"})
    proc = swarm.join("mallory", "sms_spam", "--model", str(other))
    code = swarm.wait(proc, "mallory", 120)
    log = swarm.log("mallory")
    assert code == 2, log
    error_lines = [line for line in log.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "does not match the swarm's v0" in error_lines[0]
    assert "Traceback" not in log
    assert not (tmp_path / "mallory" / "versions" / "v000000").exists()  # nothing of the wrong model was stored


def test_a_joiner_gets_in_through_any_initial_peer_that_answers(swarm, tmp_path):
    """The bootstrap peer is gone when bob joins: his first --initial-peers is dead, the second is a
    contributor named by a /dns4/ address, which serves the manifest (signed by the authority,
    named with --authority) and v0; ann and bob fuse v1 without any bootstrap peer."""
    import socket

    from coldfusion_p2p.certs import peer_id_of_public_key
    from coldfusion_p2p.swarm.node import _new_identity_file, load_identity

    boot = swarm.start_bootstrap("tiny-bert")
    authority = boot.rsplit("/p2p/", 1)[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = tmp_path / "ann.key"
    _new_identity_file(str(key))
    ann_id = peer_id_of_public_key(load_identity(str(key)).get_public_key().to_bytes())
    ann = swarm.join("ann", "sms_spam", "--identity", str(key), rounds=1, port=port)
    swarm.wait_for(lambda: any(e["event"] == "joined" for e in swarm.events("ann")), 90, "ann to join")
    swarm.children.signal_group(swarm.boot, 9)  # the bootstrap peer and its p2pd, gone for good
    swarm.boot.wait(10)
    dead = boot
    ann_addr = f"/dns4/localhost/tcp/{port}/p2p/{ann_id}"  # a name, as a lab would publish it
    bob = swarm.join("bob", "rotten_tomatoes", "--authority", authority, rounds=1, initial_peers=[dead, ann_addr])
    for name, proc in (("ann", ann), ("bob", bob)):
        assert swarm.wait(proc, name, 240) == 0, swarm.log(name)
    assert VersionStore(tmp_path / "ann").read_info(1).hash == VersionStore(tmp_path / "bob").read_info(1).hash
