"""hivemind's p2pd streams, hardened against a caller or server that does not follow the protocol.

Every streaming call between peers (the averager's join requests and parts, downloads of bases and
certificates, dial-backs) goes through pieces of hivemind 1.1.12 that trust the other end:

- ``P2P.receive_raw_data`` reads a message whose length is the first 8 bytes the other end sends, any
  length: one message announced as 20 GB is buffered in full as it arrives, until this process is
  out of memory. Here a message longer than ``MAX_MESSAGE_BYTES`` ends its stream before a byte of
  its body is read (``MessageTooLong``); the longest an honest peer sends is a part of the all-reduce
  (2 MiB of values, ``averager.WIDE_PART_BYTES``) or a 1 MiB chunk of a file. A handler that takes one
  request (a join request, a download's name) reads at most ``SMALL_MESSAGE_BYTES`` of it.
- The handler side of a stream (``P2P._add_protobuf_stream_handler``) puts each request into a queue
  of 5 that nobody reads once the caller has said end-of-stream, so a caller that sends 6 more
  messages blocks the handler's loop on that queue for good: the stream, its socket and its task
  outlive the handler, for as long as the process runs. Here a message after end-of-stream closes
  the stream, and no wait on the queue outlasts the handler.
- Nothing is timed: a stream opened and left silent, a message sent one byte a minute, or a download
  never read held its stream (about 83 KB in p2pd each, measured with 14,680 of them), its buffers
  and a task for as long as the caller liked, and any number of them. Here each stream has deadlines
  (``HEADER_TIMEOUT``: the first message's header; ``NEXT_TIMEOUT``: each later one until end-of-stream;
  ``BODY_TIMEOUT`` plus the length at ``MIN_RATE``: a body; a handler that takes one request gets it
  and the end-of-stream by the sum of the first and the third, and a second request closes the stream;
  ``WRITE_TIMEOUT`` plus all written at ``MIN_RATE``: the time spent waiting for the caller to take
  the stream's answers, ``_Writer``), one remote peer holds at most ``PEER_STREAMS`` streams open to this
  process and everyone together ``ALL_STREAMS`` (those past either are closed unread), a peer holds at
  most ``PEER_DOWNLOADS`` downloads at a time (``ALL_DOWNLOADS`` in all, taken once a request is in,
  which members pass; one past that waits up to ``DOWNLOAD_WAIT`` for a slot), and bodies longer than ``SMALL_MESSAGE_BYTES`` being read take room
  from a budget: ``PEER_LARGE_BYTES`` per peer, and ``STRANGER_LARGE_BYTES`` shared by every peer that
  is not a member of one of this process's groups (``set_member_check``; members also pass ``ALL_STREAMS``). A stream past its deadline
  or its budget is closed; nothing else is touched, and the caller may open another.
- Unary calls (a lane grant, an enrollment, the DHT's requests) come over p2pd's one persistent connection
  per process, and hivemind's ``ControlClient`` runs each in a task that it keeps by call id until the
  answer is queued. A call the caller gave up on is cancelled here, and its task was never
  dropped: 30,775 calls that a plain hivemind caller gave up after 0.3 s left as many tasks and +119 MiB in a
  minute, for as long as the process ran. Here every task leaves the table
  however it ends; one remote peer has at most ``PEER_UNARY`` calls in progress and everyone together
  ``ALL_UNARY`` (members pass that one), their requests share the long-message budget above, and a handler
  gets ``UNARY_TIMEOUT`` seconds. A call past a bound gets an error answer, as a failing handler's caller does.

``harden()`` swaps these in; ``coldfusion_p2p.swarm`` calls it on import, so every process of a peer
(its main process, and its DHT and averager processes) runs them. Module constants are read at each
use, so a test may shorten them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from typing import Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils.logging import get_logger

MAX_MESSAGE_BYTES = 16 << 20  # four times the longest frame an honest peer sends (a wide part, with framing)
SMALL_MESSAGE_BYTES = 256 << 10  # a handler's single request (a join request with its token, a file's name) is far shorter
HEADER_TIMEOUT = 20.0  # seconds from a stream's opening to its first message's header
NEXT_TIMEOUT = 60.0  # seconds between the caller's messages, until it says end-of-stream
BODY_TIMEOUT = 20.0  # seconds for a message's body, plus its length at MIN_RATE
WRITE_TIMEOUT = 30.0  # seconds for an answer to be taken by the caller, plus its length at MIN_RATE
MIN_RATE = 64 << 10  # bytes per second: the slowest link a peer may read or write at
PEER_STREAMS = 32  # streams one remote peer may hold open to this process (an honest one holds a few)
ALL_STREAMS = 512  # streams all remote peers together may hold open to this process
PEER_DOWNLOADS = 4  # downloads (a base, a file) one peer may run from this process at a time
ALL_DOWNLOADS = 32  # downloads all peers together may run from this process at a time
DOWNLOAD_WAIT = 60.0  # seconds a download waits for one of the ALL_DOWNLOADS slots before its stream closes
PEER_LARGE_BYTES = 32 << 20  # bytes of long messages (over SMALL_MESSAGE_BYTES) one peer may have in reading at once
STRANGER_LARGE_BYTES = 64 << 20  # the same, shared by every peer that is in none of this process's groups
PEER_UNARY = 32  # unary calls one remote peer may have in progress here (DHT requests end in ms; a lane grant waits 5 s at most)
ALL_UNARY = 512  # unary calls all remote peers together may have in progress here
UNARY_TIMEOUT = 30.0  # seconds a unary handler may take (the longest, a lane grant, gives up after 5)
DOWNLOADS = ("rpc_download_state", "rpc_fetch_blob")  # handler names (their ends) that answer with a download
logger = get_logger(__name__)

_member_check: Callable[[object], bool] | None = None
_original_add_binary_stream_handler = P2P.add_binary_stream_handler
_original_control_client_init = ControlClient.__init__


class MessageTooLong(ConnectionError):
    """The other end announced a message longer than it may send: the stream is dropped unread."""


class OverBudget(ConnectionError):
    """A long message that would take this process past its budget for reading such messages: the stream is dropped."""


def set_member_check(check: Callable[[object], bool] | None) -> None:
    """``check(peer_id)`` says whether a remote peer is a member of one of this process's groups or a ready peer of its
    round (the averager sets it): members' long messages (their parts) do not share the budget of strangers, and
    their streams pass ``ALL_STREAMS``."""
    global _member_check
    _member_check = check


def _release(counter: collections.Counter, key, amount: int = 1) -> None:
    """Take ``amount`` off ``counter[key]``, dropping the key at zero (a Counter of every peer ever seen would grow)."""
    counter[key] -= amount
    if counter[key] <= 0:
        del counter[key]


def _is_member(peer) -> bool:
    try:
        return bool(_member_check is not None and _member_check(peer))
    except Exception:  # noqa: BLE001 - a check that fails says "not a member"
        return False


class _Limits:
    """What remote peers hold of one P2P instance: open streams, downloads, bytes of long messages in reading."""

    def __init__(self) -> None:
        self.streams: collections.Counter = collections.Counter()
        self.downloads: collections.Counter = collections.Counter()
        self.download_slots: asyncio.Semaphore | None = None
        self.large: collections.Counter = collections.Counter()
        self.stranger_large = 0
        self.unary: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def large_message(self, peer, length: int):
        """Room for reading a message of ``length`` bytes from ``peer``; raises OverBudget without it."""
        if length <= SMALL_MESSAGE_BYTES:
            yield
            return
        stranger = not _is_member(peer)
        if self.large[peer] + length > PEER_LARGE_BYTES or (stranger and self.stranger_large + length > STRANGER_LARGE_BYTES):
            raise OverBudget(f"a message of {length} bytes is past the budget for long messages being read "
                             f"({self.large[peer]} from this peer, {self.stranger_large} from peers in no group)")
        self.large[peer] += length
        self.stranger_large += length if stranger else 0
        try:
            yield
        finally:
            _release(self.large, peer, length)
            self.stranger_large -= length if stranger else 0

    @contextlib.asynccontextmanager
    async def download(self, peer, name: str):
        """A download slot for ``peer``, taken once its request is in (a stream that never sends one holds none):
        yields False where it gets none. Members and the round's ready peers pass ``ALL_DOWNLOADS`` (red team: 8
        identities sending requests that never ended held all 32 slots, and members' fetches of a new base's
        certificates timed out: no commit for 56 s)."""
        if self.downloads[peer] >= PEER_DOWNLOADS:
            logger.debug(f"{name}: {peer} runs {self.downloads[peer]} downloads; refusing another")
            yield False
            return
        self.downloads[peer] += 1
        slot = False
        try:
            if not _is_member(peer):
                if self.download_slots is None:
                    self.download_slots = asyncio.Semaphore(ALL_DOWNLOADS)
                try:
                    await asyncio.wait_for(self.download_slots.acquire(), DOWNLOAD_WAIT)
                    slot = True
                except TimeoutError:
                    logger.debug(f"{name}: no download slot for {peer} in {DOWNLOAD_WAIT}s; refusing it")
                    yield False
                    return
            yield True
        finally:
            _release(self.downloads, peer)
            if slot:
                self.download_slots.release()


def _limits(p2p: P2P) -> _Limits:
    limits = getattr(p2p, "_cfp2p_limits", None)
    if limits is None:
        limits = p2p._cfp2p_limits = _Limits()
    return limits


async def receive_raw_data(reader: asyncio.StreamReader) -> bytes:
    """hivemind's ``P2P.receive_raw_data`` with a bound on the announced length."""
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_MESSAGE_BYTES:
        raise MessageTooLong(f"the other end announced a message of {length} bytes (at most {MAX_MESSAGE_BYTES} are read)")
    return await reader.readexactly(length)


async def _receive_request(reader: asyncio.StreamReader, input_protobuf_type, limits: _Limits, peer, max_bytes: int,
                           header_timeout: float | None, deadline: float | None = None):
    """One message from a caller, as ``P2P.receive_protobuf`` reads it, within its deadlines and budget (and all of it
    by ``deadline``, the event loop's time, where one is given)."""
    async with asyncio.timeout_at(deadline):
        async with asyncio.timeout(header_timeout):
            kind = await reader.readexactly(1)
            header = await reader.readexactly(P2P.HEADER_LEN)
        if kind not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
            raise TypeError("Invalid Protobuf message type")
        length = int.from_bytes(header, P2P.BYTEORDER)
        if length > max_bytes:
            raise MessageTooLong(f"the caller announced a message of {length} bytes (at most {max_bytes} are read here)")
        with limits.large_message(peer, length):
            async with asyncio.timeout(BODY_TIMEOUT + length / MIN_RATE):
                body = await reader.readexactly(length)
    message = input_protobuf_type() if kind == P2P.MESSAGE_MARKER else RPCError()
    message.ParseFromString(body)
    return (message, None) if kind == P2P.MESSAGE_MARKER else (None, message)


class _Writer:
    """``P2P.send_protobuf`` within the stream's write budget: the time spent waiting for the caller to take answers
    may add up to ``WRITE_TIMEOUT`` plus everything written at ``MIN_RATE``, over the whole stream. A caller that
    takes none loses its stream, and so does one that takes each answer just in time for a deadline of its own
    (a 1 MiB chunk every 45 s would hold a download for an hour)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer, self.waited, self.written = writer, 0.0, 0

    async def send(self, message) -> None:
        size = message.ByteSize()
        allowed = WRITE_TIMEOUT + (self.written + size) / MIN_RATE - self.waited
        if allowed <= 0:
            raise TimeoutError("the caller takes its answers slower than the slowest link allowed")
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(P2P.send_protobuf(message, self.writer), allowed)
        finally:
            self.waited += loop.time() - start
            self.written += size


async def _add_protobuf_stream_handler(self: P2P, name: str, handler: Callable, input_protobuf_type, max_prefetch: int = 5,
                                       balanced: bool = False, max_request: int | None = None) -> None:
    """hivemind's ``P2P._add_protobuf_stream_handler`` (same arguments, same answers to an honest caller), whose loop
    reads within deadlines and budgets, closes the stream on a message after end-of-stream, never waits on a full
    queue beyond the handler's end, and gives up an answer the caller does not take."""
    limits = _limits(self)

    async def _handle_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id
        context = P2PContext(handle_name=name, local_id=self.peer_id, remote_id=peer)
        requests: asyncio.Queue = asyncio.Queue(max_prefetch)

        async def _read_stream():
            while True:
                request = await requests.get()
                if request is None:
                    break
                yield request

        async def _process_stream() -> None:
            responses, out = handler(_read_stream(), context), _Writer(writer)
            try:
                async for response in responses:
                    try:
                        await out.send(response)
                    except Exception:  # noqa: BLE001 - the caller hung up, stopped reading, or the stream broke
                        logger.debug("Exception while sending response:", exc_info=True)
                        break
            except Exception as e:  # noqa: BLE001 - told to the caller, as hivemind does
                logger.warning("Handler failed with the exception:", exc_info=True)
                with contextlib.suppress(Exception):  # often the very connection that failed
                    await out.send(RPCError(message=str(e)))
            finally:
                with contextlib.suppress(Exception):
                    await responses.aclose()  # the handler's own cleanup runs now, not when it is collected

        with contextlib.closing(writer):
            processing = asyncio.create_task(_process_stream())
            first, ended = True, False  # ended: the caller said end-of-stream, it has nothing more to send
            # a handler taking one request gets it and the end-of-stream by one deadline: before, a caller could keep its
            # stream (and one of the process's stream and download slots) with a message every NEXT_TIMEOUT, or send
            # 250 KB messages back to back, each kept until the end-of-stream that never came (red team: +4 GB in 40 s)
            deadline = None if max_request is None else (
                asyncio.get_running_loop().time() + HEADER_TIMEOUT + BODY_TIMEOUT + max_request / MIN_RATE)
            try:
                while True:
                    timeout = None if ended else HEADER_TIMEOUT if first else NEXT_TIMEOUT
                    receiving = asyncio.create_task(_receive_request(
                        reader, input_protobuf_type, limits, peer, MAX_MESSAGE_BYTES if max_request is None else max_request, timeout,
                        None if ended else deadline))
                    await asyncio.wait({processing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    if processing.done():
                        receiving.cancel()
                        return
                    try:
                        request, _ = await receiving
                    except asyncio.IncompleteReadError:  # the caller hung up (cancelled or died)
                        return
                    if ended:  # a message after end-of-stream: not a caller of this protocol
                        logger.debug(f"{name}: a message after end-of-stream from {peer}; closing the stream")
                        return
                    if max_request is not None and not first and request is not None:  # a second request: not this protocol
                        logger.debug(f"{name}: a second request from {peer} to a handler that takes one; closing the stream")
                        return
                    first, ended = False, request is None  # ``request`` is None for the end-of-stream message
                    putting = asyncio.create_task(requests.put(request))
                    await asyncio.wait({processing, putting}, return_when=asyncio.FIRST_COMPLETED)
                    if not putting.done():  # the handler ended without reading it
                        putting.cancel()
                        return
            except Exception:  # noqa: BLE001 - a late, malformed, overlong or over-budget message: this stream ends
                logger.debug(f"{name}: closing a stream from {peer}", exc_info=True)
            finally:
                processing.cancel()

    await self.add_binary_stream_handler(name, _handle_stream, balanced=balanced)


async def _add_protobuf_unary_handler(self: P2P, handle_name: str, handler: Callable, input_protobuf_type, balanced: bool = False) -> None:
    """hivemind's ``P2P._add_protobuf_unary_handler`` within ``PEER_UNARY``, ``ALL_UNARY``, the long-message budget and
    ``UNARY_TIMEOUT``: a call past one of them raises, and its caller gets the error as from a failing handler."""
    limits = _limits(self)

    async def _unary_handler(request: bytes, remote_id) -> bytes:
        if limits.unary[remote_id] >= PEER_UNARY or (limits.unary.total() >= ALL_UNARY and not _is_member(remote_id)):
            raise ConnectionRefusedError(f"too many calls in progress ({limits.unary[remote_id]} from this peer, "
                                         f"{limits.unary.total()} in all)")
        limits.unary[remote_id] += 1
        try:
            with limits.large_message(remote_id, len(request)):
                context = P2PContext(handle_name=handle_name, local_id=self.peer_id, remote_id=remote_id)
                async with asyncio.timeout(UNARY_TIMEOUT):
                    response = await handler(input_protobuf_type.FromString(request), context)
                return response.SerializeToString()
        finally:
            _release(limits.unary, remote_id)

    await self._client.add_unary_handler(handle_name, _unary_handler, balanced=balanced)


class _HandlerTasks(dict):
    """``ControlClient._handler_tasks``, the unary calls in progress by call id, from which a call's task leaves however
    it ends: hivemind dropped it only once it had queued an answer, so a call its caller gave up on (cancelled
    here, often before its task first ran) or one to an unknown protocol stayed for good."""

    def __setitem__(self, call_id, task) -> None:
        super().__setitem__(call_id, task)
        task.add_done_callback(functools.partial(self._drop, call_id))

    def _drop(self, call_id, task) -> None:
        if self.get(call_id) is task:
            del self[call_id]


def _control_client_init(self: ControlClient, *args, **kwargs) -> None:
    _original_control_client_init(self, *args, **kwargs)
    self._handler_tasks = _HandlerTasks()


async def add_protobuf_handler(self: P2P, name: str, handler: Callable, input_protobuf_type, *, stream_input: bool = False,
                               stream_output: bool = False, balanced: bool = False) -> None:
    """hivemind's ``P2P.add_protobuf_handler``, whose stream handlers taking one request read at most
    ``SMALL_MESSAGE_BYTES`` of it (unary handlers: ``_add_protobuf_unary_handler``)."""
    if not stream_input and not stream_output:
        await self._add_protobuf_unary_handler(name, handler, input_protobuf_type, balanced=balanced)
        return

    limits, download = _limits(self), name.endswith(DOWNLOADS)

    async def _stream_handler(requests, context: P2PContext):
        if stream_input:
            request = requests
        else:
            got = [request async for request in requests]  # hivemind's ``asingle``: one request, then end-of-stream
            if len(got) != 1:
                logger.debug(f"{name}: {len(got)} requests from {context.remote_id} to a handler that takes one")
                return
            request = got[0]
        async with limits.download(context.remote_id, name) if download else contextlib.nullcontext(True) as allowed:
            if not allowed:
                return
            output = handler(request, context)
            if hasattr(output, "__aiter__"):
                async for item in output:
                    yield item
            else:
                yield await output

    await _add_protobuf_stream_handler(self, name, _stream_handler, input_protobuf_type, balanced=balanced,
                                       max_request=None if stream_input else SMALL_MESSAGE_BYTES)


async def add_binary_stream_handler(self: P2P, name: str, handler: Callable, balanced: bool = False) -> None:
    """hivemind's ``P2P.add_binary_stream_handler``, whose streams count against ``PEER_STREAMS`` and ``ALL_STREAMS``,
    and are closed when their handler ends."""
    limits = _limits(self)

    async def _guarded(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id
        with contextlib.closing(writer):
            # members (and the ready peers of this process's round) pass the cap for everyone together: identities are
            # free, and an outsider re-opening 32 streams from each of 16 of them held all of a joiner's 512 (red team)
            if limits.streams[peer] >= PEER_STREAMS or (limits.streams.total() >= ALL_STREAMS and not _is_member(peer)):
                logger.debug(f"{name}: {peer} holds {limits.streams[peer]} streams ({limits.streams.total()} in all); closing a new one")
                return
            limits.streams[peer] += 1
            try:
                await handler(stream_info, reader, writer)
            finally:
                _release(limits.streams, peer)

    await _original_add_binary_stream_handler(self, name, _guarded, balanced)


def harden() -> None:
    """Swap the bounded reader and the guarded stream handlers into hivemind's ``P2P`` (idempotent)."""
    P2P.receive_raw_data = staticmethod(receive_raw_data)
    P2P._add_protobuf_stream_handler = _add_protobuf_stream_handler
    P2P.add_protobuf_handler = add_protobuf_handler
    P2P.add_binary_stream_handler = add_binary_stream_handler
    P2P._add_protobuf_unary_handler = _add_protobuf_unary_handler
    if ControlClient.__init__ is not _control_client_init:
        ControlClient.__init__ = _control_client_init
