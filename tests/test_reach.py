"""The dial-back check's server side, on loopback: what it answers, and what it refuses to do."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from coldfusion_p2p.swarm.reach import REACHABLE, UNKNOWN, UNREACHABLE, DialBackServer, listen_port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _ask(server: DialBackServer, request: bytes, observed: str, caller: str = "QmCaller") -> str:
    """Send ``request`` through a real socket pair to the handler, as a caller seen at ``observed``."""
    answer = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        await server.handle(SimpleNamespace(addr=observed, peer_id=caller), reader, writer)

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request + b"\n")
    await writer.drain()
    try:
        answer = (await asyncio.wait_for(reader.read(32), 10)).decode()
    except ConnectionError:
        answer = ""  # hung up without an answer
    writer.close()
    srv.close()
    return answer


def test_dial_back_answers_for_the_callers_own_address_only_and_refuses_junk():
    async def main():
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_port, closed_port = listening.getsockname()[1], _free_port()
        server = DialBackServer()
        try:
            assert await _ask(server, str(open_port).encode(), "/ip4/127.0.0.1/tcp/5555", "QmA") == REACHABLE
            assert await _ask(server, str(closed_port).encode(), "/ip4/127.0.0.1/tcp/5555", "QmB") == UNREACHABLE
            # the same caller again at once: no second dial and no answer (nobody can make a peer connect out in a loop)
            assert await _ask(server, str(open_port).encode(), "/ip4/127.0.0.1/tcp/5555", "QmA") == ""
            for junk in (b"70000", b"-1", b"80; rm", b"\xff\xfe", b"0", b"000080"):
                assert await _ask(server, junk, "/ip4/127.0.0.1/tcp/5555", f"Qm{junk!r}") == UNKNOWN
            # a relayed or odd observed address: nothing to dial (a relayed one names the relay's address)
            for observed in ("/p2p-circuit/p2p/QmX", "/ip4/127.0.0.1/tcp/4001/p2p/QmRelay/p2p-circuit"):
                assert await _ask(server, str(open_port).encode(), observed, "QmC" + observed[-4:]) == ""
        finally:
            listening.close()

    asyncio.run(main())


def test_listen_port_reads_the_first_tcp_address():
    assert listen_port(["/ip4/1.2.3.4/udp/9/quic", "/ip4/1.2.3.4/tcp/31337/p2p/QmX"]) == 31337
    assert listen_port(["/ip4/1.2.3.4/udp/9/quic"]) is None
