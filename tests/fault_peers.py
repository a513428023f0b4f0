"""Faulty contributors for tests: honest code except for one deliberate fault.

Usage: python -m tests.fault_peers FAULT JOIN_OPTIONS_JSON
  nan     shares a delta with a NaN in it
  huge    shares a delta a million times too large
  hang    announces itself ready, then hangs before the all-reduce (a frozen peer)
  weight  claims a weight of 1000 (the manifest's rule is uniform: 1)
  scaled  shares -3·B[v] as its delta: the model, wiped out (far beyond the round's bound)
  inside  shares noise just inside the old fixed bound (norm 990, max_delta_norm was 1000)
  noise20 shares random noise 20 times as long as its honest delta, cut to just inside the round's
          bound (a longer delta is banned by the bound alone: this one is for the fusion strategy)
  times100 shares its honest delta times 100
  collude  shares the same noise as every other colluder (seeded by the base version), 20 times as long as
          its honest delta, cut to just inside the round's bound: bad members that agree with each other
  stall   honest until its group's all-reduce: it joins, then sends no part and serves none of its slice for
          ``STALL_SECONDS`` (past the members' timeouts), then fails its step (a spoiler with a ready record)
  slow    honest, but each round's training takes ``SLOW_SECONDS`` longer (the others wait for it: it trains)
  deaf    honest, but the first group a leader hands it is lost on the way (it starts its first step 2 s late,
          so that it follows): the leader's group holds it, it never learns so, and finds "no group"
"""

from __future__ import annotations

import json
import sys
import time

import torch

from coldfusion_p2p.contributor import Contributor, JoinOptions
from coldfusion_p2p.fusion import delta_norm


class FaultyContributor(Contributor):
    fault = "nan"

    def _contribution(self, delta, examples, bound):
        weight, delta = super()._contribution(delta, examples, bound)
        if self.fault == "nan":
            delta = [d.clone() for d in delta]
            delta[0].view(-1)[0] = float("nan")
        elif self.fault == "huge":
            delta = [d * 1e6 + torch.randn_like(d) for d in delta]
        elif self.fault == "weight":
            weight = 1000.0
        elif self.fault == "scaled":
            delta = [-3.0 * self.base.body[n].float() for n in self.names]
        elif self.fault == "inside":
            noise = [torch.randn_like(d) for d in delta]
            scale = 990.0 / float(torch.sqrt(sum((n.double() ** 2).sum() for n in noise)))
            delta = [n * scale for n in noise]
        elif self.fault in ("noise20", "times100", "collude"):
            honest = delta_norm(delta)
            if self.fault == "noise20":
                noise = [torch.randn_like(d) for d in delta]
                delta = [n * (min(20 * honest, 0.95 * bound) / delta_norm(noise)) for n in noise]
            elif self.fault == "collude":  # the same vector from every colluder: they do not stand out from each other
                g = torch.Generator().manual_seed(1000 + self.base.version)
                noise = [torch.randn(d.shape, generator=g) for d in delta]
                delta = [n * (0.95 * bound / delta_norm(noise)) for n in noise]
            else:
                delta = [d * 100 for d in delta]
            self.events.emit("fault", f"sharing {self.fault}", honest_norm=honest, sent_norm=delta_norm(delta))
        elif self.fault == "hang":
            self.events.emit("hanging", "ready, and now hanging on purpose")
            while True:
                time.sleep(1)
        return weight, delta


def equivocate() -> None:
    """This peer's reducer sends each member slightly other averages of its slice (inside every bound:
    no check catches them), so that no two members end with the same result."""
    from coldfusion_p2p.swarm import averager as A
    from coldfusion_p2p.swarm.lane import raw_part

    honest = A.CanonicalAllReduceRunner._accumulate_parts_streaming

    async def equivocating(self, stream, sender_index):
        async for answer in honest(self, stream, sender_index):
            yield raw_part(A.part_tensor(answer) + 1e-6 * (sender_index + 1), code=A.averaging_pb2.AVERAGED_PART)

    A.CanonicalAllReduceRunner._accumulate_parts_streaming = equivocating  # before the averager process forks


STALL_SECONDS = 12.0  # past the tests' reducer timeout (2 x chunk_timeout 5 s)


def stall() -> None:
    """Every group this peer's averager joins gets nothing from it: no part sent, its slice never reduced."""
    import asyncio

    from coldfusion_p2p.swarm import averager as A

    async def stalled(self, tensors, group_info, group_id=None, **kwargs):
        print(f"stall: holding group {(group_id or group_info.group_id).hex()[:12]} for {STALL_SECONDS}s", flush=True)
        await asyncio.sleep(STALL_SECONDS)
        raise RuntimeError("stalled on purpose")

    A.FusionAverager._run_allreduce_inplace_ = stalled  # before the averager process forks


SLOW_SECONDS = 6.0


def slow() -> None:
    from coldfusion_p2p.training import LocalTrainer

    honest = LocalTrainer.train

    def slow_train(self, *args, **kwargs):
        time.sleep(SLOW_SECONDS)
        return honest(self, *args, **kwargs)

    LocalTrainer.train = slow_train


def deaf() -> None:
    """The first BEGIN_ALLREDUCE this peer's averager gets is dropped (as if lost), without refusing its leader."""
    import asyncio

    from coldfusion_p2p.swarm import averager as A

    honest_step, honest_problem, honest_refuse = A.FusionAverager._step, A.FusionAverager._group_problem, A.FusionAverager._refuse_leader
    lost = "DEAF: this group is lost on the way"

    async def late_step(self, *, step, future_for_init):
        if not getattr(self, "_deaf_late", False):
            self._deaf_late = True
            await asyncio.sleep(2.0)  # the others declare first: this peer follows
        return await honest_step(self, step=step, future_for_init=future_for_init)

    def group_problem(self, leader, msg):
        if not getattr(self, "_deaf_dropped", False):
            self._deaf_dropped = True
            print(f"deaf: dropping the group {leader} handed this peer", flush=True)
            return lost
        return honest_problem(self, leader, msg)

    def refuse(self, who, why):
        if lost not in why:
            honest_refuse(self, who, why)

    A.FusionAverager._step, A.FusionAverager._group_problem, A.FusionAverager._refuse_leader = late_step, group_problem, refuse


if __name__ == "__main__":
    FaultyContributor.fault = sys.argv[1]
    if FaultyContributor.fault == "equivocate":
        equivocate()
    if FaultyContributor.fault == "deaf":
        deaf()
    if FaultyContributor.fault == "stall":
        stall()
    if FaultyContributor.fault == "slow":
        slow()
    FaultyContributor(JoinOptions(**json.loads(sys.argv[2]))).run()
