"""Fusion strategies: how a round's deltas become the next base, with no networking in them.

A strategy does two things, and the same object does them wherever a round is computed:

- ``reduce(parts, weights)``: the members' deltas (or the same slice of each) to one averaged
  delta. It works coordinate by coordinate, so a reducer of the swarm's all-reduce applying it to its
  slice computes exactly what ``bench/quality.py``'s central loop computes on whole tensors: the p2p
  bases equal the central ones by construction.
- ``step(base, names, averaged)``: the outer update, ``B[v+1]`` from ``B[v]`` and the averaged delta.
  State it keeps (Nesterov's momentum) lives in the base itself, under ``STATE_PREFIX``: it is
  stored, hashed, certified and downloaded with the body, and left out of the model (``model_tensors``).

Strategies (``[fusion] strategy`` in the manifest):

- ``mean``: ColD Fusion's plain average (Don-Yehiya et al., ACL 2023), ``outer_lr`` times it.
- ``weighted``: the average weighted by the distinct examples each member trained on this round,
  capped by ``examples_per_round`` (every reducer bans a weight outside the cap).
- ``nesterov``: DiLoCo's outer optimizer (Douillard et al., 2023): Nesterov momentum on the averaged
  delta, outer lr 0.7 and momentum 0.9 by default.
- ``trimmed_mean``: the robust one. Per coordinate, the ``trim`` largest and smallest of the members'
  values are dropped and the rest averaged (Yin et al., ICML 2018). Chosen over CenteredClip (BTARD,
  Gorbunov et al., 2021) for three reasons: its result is exact and order-free (a sort and a float64
  sum), so every reducer and the central loop agree bit for bit; it needs no clipping radius tuned to
  the scale of honest deltas, which differs per model and per round; and it is a single pass over a
  slice the reducer already holds. While fewer than ``trim`` members collude, every coordinate of the
  result lies between two honest members' values: no one member moves the base beyond the honest spread.
  Its cost: it drops honest values too, and a member pushing against the honest mean shifts which
  ones, so a round with one such member still loses part of its step.
- ``filtered_mean``: the robust one for volunteers' swarms. Per *part* of the all-reduce (the slice a
  reducer receives from every member at once, ``part_values`` values of one tensor), the members whose
  distance from the coordinate-wise median is more than ``filter_factor`` (5) times the median member's
  are left out and the rest averaged. A round of honest members is the plain mean (no honest member is
  that far from the others in the runs measured), and a member sending noise, a scaled or flipped
  delta is left out entirely: the round is what the honest members alone would have made. A member
  that knows the rule can still stay inside the radius; its pull is then at most ``filter_factor``
  times the honest spread divided by the members kept (no aggregator does better when honest deltas
  differ this much: Karimireddy et al., ICLR 2022, on heterogeneous data). The decision is per part,
  so the central loop reduces the same parts (``reduce_all(..., part_values=)``), and the result is
  exact and order-free like the others (a sort, float64 sums, members in a fixed order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from coldfusion_p2p.config import STRATEGIES

STATE_PREFIX = "cfp2p_state."  # tensors in a base that are the strategy's state, not the model's
MOMENTUM = STATE_PREFIX + "momentum."


def model_tensors(body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A base without the strategy's state: what the model loads and what is exported."""
    return {k: v for k, v in body.items() if not k.startswith(STATE_PREFIX)}


def state_tensors(body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in body.items() if k.startswith(STATE_PREFIX)}


NORM_CHUNK = 1 << 15  # values widened to float64 at a time (256 KiB, in the core's cache): never a float64 copy of a tensor


def l2_norm(tensors) -> float:
    """The L2 norm over all values of ``tensors``, their squares summed in float64 (a float32 value's
    square is exact in float64): NaN or Inf when any value is.

    In blocks of ``NORM_CHUNK`` values: the whole-tensor form (``t.double().pow(2).sum()``) made two
    float64 copies of every tensor, 180 MB for the demo's embedding matrix, whose fresh pages made it
    3 to 9 times slower (0.18 s alone, 0.3 to 1.4 s in a demo round's verify beside two other peers).
    Blocks that stay in the core's cache are faster again: 22.7M values took 23 ms in blocks of 32K
    values, 54 ms in blocks of 1M (8 MiB, written out to memory and read back).
    Sums in another order differ in the last bits, as they do with the thread count: every use allows
    for that (bounds with a margin, scales rounded to 7 digits)."""
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), NORM_CHUNK):
            block = flat[i:i + NORM_CHUNK].to(torch.float64)
            total += float(torch.dot(block, block))
    return math.sqrt(total)


REDUCE_CHUNK = 1 << 15  # values summed at a time: a 256 KiB float64 sum that stays in the core's cache
EXACT_WEIGHT = float(1 << 24)  # whole weights up to this times a float32 value are exact in float64 (24 + 24 bits < 53)


def weighted_mean(parts: list[torch.Tensor], weights: list[float], distances: list[float] | None = None) -> torch.Tensor:
    """``sum(w_i x_i) / sum(w_i)``: a float64 sum in member order (exact in practice, so the order the
    parts arrived in does not matter), returned as float32.

    Block by block (``REDUCE_CHUNK`` values): each coordinate's sum is the same, but the float64 sum no
    longer goes out to memory and back once per member. In an averager process beside three others on
    two cores, a 4-member part's reduction took 1.0-1.2 ms of CPU this way, against 1.4-1.6 ms for the
    whole part at once. Each sum starts from the first member's values rather than from zeros, and the
    quotient is rounded to float32 once: a coordinate every member left at -0.0 stays -0.0.

    float32 parts with whole weights (every part a reducer takes: ``part_violation``) are added by
    numpy, whose float32-into-float64 loops took half the time of torch's mixed-dtype ``add_`` here
    (``bench/allreduce_floor.py``'s reduce step). The same sums bit for bit: a whole weight below
    ``EXACT_WEIGHT`` times a float32 value is exact in float64, so a fused multiply-add (torch's
    ``alpha``) and a product then a sum (numpy) round the same once.

    ``distances``: a list with a 0.0 per member, to which each member's squared distance from the
    result is added: ``influence``'s, or in the numpy loop float32 sums block by block while the block
    is in the core's cache, then added in float64 (closer to the exact sum than ``influence``'s one
    float32 norm: a report either way)."""
    if any(p.shape != parts[0].shape for p in parts):  # a block of another length would broadcast, or be cut short
        raise ValueError(f"parts of different shapes: {sorted({tuple(p.shape) for p in parts})}")
    out = torch.empty(parts[0].shape, dtype=torch.float32)
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in parts) and all(
            float(w).is_integer() and abs(w) <= EXACT_WEIGHT for w in weights):
        # all weights 0 (a manifest's min_weight 0): NaN, as torch gives; a distance past float32's range: inf, as before
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            _numpy_mean([p.detach().reshape(-1).numpy() for p in parts], [float(w) for w in weights], out.view(-1).numpy(),
                        distances)
        return out
    flat_out, flats = out.view(-1), [p.reshape(-1) for p in parts]
    n, total, first = flat_out.numel(), sum(float(w) for w in weights), float(weights[0])
    acc_block = torch.empty(min(n, REDUCE_CHUNK), dtype=torch.float64)  # no member's part is written into
    for i in range(0, n, REDUCE_CHUNK):
        j = min(n, i + REDUCE_CHUNK)
        acc = acc_block[:j - i]
        acc.copy_(flats[0][i:j])
        if first != 1.0:
            acc.mul_(first)
        for w, flat in zip(weights[1:], flats[1:]):
            acc.add_(flat[i:j], alpha=float(w))  # computed in float64 (type promotion), without a float64 copy of the part
        torch.div(acc, total, out=flat_out[i:j])
    if distances is not None:
        for k, d in enumerate(influence(parts, out)):
            distances[k] += d
    return out


def _numpy_mean(flats: list[np.ndarray], weights: list[float], out: np.ndarray, distances: list[float] | None = None) -> None:
    """``weighted_mean``'s blocks for flat float32 arrays and whole weights, into ``out`` (float32).
    Every product, sum and quotient is computed in float64 (``dtype=``: a Python float beside a float32
    array would otherwise pick numpy's float32 loop).

    A total weight that is a power of two (2, 4 or 8 members of weight 1) is divided by as a product
    with its inverse, in place, and then rounded to float32: ``x * 2**-k`` and ``x / 2**k`` are the
    same real number, so the same float64 and the same float32, and numpy's mixed-dtype division was
    the slowest step of a block (a 4-member part: 115 us per 32K values, then 89)."""
    n, total = out.size, sum(weights)  # Python floats (``weighted_mean``): summed in float64, as torch's loop does
    inverse = 1.0 / total if total > 0 and math.isfinite(total) and math.frexp(total)[0] == 0.5 else None
    acc_block = np.empty(min(n, REDUCE_CHUNK), dtype=np.float64)
    scratch = np.empty_like(acc_block) if any(w != 1.0 for w in weights[1:]) else None
    apart = np.empty(acc_block.size, dtype=np.float32) if distances is not None else None
    for i in range(0, n, REDUCE_CHUNK):
        j = min(n, i + REDUCE_CHUNK)
        acc = acc_block[:j - i]
        if weights[0] == 1.0:
            acc[...] = flats[0][i:j]  # widened, exactly
        else:
            np.multiply(flats[0][i:j], weights[0], out=acc, dtype=np.float64)
        for w, flat in zip(weights[1:], flats[1:]):
            if w == 1.0:
                np.add(acc, flat[i:j], out=acc, dtype=np.float64)
            else:
                np.multiply(flat[i:j], w, out=scratch[:j - i], dtype=np.float64)
                np.add(acc, scratch[:j - i], out=acc)
        if inverse is None:
            np.divide(acc, total, out=out[i:j], dtype=np.float64, casting="same_kind")
        else:
            np.multiply(acc, inverse, out=acc)
            out[i:j] = acc
        if apart is not None:  # ``influence``, added up block by block (float32, a report, as there)
            gap = apart[:j - i]
            for k, flat in enumerate(flats):
                np.subtract(flat[i:j], out[i:j], out=gap)
                distances[k] += float(np.dot(gap, gap))


def trimmed_mean(parts: list[torch.Tensor], trim: int) -> torch.Tensor:
    """Per coordinate, the mean of the values left once the ``trim`` largest and smallest are dropped."""
    n = len(parts)
    if trim <= 0 or n - 2 * trim < 1:
        return weighted_mean(parts, [1.0] * n)
    ordered = torch.sort(torch.stack([p.float() for p in parts]), dim=0).values
    acc = torch.zeros(parts[0].shape, dtype=torch.float64)
    for i in range(trim, n - trim):  # one row at a time: the same sums whatever the slice's shape
        acc.add_(ordered[i].to(torch.float64))
    return (acc / float(n - 2 * trim)).float()


def median_center(parts: list[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median in float64 (the mean of the two middle values for an even count)."""
    ordered = torch.sort(torch.stack([p.double() for p in parts]), dim=0).values
    n = len(parts)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def filter_radius(parts: list[torch.Tensor], factor: float) -> tuple[torch.Tensor, list[float], float]:
    """``filtered_mean``'s rule on one part: (the coordinate-wise median, each member's squared distance
    from it, the largest squared distance kept: ``factor`` times the median member's)."""
    n = len(parts)
    center = median_center(parts)
    d2 = [float((p.double() - center).pow(2).sum()) for p in parts]
    median = sorted(d2)[n // 2]
    if median == 0.0:  # most members agree bit for bit here (e.g. rows only weight decay moved): the
        # radius is taken from the members' own lengths, so a member that did train these values stays
        median = sorted(float(p.double().pow(2).sum()) for p in parts)[n // 2]
    return center, d2, factor * median


def kept_members(parts: list[torch.Tensor], factor: float) -> list[int]:
    """Indices of the members within ``sqrt(factor)`` times the median member's distance from the
    coordinate-wise median (all of them for fewer than three members: there is no majority to tell)."""
    if len(parts) < 3:
        return list(range(len(parts)))
    _center, d2, limit = filter_radius(parts, factor)
    return [i for i, d in enumerate(d2) if d <= limit]


def filtered_mean(parts: list[torch.Tensor], weights: list[float], factor: float = 25.0) -> torch.Tensor:
    """The weighted mean of the members ``kept_members`` keeps (``factor`` on squared distances)."""
    keep = kept_members(parts, factor)
    return weighted_mean([parts[i] for i in keep], [weights[i] for i in keep])


def influence(parts: list[torch.Tensor], result: torch.Tensor) -> list[float]:
    """Each member's squared distance from the reduced value over this slice (a reducer adds these up
    over the parts it reduced and names members far from the rest: ``outliers``)."""
    return [float(torch.linalg.vector_norm(p.float() - result.float())) ** 2 for p in parts]  # a report: float32 is enough


def outliers(distances: dict[str, float], factor: float = 25.0) -> dict[str, float]:
    """Members whose squared distance from the result is more than ``factor`` times the median's
    (5x in norm): e.g. noise or a flipped model among honest deltas. Needs at least three members."""
    if len(distances) < 3:
        return {}
    ordered = sorted(distances.values())
    median = ordered[len(ordered) // 2]
    if median <= 0:
        return {p: d for p, d in distances.items() if d > 0}
    return {p: round(math.sqrt(d / median), 2) for p, d in distances.items() if d > factor * median}


@dataclass(frozen=True)
class Strategy:
    """The plain average, ``outer_lr`` times it: ``mean`` (and the base of the others)."""

    name: str = "mean"
    outer_lr: float = 1.0
    state_copies = 0  # float32 copies of the fused tensors kept in the base as state (not a field)
    per_part = False  # True: ``reduce`` of a slice depends on the whole part (reduce_all needs part_values)

    # --- what members claim and what reducers accept
    def weight(self, examples: int, examples_per_round: int) -> float:
        return 1.0

    def weight_limits(self, examples_per_round: int) -> tuple[float, float]:
        return 1.0, 1.0

    # --- the reducers' arithmetic (on a slice or on whole tensors alike)
    def reduce(self, parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        return weighted_mean(parts, weights)

    def reduce_measured(self, parts: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, list[float]]:
        """``reduce``, and each member's ``influence`` on its result."""
        if type(self).reduce is Strategy.reduce:  # the weighted mean: its loop adds the distances up as it goes
            distances = [0.0] * len(parts)
            return weighted_mean(parts, weights, distances), distances
        result = self.reduce(parts, weights)
        return result, influence(parts, result)

    def reduce_all(self, deltas: list[list[torch.Tensor]], weights: list[float] | None = None,
                   part_values: int | None = None) -> list[torch.Tensor]:
        """Whole deltas (one list of tensors per member) to one: the central loop's form of ``reduce``.
        ``part_values``: the all-reduce's part size for the wire in use (``averager.part_values``); a
        per-part strategy reduces each tensor in parts of that many values, as the reducers do."""
        weights = weights or [1.0] * len(deltas)
        if not self.per_part:
            return [self.reduce(list(parts), weights) for parts in zip(*deltas)]
        if not part_values:
            raise ValueError(f"the {self.name} strategy reduces per part: give reduce_all the part size")
        out = []
        for parts in zip(*deltas):
            chunks = zip(*(p.reshape(-1).split(part_values) for p in parts))
            out.append(torch.cat([self.reduce(list(c), weights) for c in chunks]).reshape(parts[0].shape))
        return out

    # --- the outer step
    def step(self, base: dict[str, torch.Tensor], names: list[str], averaged: list[torch.Tensor],
             consume: bool = False) -> dict[str, torch.Tensor]:
        """The next base. ``consume``: ``averaged`` is the caller's own copy, and a float32 tensor of it is
        overwritten (scaled by ``outer_lr`` too) and may become the new base's tensor (the sum written over
        the delta: ``d + b`` is ``b + d`` bit for bit), which spares a fresh 4 bytes per value and its page
        faults (17M values: 40 ms of a verify, then 12)."""
        new = model_tensors(base)  # a state left by another strategy (the manifest changed) is dropped
        for name, d in zip(names, averaged):
            b = base[name]
            if (consume and b.dtype == torch.float32 and d.dtype == torch.float32 and d.shape == b.shape and d.is_contiguous()
                    and d.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):  # never the base's own memory
                new[name] = (d if self.outer_lr == 1.0 else d.mul_(self.outer_lr)).add_(b)  # the same bits as below
                continue
            step = d if self.outer_lr == 1.0 else self.outer_lr * d  # 1.0 * d is d bit for bit: no pass to multiply
            new[name] = (b.float() + step).to(b.dtype)
        return new

    def step_factor(self) -> float:
        """How far one step may move the base, in units of the round's bound on the averaged delta."""
        return self.outer_lr

    def state_problem(self, body: dict[str, torch.Tensor], names: list[str], bound: float) -> str | None:
        """Why a base's strategy state cannot be this strategy's after honest rounds, or None."""
        extra = sorted(state_tensors(body))
        return f"it carries state this strategy does not keep ({extra[0]})" if extra else None


@dataclass(frozen=True)
class Weighted(Strategy):
    name: str = "weighted"

    def weight(self, examples: int, examples_per_round: int) -> float:
        lo, hi = self.weight_limits(examples_per_round)
        return min(max(float(examples), lo), hi)

    def weight_limits(self, examples_per_round: int) -> tuple[float, float]:
        return 1.0, float(examples_per_round)


@dataclass(frozen=True)
class Nesterov(Strategy):
    """``m = mu * m + d``; ``B += lr * (d + mu * m)`` (torch's SGD with nesterov=True on the outer
    gradient ``-d``). The momentum is kept in the base (``MOMENTUM + name``), zero before the first step."""

    name: str = "nesterov"
    outer_lr: float = 0.7
    momentum: float = 0.9
    state_copies = 1

    def step(self, base, names, averaged, consume=False):  # the delta is read only: the momentum is its own tensor
        new = dict(base)
        for name, d in zip(names, averaged):
            old = base.get(MOMENTUM + name)
            m = d.float().clone() if old is None else old.float() * self.momentum + d.float()
            new[MOMENTUM + name] = m
            new[name] = (base[name].float() + self.outer_lr * (d.float() + self.momentum * m)).to(base[name].dtype)
        return new

    def step_factor(self) -> float:
        # |m| <= bound / (1 - mu), so |d + mu m| <= bound / (1 - mu)
        return self.outer_lr / (1.0 - self.momentum)

    def state_problem(self, body, names, bound):
        state = state_tensors(body)
        if not state:
            return None  # v0, or a base from before the first step
        wanted = {MOMENTUM + n for n in names}
        if set(state) != wanted:
            return "its momentum does not match the model's tensors"
        for n in names:
            if state[MOMENTUM + n].shape != body[n].shape or state[MOMENTUM + n].dtype != torch.float32:
                return f"its momentum for {n} has the wrong shape or dtype"
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            return "its momentum has NaN or Inf values"
        norm = l2_norm(state.values())
        if norm > bound / (1.0 - self.momentum) * 1.001 + 1e-6:
            return f"its momentum (norm {norm:.4g}) is beyond what honest rounds can build ({bound / (1.0 - self.momentum):.4g})"
        return None


@dataclass(frozen=True)
class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean: ``trim_fraction`` of the members (at least one, when there are
    three or more) dropped at each end of every coordinate. Weights are uniform."""

    name: str = "trimmed_mean"
    trim_fraction: float = 0.3

    def trim_for(self, members: int) -> int:
        if members < 3:
            return 0
        return max(1, min(int(members * self.trim_fraction), (members - 1) // 2))

    def reduce(self, parts, weights):
        return trimmed_mean(parts, self.trim_for(len(parts)))


@dataclass(frozen=True)
class FilteredMean(Strategy):
    """Per part, the mean of the members within ``sqrt(filter_factor)`` (5x) the median member's distance
    from the coordinate-wise median: outliers are left out whole, honest rounds are the plain mean."""

    name: str = "filtered_mean"
    filter_factor: float = 25.0  # on squared distances
    per_part = True

    def reduce(self, parts, weights):
        return filtered_mean(parts, weights, self.filter_factor)


def strategy_for(name: str, outer_lr: float | None = None, momentum: float | None = None,
                 trim_fraction: float | None = None) -> Strategy:
    """The manifest's strategy. ``outer_lr``/``momentum`` None: the strategy's own defaults."""
    lr = {} if outer_lr is None else {"outer_lr": float(outer_lr)}
    if name == "mean":
        return Strategy(**lr)
    if name == "weighted":
        return Weighted(**lr)
    if name == "nesterov":
        return Nesterov(**lr, **({} if momentum is None else {"momentum": float(momentum)}))
    if name == "trimmed_mean":
        return TrimmedMean(**lr, **({} if trim_fraction is None else {"trim_fraction": float(trim_fraction)}))
    if name == "filtered_mean":
        return FilteredMean(**lr)
    raise ValueError(f"unknown fusion strategy {name!r} (one of {', '.join(STRATEGIES)})")
