"""Fusion strategies on plain tensors: the arithmetic every reducer and the central loop share."""

import itertools
import math

import pytest
import torch

from coldfusion_p2p.config import SwarmManifest
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.fusion import delta_norm
from coldfusion_p2p.strategies import (
    MOMENTUM, FilteredMean, Nesterov, Strategy, TrimmedMean, filtered_mean, influence, kept_members, median_center,
    model_tensors, outliers, strategy_for, trimmed_mean, weighted_mean,
)


def _deltas(n, shape=(64, 33), seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=g) * scale, torch.randn(17, generator=g) * scale] for _ in range(n)]


@pytest.mark.parametrize("strategy", [Strategy(), TrimmedMean(), strategy_for("weighted")])  # coordinate-wise ones
def test_a_reduction_of_slices_is_the_slice_of_the_reduction(strategy):
    """What makes p2p = central: a reducer's slice of the result equals the same slice of the whole."""
    deltas = _deltas(5)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0] if strategy.name == "weighted" else None
    whole = strategy.reduce_all(deltas, weights)
    flat = [torch.cat([t.reshape(-1) for t in d]) for d in deltas]
    for lo, hi in ((0, 100), (100, 2000), (2000, flat[0].numel())):
        part = strategy.reduce([f[lo:hi] for f in flat], weights or [1.0] * 5)
        assert torch.equal(part, torch.cat([t.reshape(-1) for t in whole])[lo:hi])


def _squared_distances(parts, result):
    return [float(((p.double() - result.double()) ** 2).sum()) for p in parts]


@pytest.mark.parametrize("shape", [(), (0,), (7,), (100_000,), (131_072,), (3, 40_000), (1536, 384)])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0], [3.0, 1.0, 7.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0],
                                     [2.0, 6.0], [2.0**20, 5.0, 1.0, 2.0**24]])
def test_weighted_mean_is_the_exact_float64_mean_whichever_loop_adds_it(shape, weights):
    """float32 parts with whole weights are added by numpy, anything else by torch: both give, bit for
    bit, ``sum(w_i x_i) / sum(w_i)`` computed in float64 in member order and rounded once to float32,
    over values of very different sizes, -0.0 (kept where every member has it) and a transposed view;
    totals of 2, 4 and 8 (numpy's product with the inverse) as others. Each loop's distances, if asked
    for, are ``influence``'s."""
    g = torch.Generator().manual_seed(len(weights) * 131 + len(shape))
    parts = []
    for k in range(len(weights)):
        p = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 10, shape, generator=g).float())
        if p.numel():
            p.view(-1)[k::7] = 0.0
            p.view(-1)[::5] = -0.0  # every member: their sum stays -0.0
        if p.dim() == 2:
            p = p.t().contiguous().t()  # the same values in a strided view
            assert not p.is_contiguous()
        parts.append(p)
    expected = parts[0].double() * weights[0]
    for w, p in zip(weights[1:], parts[1:]):
        expected = expected + p.double() * w
    expected = (expected / sum(weights)).float()
    far = [[0.0] * len(parts) for _ in range(2)]
    by_numpy = weighted_mean(parts, weights, far[0])
    by_torch = weighted_mean([p.double() for p in parts], weights, far[1])  # the same values, another dtype: torch's loop
    for got, distances in zip((by_numpy, by_torch), far):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # bit for bit, signs of zeros included
        assert distances == pytest.approx(_squared_distances(parts, expected), rel=1e-4, abs=1e-30)  # float32 sums: a report
    assert torch.equal(weighted_mean(parts, weights).view(torch.int32), by_numpy.view(torch.int32))
    if by_numpy.numel():
        assert torch.signbit(by_numpy.reshape(-1)[::5]).all()


def test_weighted_mean_refuses_parts_of_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        weighted_mean([torch.ones(4), torch.ones(5)], [1.0, 1.0])
    with pytest.raises(ValueError, match="different shapes"):
        weighted_mean([torch.ones(4).double(), torch.ones(2, 2).double()], [1.0, 1.0])


def test_a_per_part_strategy_reduces_the_all_reduces_parts():
    """filtered_mean decides per part: the central loop, given the wire's part size, computes exactly what
    each reducer computes on its part, and without the part size it refuses rather than guess."""
    from coldfusion_p2p.swarm.averager import part_values

    size = 500
    deltas = _deltas(5, shape=(40, 33))  # 1320 values: parts of 500, 500, 320 (and one of 17)
    deltas[4] = [t * 40 for t in deltas[4]]
    deltas[3][0].view(-1)[600:900] *= 40  # far from the others in the second part only
    strategy = FilteredMean()
    whole = strategy.reduce_all(deltas, None, part_values=size)
    flat = [d[0].reshape(-1) for d in deltas]
    for lo, hi in ((0, 500), (500, 1000), (1000, 1320)):
        assert torch.equal(strategy.reduce([f[lo:hi] for f in flat], [1.0] * 5), whole[0].reshape(-1)[lo:hi])
    second = [f[500:1000] for f in flat]
    assert kept_members(second, 25.0) == [0, 1, 2] and kept_members([f[:500] for f in flat], 25.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="part size"):
        strategy.reduce_all(deltas)
    assert part_values("none") == 131072 and part_values("float16") == 2 * part_values("none")


def test_filtered_mean_of_honest_members_is_the_plain_mean_and_order_free():
    """Honest deltas of different lengths (3x apart, as different tasks make) are all kept: the round is
    ColD Fusion's mean, bit for bit, whatever order the members come in."""
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(4000, generator=g) * s * 1e-3 + 1e-3 for s in (1.0, 1.5, 2.0, 2.5, 3.0)]
    assert torch.equal(filtered_mean(parts, [1.0] * 5), weighted_mean(parts, [1.0] * 5))
    results = {filtered_mean(list(p), [1.0] * 5).numpy().tobytes() for p in itertools.permutations(parts)}
    assert len(results) == 1
    assert torch.equal(median_center(parts[:4]), (torch.sort(torch.stack(parts[:4]).double(), 0).values[1:3]).mean(0))
    assert kept_members(parts[:2] + [parts[0] * 1000], 25.0) == [0, 1]  # three: a majority can tell
    assert kept_members([parts[0], parts[0] * 1000], 25.0) == [0, 1]  # two: no majority, nobody is left out
    # most members identical in a part (only weight decay moved it): one that trained it is kept, noise is not
    same = [parts[0].clone() for _ in range(4)]
    assert kept_members(same + [parts[0] * 1.5], 25.0) == [0, 1, 2, 3, 4]
    assert kept_members(same + [parts[0] * 100], 25.0) == [0, 1, 2, 3]


def test_a_member_inside_the_filters_radius_pulls_at_most_its_share_of_it():
    """The limit of any robust rule with honest members this different: a member that stays just inside
    the radius is kept, and moves the result by its distance over the members kept, no more."""
    g = torch.Generator().manual_seed(4)
    honest = [torch.randn(4000, generator=g) * 1e-3 + 1e-3 for _ in range(4)]
    center = median_center(honest)
    radius = math.sqrt(25.0 * sorted(float((h.double() - center).pow(2).sum()) for h in honest)[2])
    away = -torch.stack(honest).double().mean(0)
    edge = (center + 0.8 * radius * away / away.norm()).float()
    result = filtered_mean(honest + [edge], [1.0] * 5)
    pull = float((result.double() - weighted_mean(honest, [1.0] * 4).double()).norm())
    assert 0 < pull <= 0.8 * radius / 5 * 1.3


def test_trimmed_mean_is_order_free_and_drops_the_extremes():
    parts = [t[0] for t in _deltas(5, shape=(1000,))]
    results = {trimmed_mean(list(p), 1).numpy().tobytes() for p in itertools.permutations(parts)}
    assert len(results) == 1
    stacked = torch.stack(parts).double()
    expected = (stacked.sum(0) - stacked.max(0).values - stacked.min(0).values) / 3
    assert torch.allclose(trimmed_mean(parts, 1).double(), expected, atol=1e-9)


@pytest.mark.parametrize("attack", ["times100", "flip", "noise20"])
@pytest.mark.parametrize("members,bad", [(5, 1), (7, 2)])
def test_trimmed_mean_bounds_what_bad_members_can_do_and_names_them(attack, members, bad):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20_000, generator=g)
    honest_deltas = [torch.randn(20_000, generator=g) * 1e-3 + 2e-3 for _ in range(members - bad)]
    honest = torch.stack(honest_deltas).mean(0)
    if attack == "times100":
        evil = [honest_deltas[0] * 100 for _ in range(bad)]
    elif attack == "flip":
        evil = [-3.0 * base for _ in range(bad)]
    else:
        evil = [torch.randn(20_000, generator=g) * float(honest_deltas[0].norm()) * 20 / math.sqrt(20_000) for _ in range(bad)]
    parts = honest_deltas + evil
    robust, plain = TrimmedMean().reduce(parts, [1.0] * members), Strategy().reduce(parts, [1.0] * members)
    assert float((robust - honest).norm()) < 0.6 * float(honest.norm())  # close to the honest members' mean
    assert float((plain - honest).norm()) > 3 * float(honest.norm())  # the plain mean is not
    named = outliers({f"p{i}": d for i, d in enumerate(influence(parts, robust))})
    assert set(named) == {f"p{i}" for i in range(members - bad, members)}
    # filtered_mean leaves the bad members out whole: the round is the honest members' own mean
    filtered = FilteredMean().reduce(parts, [1.0] * members)
    assert torch.equal(filtered, weighted_mean(honest_deltas, [1.0] * (members - bad)))
    named = outliers({f"p{i}": d for i, d in enumerate(influence(parts, filtered))})
    assert set(named) == {f"p{i}" for i in range(members - bad, members)}


def test_trim_count_follows_the_group_size():
    t = TrimmedMean()
    assert [t.trim_for(n) for n in (2, 3, 4, 5, 7, 10)] == [0, 1, 1, 1, 2, 3]


def test_nesterov_keeps_momentum_in_the_base_and_bounds_its_step():
    names = ["w"]
    base = {"w": torch.zeros(3)}
    n = Nesterov()
    d1, d2 = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([1.0, 1.0, 1.0])
    b1 = n.step(base, names, [d1])
    assert torch.allclose(b1[MOMENTUM + "w"], d1) and torch.allclose(b1["w"], 0.7 * (d1 + 0.9 * d1))
    b2 = n.step(b1, names, [d2])
    m2 = 0.9 * d1 + d2
    assert torch.allclose(b2[MOMENTUM + "w"], m2) and torch.allclose(b2["w"], b1["w"] + 0.7 * (d2 + 0.9 * m2))
    assert set(model_tensors(b2)) == {"w"}
    # the same as torch's SGD with nesterov on the outer gradient -d
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    for d in (d1, d2):
        p.grad = -d
        opt.step()
    assert torch.allclose(p.detach(), b2["w"], atol=1e-6)
    # a base whose momentum no honest run can have built is refused; the honest one passes
    bound = 1.0 * math.sqrt(3)
    assert n.state_problem(b2, names, bound) is None
    forged = dict(b2, **{MOMENTUM + "w": torch.full((3,), 100.0)})
    assert "momentum" in n.state_problem(forged, names, bound)
    assert Strategy().state_problem(b2, names, bound) is not None  # mean keeps no state
    assert n.step_factor() == pytest.approx(7.0)


def test_manifest_names_the_strategy_and_rejects_nonsense():
    assert SwarmManifest.from_dict({}).strategy() == Strategy()
    assert SwarmManifest.from_dict({"fusion": {"strategy": "nesterov"}}).strategy() == Nesterov(outer_lr=0.7, momentum=0.9)
    assert SwarmManifest.from_dict({"fusion": {"weighting": "examples"}}).strategy().name == "weighted"
    assert SwarmManifest.from_dict({"fusion": {"strategy": "trimmed_mean", "trim_fraction": 0.2}}).strategy() == TrimmedMean(trim_fraction=0.2)
    assert SwarmManifest.from_dict({"fusion": {"strategy": "filtered_mean"}}).strategy() == FilteredMean()
    m = SwarmManifest.from_dict({"fusion": {"strategy": "nesterov", "outer_lr": 1}})
    assert SwarmManifest.from_dict(m.to_dict()) == m and m.strategy().outer_lr == 1.0
    for bad in ({"strategy": "median"}, {"momentum": 1.0}, {"trim_fraction": 0.5}, {"strategy": "nesterov", "weighting": "examples"}):
        with pytest.raises(UserError):
            SwarmManifest.from_dict({"fusion": bad})


def test_delta_norm_of_the_momentum_is_not_part_of_the_models_fused_names():
    from coldfusion_p2p.model import averaged_names

    body = Nesterov().step({"w": torch.ones(4)}, ["w"], [torch.ones(4)])
    assert averaged_names(body) == ["w"] and delta_norm([body["w"]]) > 0


def test_reducers_refuse_a_fractional_weight_and_a_strategy_change_drops_old_state():
    from coldfusion_p2p.swarm.averager import part_violation

    rules = {"min_weight": 1.0, "max_weight": 500.0}
    assert part_violation(3.0, torch.zeros(3), rules) is None
    assert "whole number" in part_violation(3.3, torch.zeros(3), rules)
    with_momentum = Nesterov().step({"w": torch.ones(2)}, ["w"], [torch.ones(2)])
    after = Strategy().step(with_momentum, ["w"], [torch.ones(2)])
    assert set(after) == {"w"} and Strategy().state_problem(after, ["w"], 1.0) is None


@pytest.mark.parametrize("strategy", [Strategy(), Strategy(outer_lr=0.7), TrimmedMean(), Nesterov()], ids=lambda s: f"{s.name}-{s.outer_lr}")
def test_a_step_that_may_consume_the_delta_gives_the_same_base_bit_for_bit(strategy):
    g = torch.Generator().manual_seed(3)
    names = ["a", "b", "half", "t"]
    base = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g) * 1e3,
            "half": torch.randn(9, generator=g).half(), "t": torch.randn(4, 6, generator=g), "buffer": torch.arange(3)}
    delta = [torch.randn(300, 7, generator=g) * 1e-3, torch.randn(5, generator=g) * 1e-7,
             torch.randn(9, generator=g) * 1e-2, torch.randn(6, 4, generator=g).t()]  # a strided view: not written over
    kept = [d.clone() for d in delta]
    plain = strategy.step(base, names, delta)
    assert all(torch.equal(d, k) for d, k in zip(delta, kept))  # without consume the caller's delta is left alone
    frozen = {k: v.clone() for k, v in base.items()}
    given = [d.clone() for d in delta]
    consumed = strategy.step(base, names, given, consume=True)
    assert sorted(consumed) == sorted(plain)
    assert (consumed["a"] is given[0]) == (strategy.name != "nesterov")  # the float32 sum is written over the delta
    assert consumed["half"] is not given[2] and consumed["t"] is not given[3]  # not over a float16 base's, or a view
    def bits(t):
        return t.contiguous().view(-1).view(torch.uint8) if t.is_floating_point() else t

    for name in plain:
        assert consumed[name].dtype == plain[name].dtype and torch.equal(bits(consumed[name]), bits(plain[name])), name
    assert all(torch.equal(base[k], frozen[k]) for k in base)  # the base itself is never written
    aliased = strategy.step(base, ["a"], [base["a"]], consume=True)  # a caller that hands in the base's own tensor
    assert torch.equal(base["a"], frozen["a"]) and torch.equal(bits(aliased["a"]), bits(strategy.step(frozen, ["a"], [frozen["a"]])["a"]))


@pytest.mark.parametrize("strategy", [Strategy(), strategy_for("weighted"), Nesterov(), TrimmedMean(), FilteredMean()], ids=lambda s: s.name)
def test_a_reduction_measured_is_the_reduction_and_each_members_influence_on_it(strategy):
    """What a reducer uses in groups of three or more: the same result as ``reduce``, bit for bit, with
    the distances ``outliers`` judges, whether the mean's loop adds them up or the strategy's own reduce
    is followed by ``influence`` (a flipped member stands out either way)."""
    g = torch.Generator().manual_seed(11)
    parts = [torch.randn(70_001, generator=g) * 1e-3 for _ in range(6)] + [torch.randn(70_001, generator=g) * -2e-2]
    weights = [1.0, 3.0, 1.0, 2.0, 1.0, 1.0, 1.0] if strategy.name == "weighted" else [1.0] * 7
    result, distances = strategy.reduce_measured(parts, weights)
    assert torch.equal(result, strategy.reduce(parts, weights))
    assert distances == pytest.approx(_squared_distances(parts, result), rel=1e-4)
    assert list(outliers(dict(zip("abcdefg", distances)))) == ["g"]
