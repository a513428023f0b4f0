"""The quality benchmark's central simulation is the peer-to-peer loop without a network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.procs import child_env

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality.py"


@pytest.mark.parametrize("strategy,compression", [
    ("mean", "none"),
    pytest.param("nesterov", "float16", marks=pytest.mark.slow),  # momentum in the base, float16 on the wire
    pytest.param("trimmed_mean", "none", marks=pytest.mark.slow),  # three contributors: one trimmed at each end
    pytest.param("filtered_mean", "float16", marks=pytest.mark.slow),  # decided per part of the all-reduce
])
def test_p2p_bases_equal_the_central_simulation(tmp_path, strategy, compression):
    out = tmp_path / "out"
    robust = strategy in ("trimmed_mean", "filtered_mean")  # three contributors, so that there is a majority
    seen = ["sms_spam", "trec6"] + (["rotten_tomatoes"] if robust else [])
    unseen = [] if robust else ["rotten_tomatoes"]
    got = subprocess.run(
        [sys.executable, str(BENCH), "--data", *(str(DEMO_DATA / f"{d}.jsonl") for d in seen),
         *(["--unseen", *(str(DEMO_DATA / f"{d}.jsonl") for d in unseen)] if unseen else []),
         "--model", "tiny-bert", "--rounds", "2", "--max-train", "96",
         "--max-eval", "64", "--examples-per-round", "48", "--batch-size", "16", "--max-length", "32", "--lr", "1e-3",
         "--threads", "1", "--finetune-examples", "32", "--out", str(out), "--strategy", strategy, "--compression", compression],
        capture_output=True, text=True, env=child_env(), timeout=600, check=False,
    )
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    diffs = report["p2p_vs_central_max_abs_diff"]
    assert len(diffs) == 3 and diffs[0] == 0.0 and max(diffs) <= 1e-5, diffs
    # and the rounds did move the base: equality is not the trivial kind
    from coldfusion_p2p.store import VersionStore

    store = VersionStore(out / "p2p" / "peer-sms_spam")
    assert len({store.read_info(v).hash for v in range(3)}) == 3
    assert [r["version"] for r in report["per_version"]] == [0, 1, 2]
    assert all(0.0 <= r["seen"] <= 1.0 for r in report["per_version"])
    if unseen:
        assert all(0.0 <= r["unseen"] <= 1.0 for r in report["per_version"])
        assert set(report["unseen_finetune"]) == {"v0", "v2"}
    assert report["multitask"]["seen"] is not None
    if strategy == "nesterov":  # the momentum is part of each base: stored, hashed, and the same everywhere
        from coldfusion_p2p.strategies import MOMENTUM

        body, _ = store.load(2)
        assert any(k.startswith(MOMENTUM) for k in body)
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
