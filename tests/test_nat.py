"""Peers behind home routers (NAT in network namespaces this test makes) take part in rounds."""

from __future__ import annotations

import json
import subprocess

import pytest

from coldfusion_p2p.procs import child_env, cli_command
from coldfusion_p2p.store import VersionStore
from tests.netns import home_networks


@pytest.mark.slow
def test_peers_behind_nat_find_out_go_client_mode_and_complete_rounds(swarm, tmp_path):
    """The bootstrap peer, ann and bob are on a public network; cy and dee each sit behind their own
    masquerading router, so nobody can dial them and they cannot reach each other. At start cy and
    dee learn that (a dial-back through the bootstrap peer fails), say so and join as clients: they
    send their deltas to the reachable reducers and reduce nothing, so no connection between the two
    homes is ever needed (no relay either). All four commit the same v1 and v2; `cfp2p status` shows
    who is direct and who is a client."""
    with home_networks(2) as net:
        pub = net.run_in(net.public, [])
        boot = swarm.start_bootstrap("tiny-bert", min_group_size=4, round_window=10.0, host=net.public_ip, wrap=pub)
        where = {"ann": (net.public, net.public_ip), "bob": (net.public, net.public_ip),
                 "cy": (net.homes[0], net.home_ips[0]), "dee": (net.homes[1], net.home_ips[1])}
        data = {"ann": "sms_spam", "bob": "rotten_tomatoes", "cy": "trec6", "dee": "sms_spam"}
        procs = {n: swarm.join(n, data[n], rounds=2, host=ip, wrap=net.run_in(ns, [])) for n, (ns, ip) in where.items()}
        stores = {n: VersionStore(tmp_path / n) for n in procs}
        swarm.wait_for(lambda: all(s.read_info(1) for s in stores.values()), 240, "v1 on every peer")
        shown = subprocess.run(pub + cli_command("status", "--initial-peers", boot, "--json"), capture_output=True, text=True,
                               timeout=120, env=child_env())
        assert shown.returncode == 0, shown.stderr[-2000:]
        reach = {p.get("name"): p.get("reach") for p in json.loads(shown.stdout)["peers"]}
        for name, proc in procs.items():
            assert swarm.wait(proc, name, 300) == 0, swarm.log(name)
        for v in (1, 2):
            infos = [s.read_info(v) for s in stores.values()]
            assert len({i.hash for i in infos}) == 1 and len(infos[0].contributors) == 4, [i.contributors for i in infos]
        for n in ("cy", "dee"):
            assert "cannot dial this peer" in swarm.log(n, tail=None) and "takes part as a client" in swarm.log(n, tail=None)
        for n in ("ann", "bob"):
            assert "cannot dial" not in swarm.log(n, tail=None)
        assert reach.get("cy") == reach.get("dee") == "client" and reach.get("ann") == reach.get("bob") == "direct", reach
        swarm.children.stop()
