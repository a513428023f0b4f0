"""hivemind's p2pd streams (swarm/streams.py) against a peer that does not follow their protocol: two real
p2pd daemons on loopback, raw bytes from the caller's or the server's side, a real handler in between."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import averaging_pb2

import coldfusion_p2p.swarm  # noqa: F401 - hardens hivemind's streams on import
from coldfusion_p2p.swarm.streams import MAX_MESSAGE_BYTES, MessageTooLong

HANDLER = "cfp2p_test.echo_slow"


def _frame(message=None, *, announce: int | None = None, body: bytes | None = None) -> bytes:
    """One message as hivemind frames it: a marker, an 8-byte length, the body (``announce`` lies about the length)."""
    if message is None and body is None:
        return P2P.ERROR_MARKER + (0).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)  # end-of-stream: an empty RPCError
    data = body if body is not None else message.SerializeToString()
    length = len(data) if announce is None else announce
    return P2P.MESSAGE_MARKER + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


async def _pair():
    server = await P2P.create()
    caller = await P2P.create(initial_peers=await server.get_visible_maddrs())
    return server, caller


async def _until_closed(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """Everything the other end sends until it closes the stream, and when it did (raises on timeout)."""
    start, got = time.monotonic(), b""
    async with asyncio.timeout(seconds):
        try:
            while chunk := await reader.read(1 << 16):
                got += chunk
        except ConnectionResetError:  # closed with our bytes unread: a reset, closed all the same
            pass
    return got, time.monotonic() - start


def test_a_caller_that_talks_past_end_of_stream_gets_its_stream_closed_when_the_handler_ends():
    """hivemind's loop put a message sent after end-of-stream into a queue nobody read: the 6th one blocked it
    for good, and the stream and its socket outlived the handler. Now the stream closes at the first such
    message, and an honest caller's stream on the same handler works as before."""
    async def handler(requests, context: P2PContext):
        got = [request async for request in requests]  # to the end of the caller's stream, then answers (as a reducer does)
        await asyncio.sleep(0.5)  # still answering while the caller sends its extra messages
        for request in got:
            yield averaging_pb2.AveragingData(weight=request.weight + 1)

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(HANDLER, handler, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, HANDLER)
            writer.write(_frame(averaging_pb2.AveragingData(weight=1.0)) + _frame())  # one request, end-of-stream
            writer.write(b"".join(_frame(averaging_pb2.AveragingData(weight=9.0)) for _ in range(10)))  # then 10 more
            await writer.drain()
            got, after = await _until_closed(reader, 10.0)
            writer.close()
            # an honest caller's stream still works on the same server, and sees its answers
            answers = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, HANDLER, _requests([2.0, 3.0]), averaging_pb2.AveragingData)]
            return got, after, answers
        finally:
            await caller.shutdown()
            await server.shutdown()

    got, after, answers = asyncio.run(main())
    assert after < 5.0, f"the stream stayed open {after:.1f}s"
    assert answers == [3.0, 4.0], answers
    assert got[:1] in (b"", P2P.MESSAGE_MARKER), got[:20]  # closed on the first extra message: an answer, or none yet


def test_an_overlong_message_is_refused_before_its_body_is_read_from_either_end():
    """A message announced longer than MAX_MESSAGE_BYTES ends the stream at once, from a caller (the handler
    never sees it) and from a server (the caller's call raises MessageTooLong), however much follows."""
    seen = []

    async def handler(requests, context: P2PContext):
        async for request in requests:
            seen.append(len(request.tensor_part.buffer))
            yield averaging_pb2.AveragingData(weight=1.0)

    async def lying_server(stream_info, reader, writer):
        await reader.read(1 << 16)
        writer.write(_frame(announce=1 << 40, body=b"\x00" * (1 << 20)))  # a terabyte announced, a megabyte sent
        await writer.drain()
        await asyncio.sleep(30)
        writer.close()

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(HANDLER, handler, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, HANDLER)
            writer.write(_frame(announce=MAX_MESSAGE_BYTES + 1, body=b"\x00" * (4 << 20)))
            with contextlib.suppress(ConnectionError):  # the server may close before it has all of it
                await writer.drain()
            got, after = await _until_closed(reader, 10.0)
            writer.close()
            # a long but allowed message still goes through
            big = averaging_pb2.AveragingData(tensor_part={"buffer": b"\x01" * (4 << 20)})
            fine = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, HANDLER, _requests([big]), averaging_pb2.AveragingData)]

            await server.add_binary_stream_handler("cfp2p_test.liar", lying_server)
            start = time.monotonic()
            with pytest.raises(MessageTooLong):
                async with asyncio.timeout(10.0):
                    async for _ in await caller.iterate_protobuf_handler(
                            server.peer_id, "cfp2p_test.liar", _requests([1.0]), averaging_pb2.AveragingData):
                        pass
            return got, after, fine, time.monotonic() - start
        finally:
            await caller.shutdown()
            await server.shutdown()

    got, after, fine, raised_after = asyncio.run(main())
    assert got == b"" and after < 5.0, (got[:20], after)
    assert seen == [4 << 20] and fine == [1.0], (seen, fine)
    assert raised_after < 5.0, raised_after


async def _requests(items):
    for item in items:
        yield item if isinstance(item, averaging_pb2.AveragingData) else averaging_pb2.AveragingData(weight=item)
