"""The all-reduce itself, with real averagers (DHT, averager process, p2pd) in this process."""

from __future__ import annotations

import pytest
import torch

from coldfusion_p2p.fusion import mean_delta
from coldfusion_p2p.swarm import make_averager, start_dht


@pytest.mark.parametrize("compression", ["none", "float16"])
def test_all_reduce_is_bit_identical_on_every_member_and_reports_clean(tmp_path, compression):
    g = torch.Generator().manual_seed(7)
    shapes = [(384, 384), (1000,), (3, 5, 7)]
    inputs = [[torch.randn(s, generator=g) * (i + 1) for s in shapes] for i in range(3)]
    dhts, averagers = [], []
    try:
        first = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        dhts.append(first)
        peers = [str(a) for a in first.get_visible_maddrs()]
        dhts += [start_dht(peers, ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2)]
        for dht, tensors in zip(dhts, inputs):
            av = make_averager(dht, "t", [t.clone() for t in tensors], tmp_path, compression, 2.0, 60.0, 2)
            av.set_round("t_r0_test_a1", 3, 2)
            averagers.append(av)
        controls = [av.step(weight=1.0, gather={"i": i}, timeout=30, wait=False) for i, av in enumerate(averagers)]
        results = [c.result(timeout=60) for c in controls]
        outputs = []
        for av in averagers:
            with av.get_tensors() as ts:
                outputs.append([t.clone() for t in ts])
    finally:
        for av in averagers:
            av.shutdown()
        for dht in dhts:
            dht.shutdown()
    for r in results:
        assert r["clean"] and r["failed_size"] == 0 and not r["banned"] and len(r["group"]) == 3
        assert sorted(v["i"] for v in r["gathered"].values()) == [0, 1, 2]
    for k in range(len(shapes)):
        assert torch.equal(outputs[0][k], outputs[1][k]) and torch.equal(outputs[0][k], outputs[2][k])
        mean = torch.stack([inp[k] for inp in inputs]).mean(0)
        tolerance = 1e-6 if compression == "none" else 1e-2
        assert (outputs[0][k] - mean).abs().max() <= tolerance * mean.abs().max()
    if compression == "none":  # the all-reduce is exactly the network-free average, whatever the arrival order
        for out, expected in zip(outputs[0], mean_delta(inputs)):
            assert torch.equal(out, expected)
