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
    """Reject a delta with NaN/Inf values or an L2 norm beyond the manifest's bound."""
    for t in delta:
        if not torch.isfinite(t).all():
            return DeltaCheck(False, "averaged delta has NaN or Inf values", float("nan"))
    norm = delta_norm(delta)
    if norm > max_norm:
        return DeltaCheck(False, f"averaged delta norm {norm:.3g} exceeds the bound {max_norm:.3g}", norm)
    return DeltaCheck(True, "", norm)


@dataclass
class OuterStep:
    """The fusion rule applied to an averaged delta. outer_lr = 1: ColD Fusion's plain average."""

    outer_lr: float = 1.0

    def apply(self, base: BodyState, names: list[str], averaged_delta: list[torch.Tensor]) -> BodyState:
        new = dict(base)
        for name, d in zip(names, averaged_delta):
            new[name] = (base[name].float() + self.outer_lr * d).to(base[name].dtype)
        return new


def weight_for(weighting: str, examples: int) -> float:
    """A contributor's weight in the average: 1 (uniform, the paper's) or its example count."""
    return float(examples) if weighting == "examples" else 1.0


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
