import math

import torch

from coldfusion_p2p.fusion import body_delta, check_delta, clip_to_norm, delta_norm, mean_delta, round_bound
from coldfusion_p2p.strategies import Strategy, Weighted


def _bodies(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g), "ids": torch.arange(3)}
    tuned = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()} for _ in range(n)]
    return base, tuned


def test_outer_step_of_mean_delta_is_the_mean_of_bodies():
    base, tuned = _bodies()
    names = ["a.weight", "b.bias"]
    deltas = [body_delta(base, t, names) for t in tuned]
    mean_delta = [torch.stack([d[i] for d in deltas]).mean(0) for i in range(len(names))]
    new = Strategy(outer_lr=1.0).step(base, names, mean_delta)
    for n in names:
        expected = torch.stack([t[n] for t in tuned]).mean(0)
        assert torch.allclose(new[n], expected, atol=1e-6)
    assert torch.equal(new["ids"], base["ids"])  # integer buffers are not fused


def test_outer_lr_scales_the_step():
    base, tuned = _bodies(1)
    names = ["a.weight"]
    d = body_delta(base, tuned[0], names)
    half = Strategy(outer_lr=0.5).step(base, names, d)
    assert torch.allclose(half["a.weight"], base["a.weight"] + 0.5 * d[0])


def test_check_delta_rejects_nan_inf_and_large_norm():
    ok = [torch.ones(4)]
    assert check_delta(ok, 10).ok and math.isclose(delta_norm(ok), 2.0)
    assert not check_delta([torch.tensor([1.0, float("nan")])], 10).ok
    assert "NaN or Inf" in check_delta([torch.tensor([float("inf")])], 10).reason
    # one pass over float32 values: the largest finite ones still make a finite float64 norm, one NaN anywhere does not
    assert check_delta([torch.full((1000,), 3.4e38)], float("inf")).ok
    assert "NaN or Inf" in check_delta([torch.zeros(10**6), torch.tensor([1.0, float("nan"), 2.0], dtype=torch.bfloat16)], 10).reason
    assert "NaN or Inf" in check_delta([torch.tensor([float("-inf")], dtype=torch.float64)], 10).reason
    assert "overflows" in check_delta([torch.full((3,), 1e200, dtype=torch.float64)], float("inf")).reason
    big = check_delta([torch.full((4,), 100.0)], 10)
    assert not big.ok and "exceeds" in big.reason


def test_delta_norm_sums_squares_in_float64_block_by_block():
    from coldfusion_p2p.strategies import NORM_CHUNK

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2 * NORM_CHUNK + 17, generator=g), torch.randn(3, 5, generator=g).t(),  # blocks, and a strided view
               torch.randn(7, generator=g).to(torch.bfloat16), torch.zeros(0)]
    exact = math.sqrt(math.fsum(float(x) ** 2 for t in tensors for x in t.double().reshape(-1).tolist()))
    assert math.isclose(delta_norm(tensors), exact, rel_tol=1e-12)
    # a NaN or Inf in a later block, past a finite first one, still shows; float32 values whose squares overflow float32 do not
    late = torch.zeros(NORM_CHUNK + 3)
    late[-1] = float("nan")
    assert math.isnan(delta_norm([late]))
    late[-1] = float("-inf")
    assert delta_norm([late]) == math.inf
    assert math.isclose(delta_norm([torch.full((NORM_CHUNK + 1,), 3.0e38)]), 3.0e38 * math.sqrt(NORM_CHUNK + 1), rel_tol=1e-6)


def test_weights_follow_the_manifests_rule_and_cap():
    assert Strategy().weight(500, 2000) == 1.0
    assert Weighted().weight(500, 2000) == 500.0
    assert Weighted().weight(10**9, 2000) == 2000.0  # capped by examples_per_round: no weight of one's choosing
    assert Strategy().weight_limits(2000) == (1.0, 1.0) and Weighted().weight_limits(2000) == (1.0, 2000.0)


def test_clip_scales_only_longer_deltas_and_the_same_way_everywhere():
    short = [torch.ones(4)]
    same, norm, clipped = clip_to_norm(short, 10.0)
    assert same is short and not clipped and math.isclose(norm, 2.0)
    long = [torch.full((4,), 100.0), torch.full((3,), -50.0)]
    out, norm, clipped = clip_to_norm(long, 10.0)
    assert clipped and math.isclose(norm, delta_norm(long)) and math.isclose(delta_norm(out), 10.0, rel_tol=1e-6)
    again, _, _ = clip_to_norm([t.clone() for t in long], 10.0)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert round_bound(280.0, 0.05) == 14.0


def test_mean_delta_does_not_depend_on_the_order_of_the_peers():
    import itertools

    g = torch.Generator().manual_seed(3)
    deltas = [[torch.randn(5000, generator=g) * scale] for scale in (1e-6, 1.0, 3e2, 7e-3)]
    results = [mean_delta(list(p))[0] for p in itertools.permutations(deltas)]
    assert all(torch.equal(results[0], r) for r in results[1:])
    naive = {torch.stack([d[0] for d in p]).sum(0).div(4).numpy().tobytes() for p in itertools.permutations(deltas)}
    assert len(naive) > 1  # a float32 sum in arrival order does depend on it: what the swarm used to do
    weighted = mean_delta(deltas, [1.0, 2.0, 3.0, 4.0])[0]
    expected = sum(w * d[0].double() for w, d in zip((1.0, 2.0, 3.0, 4.0), deltas)) / 10.0
    assert torch.equal(weighted, expected.float())


def test_slice_digests_follow_the_flattened_tensors_across_their_boundaries():
    import hashlib

    from coldfusion_p2p.fusion import slice_digests

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g), torch.randn(2, 3, generator=g)]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    slices = [["a", 12], ["client", 0], ["b", 15], ["c", 6]]  # b's slice spans the end of one tensor and the next
    got = slice_digests(tensors, slices)
    start = 0
    for reducer, n in slices:
        if n:
            assert got[reducer] == hashlib.sha256(flat[start:start + n].numpy().tobytes()).hexdigest()[:32]
        start += n
    assert "client" not in got and len(got) == 3
    assert slice_digests(tensors, [["a", 12], ["b", 20]]) == {}  # sizes that do not add up: nothing to compare
    moved = [t.clone() for t in tensors]
    moved[1][6] += 1e-6  # the last value of b's slice
    assert [r for r in got if slice_digests(moved, slices)[r] != got[r]] == ["b"]
