"""End to end with real hivemind peers (p2pd processes) on localhost."""

from __future__ import annotations

import json
import shutil
import signal
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
    for n in names:
        stats = next(e["stats"] for e in swarm.events(n) if e["event"] == "committed" and e["version"] == 2)
        assert stats["dht"]["sent"] > 0 and stats["dht"]["reads"] > 0, (n, stats)  # this peer's DHT load in the round


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
    log = swarm.log("mallory", tail=None)
    assert code == 2, log[-3000:]
    error_lines = [line for line in log.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "does not match the swarm's v0" in error_lines[0]
    assert "Traceback" not in log
    assert not (tmp_path / "mallory" / "versions" / "v000000").exists()  # nothing of the wrong model was stored


def test_a_second_meeting_point_serves_the_swarm_when_the_bootstrap_peer_is_gone(swarm, tmp_path, tiny_model_dir):
    """`cfp2p bootstrap --initial-peers` joins a running swarm as a second meeting point: it checks and keeps
    the model files and v0, and re-publishes the authority's manifest. The bootstrap peer is then killed and
    the model folder deleted; ann and bob join with the dead bootstrap peer first (it names the authority)
    and the meeting point second, under a /dns4/ name: they get the manifest, the model files and v0 from
    it, fuse v1 and v2 without it (it never averages), and it follows them."""
    import socket

    from coldfusion_p2p.certs import peer_id_of_public_key
    from coldfusion_p2p.identity import load_identity, new_identity_file

    model_copy = tmp_path / "lab-model"
    shutil.copytree(tiny_model_dir, model_copy)
    boot = swarm.start_bootstrap(str(model_copy))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = tmp_path / "mirror.key"
    new_identity_file(str(key))
    mirror_id = peer_id_of_public_key(load_identity(str(key)).public_key.encode())
    maddrs = tmp_path / "mirror.maddrs"
    mirror = swarm.children.start(cli_command(
        "bootstrap", "--initial-peers", boot, "--identity", str(key), "--store", str(tmp_path / "mirror"),
        "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--maddrs-file", str(maddrs)), tmp_path / "mirror.log")
    swarm.peers["mirror"] = mirror
    swarm.wait_for(lambda: maddrs.is_file() and maddrs.read_text().strip(), 120, "the meeting point to serve")
    swarm.children.signal_group(swarm.boot, 9)  # the bootstrap peer and its p2pd, gone for good
    swarm.boot.wait(10)
    shutil.rmtree(model_copy)  # nobody has the model but the meeting point
    mirror_addr = f"/dns4/localhost/tcp/{port}/p2p/{mirror_id}"  # a name, as a lab would publish it
    # they keep going until the meeting point has followed them (a peer that leaves as soon as it is done
    # can be gone before the meeting point's next look, every 5 s, and then nobody serves the new base)
    procs = {n: swarm.join(n, d, rounds=None, initial_peers=[boot, mirror_addr]) for n, d in (("ann", "sms_spam"), ("bob", "rotten_tomatoes"))}
    stores = {n: VersionStore(tmp_path / n) for n in (*procs, "mirror")}

    def newest(name):
        return max((i.version for i in stores[name].list()), default=0)

    swarm.wait_for(lambda: min(newest(n) for n in procs) >= 2 and newest("mirror") >= 1, 240,
                   "v2 on both contributors, and the meeting point following them")
    for name, proc in procs.items():
        swarm.children.signal_group(proc, signal.SIGTERM)
        assert proc.wait(30) in (0, 130), swarm.log(name)
    v1 = [stores[n].read_info(1) for n in procs]
    assert v1[0].hash == v1[1].hash and mirror_id not in v1[0].contributors and len(v1[0].contributors) == 2
    for n in procs:
        assert (tmp_path / n / "model" / "config.json").is_file()
        assert any(e["event"] == "download" and e.get("what") == "model" for e in swarm.events(n))
    followed = stores["mirror"].read_info(newest("mirror"))
    assert followed.hash == stores["ann"].read_info(followed.version).hash  # the contributors' base, checked and kept
    assert stores["mirror"].list()[0].hash == stores["ann"].list()[0].hash
    mirror.send_signal(signal.SIGTERM)
    assert mirror.wait(30) == 0, (tmp_path / "mirror.log").read_text()[-3000:]
    assert "meeting point stopped" in (tmp_path / "mirror.log").read_text()
