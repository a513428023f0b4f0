"""The DHT process survives a client that dies mid-request (hivemind 1.1.12 crashed on it)."""

import multiprocessing as mp
import os
import sys
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


def test_a_child_dying_while_fetching_a_handle_prints_no_traceback():
    # the reverse case: our resource-sharer thread serves a handle to a child that dies mid-handshake
    # (a group-wide Ctrl+C or SIGTERM); multiprocessing hands the reset to sys.excepthook
    import socket
    from multiprocessing import resource_sharer

    seen = []
    previous = sys.excepthook
    sys.excepthook = lambda kind, value, tb: seen.append(kind)
    try:
        swarm.quiet_hivemind()
        read, write = os.pipe()
        try:
            resource_sharer.DupFd(read)  # starts the sharer thread with a handle on offer
            address = resource_sharer._resource_sharer._address
            with socket.socket(socket.AF_UNIX) as s:  # a "child" that connects, then dies before answering
                s.connect(address)
            time.sleep(0.5)  # the sharer thread reads the handshake and fails
            assert seen == []  # dropped, not printed
            sys.excepthook(ValueError, ValueError("other"), None)
            assert seen == [ValueError]  # every other error still reaches the previous hook
        finally:
            os.close(read)
            os.close(write)
    finally:
        sys.excepthook = previous
