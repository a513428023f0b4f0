"""A swarm cut in two halves by a real network partition (namespaces this test makes), then healed."""

from __future__ import annotations

import time

import pytest

from coldfusion_p2p.store import VersionStore
from tests.netns import two_halves

HALF = {"ann": "a", "bob": "a", "cy": "b", "dee": "b"}
DATA = {"ann": "sms_spam", "bob": "rotten_tomatoes", "cy": "trec6", "dee": "sms_spam"}


@pytest.mark.slow
def test_both_halves_of_a_partition_commit_and_every_peer_converges_on_one_history_after_the_heal(swarm, tmp_path):
    """ann and bob (with the bootstrap peer) in one namespace, cy and dee in another, one veth link between.
    All four fuse v1; the link goes down and each half (min_group_size 2) goes on committing its own
    versions; the link comes back and every peer moves to one history by the fork rule: the losing
    half's versions go to retired/, nothing is deleted, and no process exits."""
    with two_halves() as net:
        ns = {"a": net.a, "b": net.b}
        ip = {"a": net.a_ip, "b": net.b_ip}
        swarm.start_bootstrap("tiny-bert", round_window=8.0, host=net.a_ip, wrap=net.run_in(net.a, []))
        procs = {n: swarm.join(n, DATA[n], rounds=None, host=ip[h], wrap=net.run_in(ns[h], [])) for n, h in HALF.items()}
        stores = {n: VersionStore(tmp_path / n) for n in HALF}

        def top(n):
            versions = stores[n].list()
            return versions[-1] if versions else None

        swarm.wait_for(lambda: all(s.read_info(1) for s in stores.values()), 240, "v1 on every peer")
        assert len({s.read_info(1).hash for s in stores.values()}) == 1

        net.cut()
        at_cut = {n: top(n).version for n in HALF}
        swarm.wait_for(lambda: all(top(n).version >= at_cut[n] + 2 for n in HALF), 300, "each half to commit two versions on its own")
        heads = {n: top(n) for n in HALF}
        fork_at = min(heads[n].version for n in HALF)
        a_side, b_side = stores["ann"].read_info(fork_at), stores["cy"].read_info(fork_at)
        assert a_side.hash != b_side.hash, "the halves did not fork: was the link really cut?"
        assert set(a_side.contributors).isdisjoint(b_side.contributors)

        net.heal()
        healed_at, highest = time.monotonic(), max(h.version for h in heads.values())

        def converged() -> bool:
            tops = [top(n) for n in HALF]
            v = min(t.version for t in tops)
            infos = [stores[n].read_info(v) for n in HALF]
            return v >= highest and all(infos) and len({i.hash for i in infos}) == 1

        swarm.wait_for(converged, 300, "one history on every peer after the heal")
        took = time.monotonic() - healed_at
        common = min(top(n).version for n in HALF)
        print(f"partition: cut at v{min(at_cut.values())}, heads v{fork_at}..v{highest} at the heal; "
              f"one history at v{common} after {took:.1f} s")
        assert common <= highest + 2, (common, highest)  # within two rounds of the heal
        assert all(p.poll() is None for p in procs.values()), {n: p.poll() for n, p in procs.items()}
        # what each peer keeps of v0..common is one history (a peer that moves downloads the newest base only)
        kept = {n: {i.version: i.hash for i in stores[n].list() if i.version <= common} for n in HALF}
        history = {}
        for k in kept.values():
            for v, h in k.items():
                assert history.setdefault(v, h) == h, f"two different v{v} kept after the heal"
        assert all(0 in k and common in k for k in kept.values())
        losers = [n for n in HALF if history.get(heads[n].version) != heads[n].hash]
        assert losers and {HALF[n] for n in losers} in ({"a"}, {"b"}), losers  # one half moved, as one
        for n in losers:  # their own versions are kept, not deleted
            assert any((tmp_path / n / "retired").iterdir()), n
        swarm.children.stop()  # every peer leaves before the namespaces go
