"""The DHT process's request pipe survives a sender that died before or during its message."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from coldfusion_p2p.swarm.node import _SturdyPipe


def test_a_garbled_or_cut_request_is_dropped_as_a_connection_error_not_a_crash():
    ours, theirs = mp.Pipe(duplex=True)
    theirs.send_bytes(b"\x06not a pickle")  # what a sender killed mid-message leaves behind
    with pytest.raises(ConnectionError):
        _SturdyPipe(ours).recv()
    theirs.send(("ping", (), {}))  # the next request still arrives
    assert _SturdyPipe(ours).recv() == ("ping", (), {})
    theirs.close()
    with pytest.raises(ConnectionError):
        _SturdyPipe(ours).recv()
