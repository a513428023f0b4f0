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
from coldfusion_p2p.swarm import streams
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
        except ConnectionError:  # closed with our bytes unread (a reset, or a broken pipe on our last write): closed all the same
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


async def _open(caller, server, handler, data: bytes = b""):
    _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, handler)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def _closed_within(reader, seconds: float) -> bool:
    """Whether the other end closes the stream within ``seconds`` (False: it is still open)."""
    try:
        await _until_closed(reader, seconds)
        return True
    except TimeoutError:
        return False


DOWNLOAD = "cfp2p_test.FusionAverager.rpc_fetch_blob"  # a handler name the download bounds apply to


def _download_of(chunks: int, sent: list, ended: list):
    """A download handler of ``chunks`` answers of 1 MiB that notes each one it yields in ``sent`` and when it ended in ``ended``."""
    async def download(request, context: P2PContext):
        try:
            for i in range(chunks):
                sent.append(i)
                yield averaging_pb2.AveragingData(tensor_part={"buffer": b"\x02" * (1 << 20)})
        finally:
            ended.append(time.monotonic())

    return download


async def _echo(requests, context: P2PContext):
    async for request in requests:
        yield averaging_pb2.AveragingData(weight=request.weight + 1)


def test_silent_dripping_and_stalled_callers_lose_their_streams_and_an_honest_caller_does_not(monkeypatch):
    """A stream opened and left silent, a body sent a byte at a time, and a caller silent between two messages each
    held a stream, its task and buffers for as long as the caller liked. Each now meets a deadline."""
    monkeypatch.setattr(streams, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "NEXT_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "BODY_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "MIN_RATE", 1 << 30)  # the body deadline: BODY_TIMEOUT, whatever the length

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(HANDLER, _echo, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            silent, _ = await _open(caller, server, HANDLER, P2P.MESSAGE_MARKER)  # a marker, then nothing (p2pd opens a stream lazily)
            header = _frame(body=b"\x00" * 1000)[:1 + P2P.HEADER_LEN]
            dripping, drip_writer = await _open(caller, server, HANDLER, header)
            stalled, _ = await _open(caller, server, HANDLER, _frame(averaging_pb2.AveragingData(weight=1.0)))

            async def drip():
                with contextlib.suppress(ConnectionError):
                    for _ in range(100):
                        drip_writer.write(b"\x00")
                        await drip_writer.drain()
                        await asyncio.sleep(0.2)

            dripper = asyncio.create_task(drip())
            closed = await asyncio.gather(*(_closed_within(r, 6.0) for r in (silent, dripping, stalled)))
            dripper.cancel()
            answers = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, HANDLER, _requests([2.0, 3.0]), averaging_pb2.AveragingData)]
            return closed, answers
        finally:
            await caller.shutdown()
            await server.shutdown()

    closed, answers = asyncio.run(main())
    assert closed == [True, True, True], closed
    assert answers == [3.0, 4.0], answers


def test_one_peer_holds_a_bounded_number_of_streams_and_another_peer_still_gets_through(monkeypatch):
    """Streams past ``PEER_STREAMS`` from one peer close unread while its first ones stay; a second peer's call works,
    and the first peer gets its room back as its streams end."""
    monkeypatch.setattr(streams, "PEER_STREAMS", 4)

    async def main():
        server, caller = await _pair()
        other = await P2P.create(initial_peers=await server.get_visible_maddrs())
        try:
            await server.add_protobuf_handler(HANDLER, _echo, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            opened = [await _open(caller, server, HANDLER) for _ in range(8)]
            closed = await asyncio.gather(*(_closed_within(reader, 2.0) for reader, _ in opened))
            theirs = [a.weight async for a in await other.iterate_protobuf_handler(
                server.peer_id, HANDLER, _requests([5.0]), averaging_pb2.AveragingData)]
            for _, writer in opened:
                writer.close()
            await asyncio.sleep(0.5)
            again = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, HANDLER, _requests([7.0]), averaging_pb2.AveragingData)]
            return closed, theirs, again
        finally:
            for p in (other, caller, server):
                await p.shutdown()

    closed, theirs, again = asyncio.run(main())
    assert sorted(closed) == [False] * 4 + [True] * 4, closed
    assert theirs == [6.0] and again == [8.0], (theirs, again)


def test_a_handler_that_takes_one_request_reads_a_short_one_only():
    """A join request or a download's name is short: a 300 KiB one closes the stream unanswered, while a handler
    that takes a stream of parts still reads messages that long."""
    async def single(request, context: P2PContext):
        yield averaging_pb2.AveragingData(weight=float(len(request.tensor_part.buffer)))

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler("cfp2p_test.single", single, averaging_pb2.AveragingData, stream_output=True)
            await server.add_protobuf_handler(HANDLER, _echo, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            long = averaging_pb2.AveragingData(tensor_part={"buffer": b"\x01" * (300 << 10)}, weight=1.0)
            reader, writer = await _open(caller, server, "cfp2p_test.single", _frame(long) + _frame())
            got, after = await _until_closed(reader, 10.0)
            short = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, "cfp2p_test.single", averaging_pb2.AveragingData(tensor_part={"buffer": b"\x01" * 1000}),
                averaging_pb2.AveragingData)]
            streamed = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, HANDLER, _requests([long]), averaging_pb2.AveragingData)]
            return got, after, short, streamed
        finally:
            await caller.shutdown()
            await server.shutdown()

    got, after, short, streamed = asyncio.run(main())
    assert got == b"" and after < 5.0, (got[:20], after)
    assert short == [1000.0] and streamed == [2.0], (short, streamed)


def test_a_download_nobody_reads_ends_and_one_peer_runs_a_bounded_number_of_them(monkeypatch):
    """A download whose caller takes nothing held the handler, its chunks and the stream for good (p2pd writes have
    no timeout); now its answer has a deadline, the handler ends, and a peer's downloads past ``PEER_DOWNLOADS``
    are closed at once."""
    monkeypatch.setattr(streams, "WRITE_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "MIN_RATE", 1 << 30)
    monkeypatch.setattr(streams, "PEER_DOWNLOADS", 2)
    ended = []
    name, download = DOWNLOAD, _download_of(128, [], ended)

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(name, download, averaging_pb2.AveragingData, stream_output=True)
            start = time.monotonic()
            opened = [await _open(caller, server, name, _frame(averaging_pb2.AveragingData(weight=1.0)) + _frame())
                      for _ in range(3)]
            third_closed = await _closed_within(opened[2][0], 2.0)
            async with asyncio.timeout(15.0):
                while len(ended) < 2:
                    await asyncio.sleep(0.1)
            for _, writer in opened:
                writer.close()
            return third_closed, [t - start for t in ended]
        finally:
            await caller.shutdown()
            await server.shutdown()

    third_closed, ended_after = asyncio.run(main())
    assert third_closed, "a third download from one peer was served"
    assert len(ended_after) == 2 and max(ended_after) < 10.0, ended_after


def test_long_messages_from_peers_in_no_group_share_one_budget_and_members_do_not(monkeypatch):
    """Each long message a caller starts is held in memory as its body arrives: a peer in no group of this process
    now starts only as many as the strangers' budget holds (the next stream closes), while a member's go on."""
    monkeypatch.setattr(streams, "STRANGER_LARGE_BYTES", 1 << 20)
    header = _frame(body=b"\x00" * (600 << 10))[:1 + P2P.HEADER_LEN] + b"\x00" * 1000  # 600 KiB announced, 1000 B sent

    async def opened_twice(caller, server):
        first = await _open(caller, server, HANDLER, header)
        await asyncio.sleep(0.3)
        second = await _open(caller, server, HANDLER, header)
        return await asyncio.gather(_closed_within(first[0], 2.0), _closed_within(second[0], 2.0))

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(HANDLER, _echo, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            stranger = await opened_twice(caller, server)
            streams.set_member_check(lambda peer: peer == caller.peer_id)
            member = await opened_twice(caller, server)
            return stranger, member
        finally:
            streams.set_member_check(None)
            await caller.shutdown()
            await server.shutdown()

    stranger, member = asyncio.run(main())
    assert stranger == [False, True], stranger
    assert member == [False, False], member


def test_a_handler_that_takes_one_request_closes_a_caller_that_sends_more_or_never_ends(monkeypatch):
    """Red team: a caller that sent 250 KB requests back to back without end-of-stream had each one kept (+4 GB in
    40 s on a joiner), and one that sent a request every 45 s kept its stream (and a download slot) for good.
    Now a second request closes the stream, and the request with its end-of-stream has one deadline."""
    monkeypatch.setattr(streams, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "BODY_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "NEXT_TIMEOUT", 30.0)  # what kept a keep-alive caller's stream before
    monkeypatch.setattr(streams, "MIN_RATE", 1 << 30)
    name = "cfp2p_test.single"

    async def single(request, context: P2PContext):
        yield averaging_pb2.AveragingData(weight=request.weight + 1)

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(name, single, averaging_pb2.AveragingData, stream_output=True)
            request = _frame(averaging_pb2.AveragingData(weight=1.0, tensor_part={"buffer": b"\x03" * (200 << 10)}))
            more, more_writer = await _open(caller, server, name, request * 2)  # two requests, no end-of-stream
            quiet, _ = await _open(caller, server, name, request)  # one request, and its end-of-stream never comes
            start = time.monotonic()
            more_closed = await _closed_within(more, 1.5)
            more_after = time.monotonic() - start
            quiet_closed = await _closed_within(quiet, 5.0)
            answers = [a.weight async for a in await caller.iterate_protobuf_handler(
                server.peer_id, name, averaging_pb2.AveragingData(weight=2.0), averaging_pb2.AveragingData)]
            return more_closed, more_after, quiet_closed, answers
        finally:
            await caller.shutdown()
            await server.shutdown()

    more_closed, more_after, quiet_closed, answers = asyncio.run(main())
    assert more_closed and more_after < 1.0, (more_closed, more_after)  # before the one-request deadline (2 s here)
    assert quiet_closed
    assert answers == [3.0], answers


def test_a_caller_that_takes_each_answer_just_in_time_still_loses_a_download_it_reads_too_slowly(monkeypatch):
    """Each answer's own deadline let a caller hold a download by taking one chunk just before it: the write budget
    covers the whole stream, so one that reads slower than MIN_RATE on the whole loses it (here: 8 MiB/s allowed,
    1 MiB read every 1.5 s, each within its own 2.1 s)."""
    monkeypatch.setattr(streams, "WRITE_TIMEOUT", 2.0)
    monkeypatch.setattr(streams, "MIN_RATE", 8 << 20)
    sent, ended = [], []
    name, download = DOWNLOAD, _download_of(200, sent, ended)

    async def main():
        server, caller = await _pair()
        try:
            await server.add_protobuf_handler(name, download, averaging_pb2.AveragingData, stream_output=True)
            start = time.monotonic()
            reader, writer = await _open(caller, server, name, _frame(averaging_pb2.AveragingData(weight=1.0)) + _frame())
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                async with asyncio.timeout(40.0):
                    while not ended:
                        await reader.readexactly(1 << 20)
                        await asyncio.sleep(1.5)
            writer.close()
            return [t - start for t in ended], len(sent)
        finally:
            await caller.shutdown()
            await server.shutdown()

    ended_after, chunks = asyncio.run(main())
    assert ended_after and ended_after[0] < 35.0, ended_after
    assert chunks < 200, chunks


def test_streams_past_the_cap_for_everyone_are_closed_except_a_members(monkeypatch):
    """Identities are free: streams from many of them fill ``ALL_STREAMS``; then a stranger's new stream is closed
    and a member's (a ready peer of the round, a groupmate) still opens."""
    monkeypatch.setattr(streams, "ALL_STREAMS", 4)

    async def main():
        server, caller = await _pair()
        others = [await P2P.create(initial_peers=await server.get_visible_maddrs()) for _ in range(2)]
        try:
            await server.add_protobuf_handler(HANDLER, _echo, averaging_pb2.AveragingData, stream_input=True, stream_output=True)
            held = [await _open(caller, server, HANDLER, P2P.MESSAGE_MARKER) for _ in range(4)]
            await asyncio.sleep(0.5)
            stranger, _ = await _open(others[0], server, HANDLER, P2P.MESSAGE_MARKER)
            streams.set_member_check(lambda peer: peer == others[1].peer_id)
            member, _ = await _open(others[1], server, HANDLER, P2P.MESSAGE_MARKER)
            closed = await asyncio.gather(*(_closed_within(r, 2.0) for r in (stranger, member, held[0][0])))
            return closed
        finally:
            streams.set_member_check(None)
            for p in (*others, caller, server):
                await p.shutdown()

    stranger_closed, member_closed, held_closed = asyncio.run(main())
    assert stranger_closed and not member_closed and not held_closed, (stranger_closed, member_closed, held_closed)


def test_a_download_slot_is_taken_once_the_request_is_in_and_members_pass_the_cap_for_everyone(monkeypatch):
    """Red team: 8 identities that sent a download request and never its end-of-stream held all 32 slots with no
    bandwidth at all; honest fetches failed and members' fetches of a new base's certificates timed out (no commit
    for 56 s). Now a stream holds a slot only once its request is in, and members pass the cap for everyone."""
    monkeypatch.setattr(streams, "ALL_DOWNLOADS", 1)
    monkeypatch.setattr(streams, "DOWNLOAD_WAIT", 3.0)
    name = DOWNLOAD

    async def download(request, context: P2PContext):
        for _ in range(64 if request.weight == 9.0 else 1):
            yield averaging_pb2.AveragingData(tensor_part={"buffer": b"\x02" * (1 << 20)})

    async def timed_fetch(p2p, server, weight):
        start = time.monotonic()
        got = [len(m.tensor_part.buffer) async for m in await p2p.iterate_protobuf_handler(
            server.peer_id, name, averaging_pb2.AveragingData(weight=weight), averaging_pb2.AveragingData)]
        return sum(got), time.monotonic() - start

    async def main():
        server, caller = await _pair()
        others = [await P2P.create(initial_peers=await server.get_visible_maddrs()) for _ in range(2)]
        try:
            await server.add_protobuf_handler(name, download, averaging_pb2.AveragingData, stream_output=True)
            # a request that never ends, from each of the caller's 4 allowed downloads: no slot taken
            _ = [await _open(caller, server, name, _frame(averaging_pb2.AveragingData(weight=1.0))) for _ in range(4)]
            await asyncio.sleep(0.5)
            honest = await timed_fetch(others[0], server, 1.0)
            # a real download nobody reads takes the one slot: a stranger waits and is refused, a member is served
            unread, _ = await _open(caller, server, name, _frame(averaging_pb2.AveragingData(weight=9.0)) + _frame())
            await asyncio.sleep(0.5)
            stranger = await timed_fetch(others[0], server, 1.0)
            streams.set_member_check(lambda peer: peer == others[1].peer_id)
            member = await timed_fetch(others[1], server, 1.0)
            return honest, stranger, member
        finally:
            streams.set_member_check(None)
            for p in (*others, caller, server):
                await p.shutdown()

    honest, stranger, member = asyncio.run(main())
    assert honest[0] == 1 << 20 and honest[1] < 2.0, honest
    assert stranger[0] == 0 and stranger[1] >= 2.5, stranger
    assert member[0] == 1 << 20 and member[1] < 2.0, member


def test_unary_calls_a_caller_gives_up_leave_nothing_and_one_peer_has_a_bounded_number_in_progress(monkeypatch):
    """hivemind kept the task of every unary call (a lane grant, an enrollment, a DHT request) that its caller gave up
    on, for as long as the process ran (30,775 calls of a plain hivemind caller: +119 MiB in a minute). Now none is
    kept; calls past ``PEER_UNARY`` from one peer get an error at once while another peer's call is answered, and a
    handler past ``UNARY_TIMEOUT`` answers with an error."""
    monkeypatch.setattr(streams, "PEER_UNARY", 4)
    monkeypatch.setattr(streams, "UNARY_TIMEOUT", 1.5)
    started = []

    async def slow(request: averaging_pb2.DownloadData, context: P2PContext) -> averaging_pb2.DownloadData:
        started.append(request.metadata)
        await asyncio.sleep(float(request.metadata or 0))
        return averaging_pb2.DownloadData(metadata=b"done " + request.metadata)

    async def call(p2p, server, seconds: str, patience: float):
        try:
            answer = await asyncio.wait_for(p2p.call_protobuf_handler(
                server.peer_id, HANDLER, averaging_pb2.DownloadData(metadata=seconds.encode()), averaging_pb2.DownloadData), patience)
            return answer.metadata.decode()
        except asyncio.TimeoutError:
            return "gave up"
        except Exception as e:  # noqa: BLE001 - the error the server answered with
            return f"error: {e}"[:80]

    async def main():
        server, caller = await _pair()
        other = await P2P.create(initial_peers=await server.get_visible_maddrs())
        try:
            await server.add_protobuf_handler(HANDLER, slow, averaging_pb2.DownloadData)
            tasks = server._client.control._handler_tasks
            given_up = await asyncio.gather(*(call(caller, server, "1.0", 0.05) for _ in range(200)))
            await asyncio.sleep(1.5)
            left = len(tasks)
            crowd = asyncio.gather(*(call(caller, server, "0.8", 5.0) for _ in range(10)))
            await asyncio.sleep(0.3)
            theirs = await call(other, server, "0", 5.0)
            crowded = await crowd
            late = await call(caller, server, "5", 10.0)
            return given_up, left, crowded, theirs, late, len(tasks)
        finally:
            for p in (other, caller, server):
                await p.shutdown()

    given_up, left, crowded, theirs, late, finally_left = asyncio.run(main())
    # (past the first 4, a refusal may come back before the caller's 50 ms are up, on a fast or idle machine)
    assert "gave up" in given_up and all(a == "gave up" or "too many calls" in a for a in given_up) and left == 0, (set(given_up), left)
    assert sorted(crowded).count("done 0.8") == 4, crowded
    assert all(a.startswith("error") and "too many calls" in a for a in crowded if a != "done 0.8"), crowded
    assert theirs == "done 0", theirs
    assert late.startswith("error") and "TimeoutError" in late, late
    assert finally_left == 0
