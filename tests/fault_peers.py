"""Faulty contributors for tests: honest code except for one deliberate fault.

Usage: python -m tests.fault_peers FAULT JOIN_OPTIONS_JSON
  nan     shares a delta with a NaN in it
  huge    shares a delta a million times too large
  hang    announces itself ready, then hangs before the all-reduce (a frozen peer)
  weight  claims a weight of 1000 (the manifest's rule is uniform: 1)
  scaled  shares -3·B[v] as its delta: the model, wiped out (far beyond the round's bound)
  inside  shares noise just inside the old fixed bound (norm 990, max_delta_norm was 1000)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from coldfusion_p2p.contributor import Contributor, JoinOptions


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
        elif self.fault == "hang":
            self.events.emit("hanging", "ready, and now hanging on purpose")
            while True:
                time.sleep(1)
        return weight, delta


if __name__ == "__main__":
    FaultyContributor.fault = sys.argv[1]
    FaultyContributor(JoinOptions(**json.loads(sys.argv[2]))).run()
