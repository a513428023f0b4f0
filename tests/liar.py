"""A lying contributor for tests: honest code, except that it poisons the delta it shares.

Usage: python -m tests.liar MODE JOIN_OPTIONS_JSON  (MODE: nan or huge)
"""

from __future__ import annotations

import json
import sys

import torch

from coldfusion_p2p.contributor import Contributor, JoinOptions


class Liar(Contributor):
    mode = "nan"

    def _fuse(self, delta, examples):
        if self.mode == "nan":
            delta = [d.clone() for d in delta]
            delta[0].view(-1)[0] = float("nan")
        else:
            delta = [d * 1e6 + torch.randn_like(d) for d in delta]
        return super()._fuse(delta, examples)


if __name__ == "__main__":
    Liar.mode = sys.argv[1]
    Liar(JoinOptions(**json.loads(sys.argv[2]))).run()
