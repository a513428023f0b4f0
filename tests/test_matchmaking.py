"""The leader lookup loop of matchmaking: hivemind's own loop against the paced one this project runs.

The loop runs on hivemind's real ``PotentialLeaders``; only the DHT lookup it makes is a stand-in
that takes 2 ms and counts calls (the real lookups are counted by bench/scale.py)."""

from __future__ import annotations

import asyncio
import time

from hivemind.averaging.matchmaking import PotentialLeaders
from hivemind.p2p import PeerID

from coldfusion_p2p.swarm.averager import LEADER_LOOKUP_INTERVAL, _paced_leader_lookups


class CountingKeys:
    current_key = "k"

    def __init__(self):
        self.times: list[float] = []

    async def get_averagers(self, key, only_active):
        self.times.append(time.monotonic())
        await asyncio.sleep(0.002)  # about what a lookup among local peers takes
        return []


async def _lookups_while_leading(loop_fn, seconds: float) -> list[float]:
    """Run a lookup loop for ``seconds`` the way a leader's matchmaking drives it: hivemind's
    ``pop_next_leader`` asks for a new look whenever it has none (a leader never has an earlier one)."""
    me = PeerID(b"\x00\x04test")  # any id: nobody dials it
    leaders, keys = PotentialLeaders(me, 3.0, None), CountingKeys()
    leaders.running.set()
    leaders.search_end_time = float("inf")
    task = asyncio.create_task(loop_fn(leaders, keys))
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await leaders.update_finished.wait()
        leaders.update_finished.clear()
        leaders.update_triggered.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return [t - t0 for t in keys.times]


def test_hivemind_alone_looks_up_back_to_back_and_the_paced_loop_does_not():
    unpaced = asyncio.run(_lookups_while_leading(PotentialLeaders._update_queue_periodically, 1.0))
    paced = asyncio.run(_lookups_while_leading(_paced_leader_lookups, 1.0))
    assert len(unpaced) > 50, f"hivemind's loop made only {len(unpaced)} lookups in a second: is the stand-in too slow?"
    assert len(paced) <= 1.0 / LEADER_LOOKUP_INTERVAL + 2, f"{len(paced)} lookups in a second"
    assert paced[0] < 0.05, "the first look must not wait"
    gaps = [b - a for a, b in zip(paced, paced[1:])]
    assert gaps and min(gaps) >= LEADER_LOOKUP_INTERVAL * 0.9, gaps
