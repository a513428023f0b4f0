"""The round's arithmetic, with no networking: deltas, the fusion rule, and the checks on a result.

The fusion strategy (``strategies.py``) reduces the members' deltas and takes the outer step; this
module computes the deltas and decides whether one may be shared or committed at all.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from coldfusion_p2p.model import BodyState
from coldfusion_p2p.strategies import l2_norm


def body_delta(base: BodyState, finetuned: BodyState, names: list[str]) -> list[torch.Tensor]:
    """``finetuned - base`` for the fused tensors, float32, in ``names`` order."""
    missing = [n for n in names if n not in finetuned]
    if missing:
        raise KeyError(f"finetuned body lacks {missing[:3]}")
    return [finetuned[n].float() - base[n].float() for n in names]


def delta_norm(delta: list[torch.Tensor]) -> float:
    return l2_norm(delta)


@dataclass
class DeltaCheck:
    ok: bool
    reason: str = ""
    norm: float = 0.0


def check_delta(delta: list[torch.Tensor], max_norm: float) -> DeltaCheck:
    """Reject a delta with NaN/Inf values or an L2 norm beyond ``max_norm``.

    One pass: the float64 norm is finite exactly when every value is (a float32 value squared cannot
    overflow a float64, nor can a sum of fewer than 10**200 of them)."""
    wide = any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in delta)
    if wide:
        for t in delta:  # wider values could overflow the norm: look at them one by one
            if not torch.isfinite(t).all():
                return DeltaCheck(False, "averaged delta has NaN or Inf values", float("nan"))
    norm = delta_norm(delta)
    if not math.isfinite(norm):
        return DeltaCheck(False, "delta norm overflows float64" if wide else "averaged delta has NaN or Inf values", float("nan"))
    if norm > max_norm:
        return DeltaCheck(False, f"delta norm {norm:.3g} exceeds the bound {max_norm:.3g}", norm)
    return DeltaCheck(True, "", norm)


def round_bound(base_norm: float, max_delta_ratio: float) -> float:
    """How far one round may move the base: ``max_delta_ratio`` times the base's norm.

    A bound relative to the base fits every model size; a fixed norm did not (1000 was ~4000x an honest
    round's delta on the tiny test model, and meaningless on a larger one).
    """
    return base_norm * max_delta_ratio


def clip_to_norm(delta: list[torch.Tensor], bound: float, norm: float | None = None) -> tuple[list[torch.Tensor], float, bool]:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer: (delta, its norm before, clipped?).

    The scale is rounded to 7 significant digits so that every member, whatever its thread count
    (float64 sums can differ in the last bit), computes the same bytes from the same average.
    ``norm``: ``delta_norm(delta)`` if the caller has it already (``check_delta`` computes it).
    """
    norm = delta_norm(delta) if norm is None else norm
    if norm <= bound:
        return delta, norm, False
    scale = float(f"{bound / norm:.7g}")
    return [t * scale for t in delta], norm, True


def mean_delta(deltas: list[list[torch.Tensor]], weights: list[float] | None = None) -> list[torch.Tensor]:
    """The weighted average of several peers' deltas, as the swarm's all-reduce computes it for the
    ``mean`` strategy: a float64 sum (exact in practice, so independent of order) over the total weight."""
    from coldfusion_p2p.strategies import Strategy

    return Strategy().reduce_all(deltas, weights)


def slice_digests(averaged: list[torch.Tensor], slices: list) -> dict[str, str]:
    """The sha256 (first 16 bytes, hex) of each reducer's slice of an all-reduce's result.

    ``slices``: ``[reducer, values]`` in the group's order, as the averager reports them; a reducer's
    slice is that many values of the tensors flattened one after the other (hivemind cuts the vector
    into parts in that order and gives each member a run of them). Members whose results differ can
    then see which reducer's slice differs (``protocol.blame``). Empty when the sizes do not add up.
    """
    views = [t.detach().reshape(-1) for t in averaged]
    if sum(int(n) for _, n in slices) != sum(v.numel() for v in views):
        return {}
    out, tensor, offset = {}, 0, 0
    for reducer, n in slices:
        n, h = int(n), hashlib.sha256()
        if n == 0:
            continue  # a client-mode member reduces nothing
        while n > 0:
            take = min(n, views[tensor].numel() - offset)
            h.update(memoryview(views[tensor][offset:offset + take].numpy()).cast("B"))  # a run of a flat view
            offset, n = offset + take, n - take
            if offset == views[tensor].numel():
                tensor, offset = tensor + 1, 0
        out[reducer] = h.hexdigest()[:32]
    return out
