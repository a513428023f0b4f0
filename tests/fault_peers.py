"""Faulty contributors for tests: honest code except for one deliberate fault.

Usage: python -m tests.fault_peers FAULT JOIN_OPTIONS_JSON
  nan    shares a delta with a NaN in it
  huge   shares a delta a million times too large
  hang   announces itself ready, then hangs before the all-reduce (a frozen peer)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from coldfusion_p2p.contributor import Contributor, JoinOptions


class FaultyContributor(Contributor):
    fault = "nan"

    def _fuse(self, delta, examples):
        if self.fault == "nan":
            delta = [d.clone() for d in delta]
            delta[0].view(-1)[0] = float("nan")
        elif self.fault == "huge":
            delta = [d * 1e6 + torch.randn_like(d) for d in delta]
        elif self.fault == "hang":
            self.events.emit("hanging", "ready, and now hanging on purpose")
            while True:
                time.sleep(1)
        return super()._fuse(delta, examples)


if __name__ == "__main__":
    FaultyContributor.fault = sys.argv[1]
    FaultyContributor(JoinOptions(**json.loads(sys.argv[2]))).run()
