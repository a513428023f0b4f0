"""The DHT process survives a client that dies mid-request (hivemind 1.1.12 crashed on it)."""

import multiprocessing as mp
import os
import time

from coldfusion_p2p import swarm


def test_dht_survives_a_request_whose_sender_exited():
    dht = swarm.start_dht()
    try:
        def send_and_die():
            # what an averager does when it declares itself for matchmaking and is shut down at once:
            # the request's MPFuture carries a pipe handle that only the (now dead) sender can hand over
            dht._outer_pipe.send(("_get", [], dict(key="k", latest=False, future=swarm.MPFuture())))
            os._exit(0)

        child = mp.get_context("fork").Process(target=send_and_die)
        child.start()
        child.join(10)
        time.sleep(2.0)  # the DHT reads the request and fails to fetch the handle
        assert dht.is_alive()
        assert dht.store("still.here", 1, swarm.dht_time() + 30)
        assert dht.get("still.here", latest=True).value == 1
    finally:
        swarm.stop_process(dht)
