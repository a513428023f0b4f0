"""The round's arithmetic, with no networking: deltas, the fusion rule, and the checks on a result.

One round is ``B[v+1] = B[v] + outer_lr * weighted_mean_i(B_i - B[v])``. The weighted mean of the
deltas is what the peers' all-reduce computes; this room turns it into the next base and decides
whether an averaged delta may be committed at all. With outer_lr = 1 this is exactly ColD Fusion's
average of the contributors' bodies (Don-Yehiya et al., ACL 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coldfusion_p2p.model import BodyState


def body_delta(base: BodyState, finetuned: BodyState, names: list[str]) -> list[torch.Tensor]:
    """``finetuned - base`` for the fused tensors, float32, in ``names`` order."""
    missing = [n for n in names if n not in finetuned]
    if missing:
        raise KeyError(f"finetuned body lacks {missing[:3]}")
    return [finetuned[n].float() - base[n].float() for n in names]


def delta_norm(delta: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta))


@dataclass
class DeltaCheck:
    ok: bool
    reason: str = ""
    norm: float = 0.0


def check_delta(delta: list[torch.Tensor], max_norm: float) -> DeltaCheck:
    """Reject a delta with NaN/Inf values or an L2 norm beyond ``max_norm``."""
    for t in delta:
        if not torch.isfinite(t).all():
            return DeltaCheck(False, "averaged delta has NaN or Inf values", float("nan"))
    norm = delta_norm(delta)
    if norm > max_norm:
        return DeltaCheck(False, f"delta norm {norm:.3g} exceeds the bound {max_norm:.3g}", norm)
    return DeltaCheck(True, "", norm)


def round_bound(base_norm: float, max_delta_ratio: float) -> float:
    """How far one round may move the base: ``max_delta_ratio`` times the base's norm.

    A bound relative to the base fits every model size; a fixed norm did not (1000 was ~4000x an honest
    round's delta on the tiny test model, and meaningless on a larger one).
    """
    return base_norm * max_delta_ratio


def clip_to_norm(delta: list[torch.Tensor], bound: float) -> tuple[list[torch.Tensor], float, bool]:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer: (delta, its norm before, clipped?).

    The scale is rounded to 7 significant digits so that every member, whatever its thread count
    (float64 sums can differ in the last bit), computes the same bytes from the same average.
    """
    norm = delta_norm(delta)
    if norm <= bound:
        return delta, norm, False
    scale = float(f"{bound / norm:.7g}")
    return [t * scale for t in delta], norm, True


def weight_limits(weighting: str, examples_per_round: int) -> tuple[float, float]:
    """The weights the manifest's rule allows a member: exactly 1 (uniform), or 1..examples_per_round.

    Every reducer enforces these: a member claiming a weight outside them is banned from the round."""
    return (1.0, 1.0) if weighting == "uniform" else (1.0, float(examples_per_round))


@dataclass
class OuterStep:
    """The fusion rule applied to an averaged delta. outer_lr = 1: ColD Fusion's plain average."""

    outer_lr: float = 1.0

    def apply(self, base: BodyState, names: list[str], averaged_delta: list[torch.Tensor]) -> BodyState:
        new = dict(base)
        for name, d in zip(names, averaged_delta):
            new[name] = (base[name].float() + self.outer_lr * d).to(base[name].dtype)
        return new


def weight_for(weighting: str, examples: int, examples_per_round: int) -> float:
    """A contributor's weight in the average: 1 (uniform, the paper's) or the examples it trained on
    this round, capped by the manifest's ``examples_per_round``."""
    lo, hi = weight_limits(weighting, examples_per_round)
    return min(max(float(examples), lo), hi)


def mean_delta(deltas: list[list[torch.Tensor]], weights: list[float] | None = None) -> list[torch.Tensor]:
    """The weighted average of several peers' deltas, as the swarm's all-reduce computes it:
    a float64 sum (exact in practice, so independent of order) divided by the total weight, in float32."""
    weights = weights or [1.0] * len(deltas)
    total = float(sum(weights))
    out = []
    for parts in zip(*deltas):
        acc = torch.zeros(parts[0].shape, dtype=torch.float64)
        for w, t in zip(weights, parts):
            acc.add_(t, alpha=w)
        out.append((acc / total).float())
    return out
