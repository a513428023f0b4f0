"""hivemind's p2pd streams, hardened against a caller or server that does not follow the protocol.

Every streaming call between peers (the averager's join requests and parts, downloads of bases and
certificates) goes through two pieces of hivemind 1.1.12 that trust the other end:

- ``P2P.receive_raw_data`` reads a message whose length is the first 8 bytes the other end sends, any
  length: one message announced as 20 GB is buffered in full as it arrives, until this process is
  out of memory. Here a message longer than ``MAX_MESSAGE_BYTES`` ends its stream before a byte of
  its body is read (``MessageTooLong``); the longest an honest peer sends is a part of the all-reduce
  (2 MiB of values, ``averager.WIDE_PART_BYTES``) or a 1 MiB chunk of a file.
- The handler side of a stream (``P2P._add_protobuf_stream_handler``) puts each request into a queue
  of 5 that nobody reads once the caller has said end-of-stream, so a caller that sends 6 more
  messages blocks the handler's loop on that queue for good: the stream, its socket and its task
  outlive the handler, for as long as the process runs. Here a message after end-of-stream closes
  the stream, and no wait on the queue outlasts the handler.

``harden()`` swaps both in; ``coldfusion_p2p.swarm`` calls it on import, so every process of a peer
(its main process, and its DHT and averager processes) runs them.
"""

from __future__ import annotations

import asyncio
from contextlib import closing
from typing import Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils.logging import get_logger

MAX_MESSAGE_BYTES = 16 << 20  # four times the longest frame an honest peer sends (a wide part, with framing)
logger = get_logger(__name__)


class MessageTooLong(ConnectionError):
    """The other end announced a message longer than ``MAX_MESSAGE_BYTES``: the stream is dropped unread."""


async def receive_raw_data(reader: asyncio.StreamReader) -> bytes:
    """hivemind's ``P2P.receive_raw_data`` with a bound on the announced length."""
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_MESSAGE_BYTES:
        raise MessageTooLong(f"the other end announced a message of {length} bytes (at most {MAX_MESSAGE_BYTES} are read)")
    return await reader.readexactly(length)


async def _add_protobuf_stream_handler(self: P2P, name: str, handler: Callable, input_protobuf_type, max_prefetch: int = 5,
                                       balanced: bool = False) -> None:
    """hivemind's ``P2P._add_protobuf_stream_handler`` (same arguments, same answers to an honest caller),
    whose loop closes the stream on a message after end-of-stream and never waits on a full queue
    beyond the handler's end."""

    async def _handle_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=self.peer_id, remote_id=stream_info.peer_id)
        requests: asyncio.Queue = asyncio.Queue(max_prefetch)

        async def _read_stream():
            while True:
                request = await requests.get()
                if request is None:
                    break
                yield request

        async def _process_stream() -> None:
            try:
                async for response in handler(_read_stream(), context):
                    try:
                        await P2P.send_protobuf(response, writer)
                    except Exception:  # noqa: BLE001 - the caller hung up or the stream broke: the caller sees it
                        logger.debug("Exception while sending response:", exc_info=True)
                        break
            except Exception as e:  # noqa: BLE001 - told to the caller, as hivemind does
                logger.warning("Handler failed with the exception:", exc_info=True)
                try:
                    await P2P.send_protobuf(RPCError(message=str(e)), writer)
                except Exception:  # noqa: BLE001 - often the very connection that failed
                    pass

        with closing(writer):
            processing = asyncio.create_task(_process_stream())
            ended = False  # the caller said end-of-stream: it has nothing more to send
            try:
                while True:
                    receiving = asyncio.create_task(P2P.receive_protobuf(input_protobuf_type, reader))
                    await asyncio.wait({processing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    if processing.done():
                        receiving.cancel()
                        return
                    try:
                        request, _ = await receiving
                    except asyncio.IncompleteReadError:  # the caller hung up (cancelled or died)
                        return
                    if ended:  # a message after end-of-stream: not a caller of this protocol
                        logger.debug(f"{name}: a message after end-of-stream from {stream_info.peer_id}; closing the stream")
                        return
                    ended = request is None  # ``request`` is None for the end-of-stream message
                    putting = asyncio.create_task(requests.put(request))
                    await asyncio.wait({processing, putting}, return_when=asyncio.FIRST_COMPLETED)
                    if not putting.done():  # the handler ended without reading it
                        putting.cancel()
                        return
            except Exception:  # noqa: BLE001 - a malformed or overlong message: this stream ends, nothing else
                logger.debug("Exception while receiving requests:", exc_info=True)
            finally:
                processing.cancel()

    await self.add_binary_stream_handler(name, _handle_stream, balanced=balanced)


def harden() -> None:
    """Swap the bounded reader and the closing stream handler into hivemind's ``P2P`` (idempotent)."""
    P2P.receive_raw_data = staticmethod(receive_raw_data)
    P2P._add_protobuf_stream_handler = _add_protobuf_stream_handler
