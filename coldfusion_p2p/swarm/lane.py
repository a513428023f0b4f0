"""A direct, encrypted TCP lane for the all-reduce's tensor parts.

hivemind moves every part through p2pd: Python, a unix socket, the daemon, TCP, the other daemon,
another unix socket, Python again. That path carries about 100 MB/s per direction here, and made
the all-reduce 10 to 19 times slower than gloo's ``all_reduce`` of the same tensors
(``bench/allreduce.py``). A lane carries the same messages (hivemind's ``AveragingData``, the
same runner on both ends) over one plain TCP connection between the two averager processes.

Trust comes from the libp2p channel, never from the lane itself:

1. The sender asks the reducer for a lane over libp2p (``rpc_open_lane``), whose connection is
   authenticated by the reducer's peer id and encrypted. The reducer answers with a port, a fresh
   16-byte token and a fresh 256-bit key, and remembers the grant under the caller's peer id, which
   libp2p authenticated.
2. The sender dials that port on the IP address of its live libp2p connection to the reducer (never
   an address the reducer names), and presents the token. A token is good for one connection,
   for ``GRANT_TTL`` seconds. The reducer answers with a sealed acceptance, so the sender knows it
   reached the holder of the key before it sends a part (until then it can still take p2pd).
3. Every frame is AES-256-GCM under the grant's key, with a per-direction counter as nonce: a frame
   that was changed, replayed, reordered, or sent by anyone without the key fails to decrypt, and
   the lane ends. The stream's end is an authenticated empty frame, so a cut is never taken for an
   end. Over loopback only, frames go unencrypted (``sealed_for``): nothing leaves the machine, and
   the cipher was the lane's largest cost there.

A frame holds one message: its ``AveragingData`` fields, and then, for an uncompressed float32
part, the tensor's bytes as they lie in memory (``LanePart``). They are sent from the tensor and read
into the buffer the received tensor is made of: encoding a part into protobuf and back cost about
two fifths of a peer's CPU work in the all-reduce (``bench/allreduce_floor.py``). Anything else (a
compressed part, an answer with a code) travels as its whole protobuf message.

So a lane's bytes come from the peer libp2p named, exactly as a p2pd stream's do, and the runner
checks them as it checks any member's parts. Whatever fails (no grant: an older peer, or a lane
turned off; no route: a firewall, a NAT), the part goes over the p2pd stream as before; a peer
whose lane failed is not tried again for ``BROKEN_FOR`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.logging import get_logger

MAGIC = b"cfp2p-lane/2\n"  # 2: raw tensor bytes after each message's fields (a /1 peer's lane is refused: p2pd then)
TOKEN_BYTES = 16
KEY_BYTES = 32
GRANT_BYTES = 2 + TOKEN_BYTES + KEY_BYTES  # what rpc_open_lane answers: port, token, key
GRANT_TTL = 60.0  # seconds a grant may wait for its connection
MAX_GRANTS = 1024  # grants held at once; the oldest go first
HELLO_TIMEOUT = 2.0  # seconds a new connection has to present its token (an honest sender sends it at once)
MAX_UNAUTHENTICATED = 64  # connections that have not yet presented a token; past it, the oldest is dropped
MAX_UNAUTHENTICATED_PER_HOST = 8  # the same, per source address: one host's flood cannot crowd out another's sender
MAX_CONNECTIONS = 1024  # connections a reducer holds at once, every kind (each member holds one lane per group)
GRANT_TIMEOUT = 5.0  # seconds a sender waits for a grant before it takes the p2pd stream
CONNECT_TIMEOUT = 3.0  # seconds a sender waits to connect before it takes the p2pd stream
WRITE_TIMEOUT = 30.0  # seconds one frame may wait for the other end to read (a reducer uses its sender timeout)
BROKEN_FOR = 600.0  # seconds a reducer whose lane cannot be reached (or is not served) is reached over p2pd only
FINISH_WAIT = 1.0  # seconds a reducer that refused a sender reads on for it to hang up (``Channel.finish``)
RETRY_AFTER = 60.0  # seconds before a lane is asked again after a slow grant or a connection dropped before acceptance
# encrypt lanes over loopback too: for tests, ``bench/allreduce.py --seal-loopback``, and peers reached through a
# plain TCP port forward on 127.0.0.1 (set CFP2P_SEAL_LOOPBACK=1)
SEAL_LOOPBACK = os.environ.get("CFP2P_SEAL_LOOPBACK", "") not in ("", "0")
_TO_REDUCER, _TO_SENDER = b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"
_FLOAT16 = runtime_pb2.CompressionType.FLOAT16
RAW = {runtime_pb2.CompressionType.NONE: torch.float32, _FLOAT16: torch.float16}  # a float32 part's wire forms that go raw
_UNZEROED_FROM = 1 << 16  # bytes: a read this long goes into memory that is not zeroed first (``Channel._read_exactly``)
_F16_MIN, _F16_MAX = torch.finfo(torch.float16).min, torch.finfo(torch.float16).max
logger = get_logger(__name__)


class LaneError(Exception):
    """The lane broke or was tampered with: the exchange over it has failed."""


def max_frame(part_size_bytes: int) -> int:
    """The longest frame a lane accepts: one part (hivemind's parts are at most ``part_size_bytes``
    after compression) with its message framing and the cipher's tag, and room to spare."""
    return 2 * part_size_bytes + (1 << 16)


def group_frame_limit(most: int, part_size_bytes: int | None) -> int:
    """A lane's frame limit for a group of ``part_size_bytes`` parts (None: unknown), never above ``most``."""
    return min(most, max_frame(part_size_bytes)) if part_size_bytes else most


class LanePart:
    """A part message whose tensor travels raw on a lane: ``meta`` is the ``AveragingData`` without the
    tensor's bytes, ``wire`` the tensor whose bytes travel (float32, or float16 for a float32 part in
    float16), ``tensor`` its float32 values (made once, when asked for). Reads of other fields go to
    ``meta``; ``message()`` is the whole protobuf message, for a p2pd stream (built once, so an average
    encoded for several senders is encoded once)."""

    __slots__ = ("meta", "wire", "_values", "_message")

    def __init__(self, meta: averaging_pb2.AveragingData, wire: torch.Tensor):
        self.meta, self.wire, self._values, self._message = meta, wire, None, None

    @property
    def tensor(self) -> torch.Tensor:
        if self._values is None:
            self._values = self.wire if self.wire.dtype == torch.float32 else self.wire.to(torch.float32)
        return self._values

    def __getattr__(self, name):
        if name.startswith("__") or name in LanePart.__slots__:  # not set yet (copy, pickle): no recursion into meta
            raise AttributeError(name)
        return getattr(self.meta, name)

    def message(self) -> averaging_pb2.AveragingData:
        if self._message is None:
            message = averaging_pb2.AveragingData()
            message.CopyFrom(self.meta)
            message.tensor_part.buffer = self.wire.numpy().tobytes()
            self._message = message
        return self._message


def raw_part(tensor: torch.Tensor, compression: int = runtime_pb2.CompressionType.NONE, **fields) -> LanePart:
    """``AveragingData(tensor_part=serialize_torch_tensor(tensor, compression), **fields)`` for a float32
    tensor, uncompressed or in float16, without the protobuf encoding: on a lane the bytes are sent from
    the tensor's memory (or its float16 copy), and encoded only for a p2pd stream."""
    meta = runtime_pb2.Tensor(compression=compression, size=tensor.shape, dtype="float32",
                              requires_grad=False)  # a part never asks for gradients (see ``part_tensor``)
    assert compression in RAW, "raw parts are float32, uncompressed or in float16"
    values = tensor.detach().contiguous()
    return LanePart(averaging_pb2.AveragingData(tensor_part=meta, **fields), _half(values) if compression == _FLOAT16 else values)


def as_message(message):
    """The protobuf message a p2pd stream carries."""
    return message.message() if isinstance(message, LanePart) else message


def part_tensor(message) -> torch.Tensor:
    """The tensor a part message carries: ``deserialize_torch_tensor(message.tensor_part)``, never tracking
    gradients. The sender chooses the message's ``requires_grad``: honoured, it made the average track
    gradients, then the averager's own tensors, whose autograd history kept every later round's parts
    alive, and every peer's parts asked for it from then on (red team: memory grew every round)."""
    tensor = message.tensor if isinstance(message, LanePart) else decode_tensor(message.tensor_part)
    return tensor.detach()


def _half(tensor: torch.Tensor) -> torch.Tensor:
    """``Float16Compression``'s float16 values of a float32 tensor (clamped to float16's range), with the
    clamp's pass only when a value is out of that range (a delta's values never are)."""
    if tensor.numel():
        low, high = (float(v) for v in torch.aminmax(tensor))
        if not _F16_MIN <= low <= high <= _F16_MAX:  # out of range, or a NaN (aminmax's answer then) beside such values
            tensor = torch.clamp(tensor, _F16_MIN, _F16_MAX)
    return tensor.to(torch.float16)


def encode_tensor(tensor: torch.Tensor, compression: int) -> runtime_pb2.Tensor:
    """``serialize_torch_tensor(tensor, compression)``, the same bytes; a float32 tensor in float16 in
    fewer passes over it than hivemind's four (copy, clamp, cast, ``tobytes``)."""
    if compression != _FLOAT16 or tensor.dtype != torch.float32:
        return serialize_torch_tensor(tensor, compression)
    return runtime_pb2.Tensor(compression=_FLOAT16, buffer=_half(tensor.detach()).numpy().tobytes(), size=tensor.shape,
                              dtype="float32", requires_grad=tensor.requires_grad)


def decode_tensor(t: runtime_pb2.Tensor) -> torch.Tensor:
    """``deserialize_torch_tensor(t)``, the same values; float16 bytes of a float32 tensor widened by torch
    (hivemind widens them with numpy, whose float16 cast is scalar: 8x slower here, and half of the
    demo's all-reduce CPU time when measured with py-spy). A NaN stays NaN, its payload bits may not
    (no part holding NaN is accepted). Anything else, or bytes that are not what the sizes say, goes
    to hivemind's decoder, which judges it as before."""
    if _wire_dtype(t, len(t.buffer)) == torch.float16:
        half = torch.from_numpy(np.frombuffer(t.buffer, dtype=np.float16))  # read-only, only read (hivemind silences
        # torch's warning about that for its own decoder, and so for this one)
        return half.to(torch.float32).reshape(tuple(t.size)).requires_grad_(t.requires_grad)
    return deserialize_torch_tensor(t)


def _wire_dtype(t: runtime_pb2.Tensor, nbytes: int) -> torch.dtype | None:
    """The dtype ``nbytes`` bytes are in when they are exactly a float32 tensor of ``t``'s sizes in one of
    the ``RAW`` forms ``t`` declares; None for anything else."""
    dtype = RAW.get(t.compression)
    if dtype is None or t.dtype != "float32" or len(t.size) > 8 or math.prod(t.size) * dtype.itemsize != nbytes:
        return None  # sizes are uint32: never negative
    return dtype


def _raw_wire(meta: averaging_pb2.AveragingData, raw: bytearray | memoryview) -> torch.Tensor | None:
    """A frame's raw bytes as the tensor they are on the wire, when they are exactly what the fields
    declare (its ``LanePart``'s values are then what ``deserialize_torch_tensor`` makes of the same bytes
    in ``tensor_part.buffer``, never tracking gradients); None for anything else."""
    t = meta.tensor_part
    dtype = _wire_dtype(t, len(raw)) if meta.HasField("tensor_part") and not t.buffer else None
    return None if dtype is None else torch.frombuffer(raw, dtype=dtype).reshape(tuple(t.size))


class Channel:
    """One lane connection: length-prefixed AES-256-GCM frames, each one message (``LanePart`` or protobuf).

    A frame's plain bytes: the length of the message's fields (4 bytes), the fields (protobuf), and the
    raw tensor bytes of a ``LanePart``. Unsealed, those are sent straight from the tensor's memory and
    read straight into the buffer the received tensor is made of (``sock_recv_into``: asyncio's stream
    reader copied every byte twice more, and was the largest cost of a lane when measured)."""

    def __init__(self, sock: socket.socket, key: bytes, *, outbound: bool, frame_limit: int, sealed: bool = True,
                 write_timeout: float | None = None):
        self.sock = sock
        self._write_timeout = write_timeout or WRITE_TIMEOUT
        self._loop = asyncio.get_running_loop()
        self._aead = AESGCM(key) if sealed else None  # None: loopback, where frames go as they are (``sealed_for``)
        self._send_prefix, self._recv_prefix = (_TO_REDUCER, _TO_SENDER) if outbound else (_TO_SENDER, _TO_REDUCER)
        self._sent = self._received = 0
        self._frame_limit = frame_limit
        self.ended = False  # whether the other end's end of stream has been read

    async def send(self, message: averaging_pb2.AveragingData | LanePart | None) -> None:
        """Send one message; None sends the end of the stream."""
        if message is None:
            return await self._send_sealed(b"")
        if isinstance(message, LanePart):
            fields, raw = message.meta.SerializeToString(), memoryview(message.wire.numpy()).cast("B")
        else:
            fields, raw = message.SerializeToString(), b""
        head = struct.pack("<I", len(fields)) + fields
        if self._aead is not None:
            return await self._send_sealed(b"".join((head, raw)))
        self._sent += 1  # unsealed: the tensor's bytes go from its memory, without a copy
        await self._write(struct.pack("<I", len(head) + len(raw)) + head, raw)

    async def _send_sealed(self, plain: bytes) -> None:
        sealed = self._aead.encrypt(self._send_prefix + struct.pack("<Q", self._sent), plain, None) if self._aead else plain
        self._sent += 1
        # the length goes out with the frame's first bytes (no 4-byte packet of its own), the rest without a copy
        await self._write(struct.pack("<I", len(sealed)) + sealed[:4096], memoryview(sealed)[4096:])

    async def _write(self, first: bytes, rest) -> None:
        try:
            await asyncio.wait_for(self._loop.sock_sendall(self.sock, first), self._write_timeout)
            if len(rest):
                await asyncio.wait_for(self._loop.sock_sendall(self.sock, rest), self._write_timeout)
        except asyncio.TimeoutError as e:
            raise LaneError("the other end stopped reading") from e
        except OSError as e:
            raise LaneError(f"the connection failed ({type(e).__name__})") from e

    async def _read_exactly(self, n: int) -> bytearray | memoryview:
        """``n`` bytes from the socket, in writable memory of their own (a received part's tensor is made on it).

        A part's buffer is not zeroed first: ``bytearray(n)`` wrote every byte of a 2 MiB buffer before the
        socket wrote them again, and was a sixth of an averager's time with the GIL in an 8-peer all-reduce
        (py-spy); the all-reduce took 1.01-1.27 s with it and 0.88-1.04 s without (``bench/allreduce.py``'s
        harness, 8 peers, three interleaved pairs). Every byte is written by the socket before anyone reads it."""
        buffer = memoryview(np.empty(n, dtype=np.uint8)) if n >= _UNZEROED_FROM else bytearray(n)
        view, got = memoryview(buffer), 0
        try:
            while got < n:
                k = await self._loop.sock_recv_into(self.sock, view[got:])
                if k == 0:
                    raise LaneError("the connection was cut before the stream ended")
                got += k
        except OSError as e:
            raise LaneError(f"the connection failed ({type(e).__name__})") from e
        return buffer

    async def accept(self) -> None:
        """The reducer's end: say that the grant was taken (sealed, so it also proves the reducer holds the key)."""
        await self._send_sealed(MAGIC)

    async def accepted(self) -> None:
        """The sender's end: wait for the reducer to take the grant; LaneError if it did not."""
        if await self._receive_plain() != MAGIC:
            raise LaneError("the reducer did not take the grant")

    async def receive(self) -> averaging_pb2.AveragingData | LanePart | None:
        """The next message; None at the other end's authenticated end of stream."""
        frame = await self._receive_frame()
        if frame is None:
            self.ended = True
            return None
        fields, raw = frame
        try:
            meta = averaging_pb2.AveragingData.FromString(fields)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and others
            raise LaneError("a frame is not a part message") from e
        if not raw:
            return meta
        wire = _raw_wire(meta, raw)
        if wire is not None:
            return LanePart(meta, wire)
        meta.tensor_part.buffer = bytes(raw)  # not a float32 part's bytes: decoded (and judged) as a p2pd stream's would be
        return meta

    async def _receive_frame(self) -> tuple[bytes, bytearray | memoryview] | None:
        """(the message's fields, the raw bytes after them) of the next frame; None at the end of stream."""
        length = await self._frame_length()
        if self._aead is None:
            self._received += 1
            if length == 0:
                return None
            if length < 4:
                raise LaneError("a frame is not a part message")
            (size,) = struct.unpack("<I", await self._read_exactly(4))
            if size > length - 4:
                raise LaneError("a frame is not a part message")
            fields = await self._read_exactly(size)
            return bytes(fields), (await self._read_exactly(length - 4 - size) if length - 4 - size else bytearray())
        plain = self._open(await self._read_exactly(length))
        if not plain:
            return None
        if len(plain) < 4:
            raise LaneError("a frame is not a part message")
        (size,) = struct.unpack("<I", plain[:4])
        if size > len(plain) - 4:
            raise LaneError("a frame is not a part message")
        return plain[4:4 + size], bytearray(memoryview(plain)[4 + size:])  # a copy the tensor can own (writable, aligned)

    async def _frame_length(self) -> int:
        (length,) = struct.unpack("<I", await self._read_exactly(4))
        if not (16 if self._aead else 0) <= length <= self._frame_limit:  # a sealed frame holds at least its tag
            raise LaneError(f"a frame of {length} bytes")
        return length

    def _open(self, sealed: bytearray) -> bytes:
        try:
            plain = self._aead.decrypt(self._recv_prefix + struct.pack("<Q", self._received), sealed, None)
        except InvalidTag as e:
            raise LaneError("a frame failed authentication (changed, replayed, or not from the granted peer)") from e
        self._received += 1
        return plain

    async def _receive_plain(self) -> bytes:
        """A frame that is not a message (the reducer's acceptance)."""
        length = await self._frame_length()
        sealed = await self._read_exactly(length) if length else b""
        if self._aead is None:
            self._received += 1
            return bytes(sealed)
        return self._open(sealed)

    async def messages(self) -> AsyncIterator[averaging_pb2.AveragingData]:
        while (message := await self.receive()) is not None:
            yield message

    def close(self) -> None:
        with contextlib.suppress(Exception):
            retire(self.sock)

    async def finish(self, seconds: float = FINISH_WAIT) -> None:
        """After this end's last frame, when the other end's stream is not read to its end (a reducer that
        refused its sender): end the sending side only, and read and drop what still comes until the other
        end hangs up, for at most ``seconds``. A socket closed with bytes unread is reset, and the reset can
        overtake the last frames on their way: the sender then saw "Connection reset by peer" instead of
        the reducer's code."""
        if self.ended:
            return
        sink = bytearray(1 << 16)
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                if not await asyncio.wait_for(self._loop.sock_recv_into(self.sock, sink), left):
                    break  # the other end hung up


@dataclass
class Grant:
    peer: PeerID
    group_id: bytes
    key: bytes
    expires: float
    frame_limit: int  # the longest frame its lane takes (``group_frame_limit``)


Serve = Callable[[PeerID, bytes, AsyncIterator[averaging_pb2.AveragingData]], AsyncIterator[averaging_pb2.AveragingData]]


def sealed_for(host: str) -> bool:
    """Whether a lane to or from ``host`` is encrypted: always, except over loopback, where the bytes
    never leave this machine and only a process with root could read or change them (it could read
    the averager's memory as well). The token, which only the libp2p channel carries, still decides
    who is served. Both ends agree: the sender dials a loopback address exactly when the reducer sees
    a loopback address dialling it."""
    try:
        return SEAL_LOOPBACK or not ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True


def _raise_open_files_limit() -> None:
    """A listening peer's soft limit on open files up to its hard limit (at most 65,536): 1,024, a common
    default, is within reach of a flood of connections even though each is dropped within milliseconds."""
    with contextlib.suppress(Exception):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def retire(sock: socket.socket) -> None:
    """End a socket the event loop may still watch: shut it down now (a pending read or write wakes up
    and fails), close it a moment later. Closing at once could let a new socket take the descriptor
    while a cancelled operation's watcher is still registered for it, which confuses the loop's selector."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    try:
        asyncio.get_running_loop().call_later(1.0, sock.close)
    except RuntimeError:  # no loop: nothing watches it
        sock.close()


def _tuned(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class LaneServer:
    """The reducer's end: a TCP listener whose connections must present a token granted over libp2p.

    ``serve(peer, group_id, messages)`` is the averager's part handler: it reads the sender's
    messages and yields the answers, exactly as for a p2pd stream whose remote peer is ``peer``.
    """

    def __init__(self, serve: Serve, part_size_bytes: int, write_timeout: float | None = None):
        self._serve = serve
        self._grants: dict[bytes, Grant] = {}
        self._frame_limit = max_frame(part_size_bytes)
        self._write_timeout = write_timeout  # shorter than the senders' patience with this reducer (``FusionAverager``)
        self._listeners: list[socket.socket] = []
        self._pending: dict[asyncio.Task, str] = {}  # handshakes before the token, oldest first -> source host
        self._lanes: set[tuple[str, bytes]] = set()  # (peer, group) with a lane open: a sender needs one per reducer and group
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, hosts: list[str], port: int = 0) -> None:
        """Listen on one port (``port``, or any free one for 0) on each of ``hosts`` (all addresses if none)."""
        self.port = port
        _raise_open_files_limit()
        error = None
        for host in hosts or ["0.0.0.0"]:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, self.port))
                listener.listen(128)
            except OSError as e:
                listener.close()
                error = e  # that port is taken on this address: the lane listens on the others
                continue
            listener.setblocking(False)
            self.port = self.port or listener.getsockname()[1]
            self._listeners.append(listener)
            self._spawn(self._accept_loop(listener))
        if not self._listeners:
            raise error

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError:  # out of descriptors, or a connection reset before it was taken
                await asyncio.sleep(0.1)
                continue
            if len(self._tasks) >= MAX_CONNECTIONS:  # a safety net: never reached by senders and bounded floods
                sock.close()  # the loop does not watch it yet: closed at once
                continue
            host = _peer_host(sock)
            same_host = [t for t, h in self._pending.items() if h == host]
            if len(same_host) >= MAX_UNAUTHENTICATED_PER_HOST:
                self._drop(same_host[0])  # the oldest: an honest sender presents its token at once, a flood never does
            elif len(self._pending) >= MAX_UNAUTHENTICATED:
                self._drop(next(iter(self._pending)))
            task = self._spawn(self._handle(_tuned(sock)))
            # closed once the task is done, also if it is cancelled before it ever ran (not before: the
            # event loop may still watch the descriptor, and a new socket could take its number)
            task.add_done_callback(lambda _, sock=sock: sock.close())
            self._pending[task] = host  # counted here, before the task runs: a burst of accepts cannot overshoot

    def _drop(self, task: asyncio.Task) -> None:
        self._pending.pop(task, None)
        task.cancel()

    def grant(self, peer: PeerID, group_id: bytes, part_size_bytes: int | None = None) -> bytes:
        """A one-connection grant for ``peer`` (authenticated by libp2p): port, token and key, as bytes;
        b"" if that peer already has a lane open for this group. A new grant replaces the peer's
        unused one for the group, so a member holds at most one grant and one lane per group here.
        ``part_size_bytes``: the group's part size, whose frames the lane takes (at most the server's)."""
        now = time.monotonic()
        if (str(peer), bytes(group_id)) in self._lanes:
            return b""
        for token in [t for t, g in self._grants.items() if g.expires < now or (g.peer == peer and g.group_id == group_id)]:
            del self._grants[token]
        while len(self._grants) >= MAX_GRANTS:
            del self._grants[next(iter(self._grants))]
        token, key = os.urandom(TOKEN_BYTES), os.urandom(KEY_BYTES)
        self._grants[token] = Grant(peer, bytes(group_id), key, now + GRANT_TTL, group_frame_limit(self._frame_limit, part_size_bytes))
        return struct.pack(">H", self.port) + token + key

    async def _handle(self, sock: socket.socket) -> None:
        lane, answers, channel, sent_end = None, None, None, False
        try:
            try:
                hello = await asyncio.wait_for(_read_hello(sock), HELLO_TIMEOUT)
            finally:
                self._pending.pop(asyncio.current_task(), None)
            grant = self._grants.pop(hello[len(MAGIC):], None) if hello.startswith(MAGIC) else None
            if grant is None or grant.expires < time.monotonic() or (str(grant.peer), grant.group_id) in self._lanes:
                return
            lane = (str(grant.peer), grant.group_id)
            self._lanes.add(lane)
            channel = Channel(sock, grant.key, outbound=False, frame_limit=grant.frame_limit, sealed=sealed_for(_peer_host(sock)),
                              write_timeout=self._write_timeout)
            await channel.accept()
            answers = self._serve(grant.peer, grant.group_id, channel.messages())
            async for answer in answers:
                await channel.send(answer)
            await channel.send(None)
            sent_end = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a remote peer sends ends its own lane only
            logger.debug(f"a lane ended: {type(e).__name__}: {str(e)[:160]}")
        finally:
            try:
                if sent_end:  # the handler is done (it may have refused the sender before the sender's end)
                    with contextlib.suppress(Exception):
                        await channel.finish()  # a refused sender reads the code before the connection ends
            finally:  # also when the server closes (cancelled) during that wait
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the other end sees the end now; the task's done callback closes it
                if lane is not None:
                    self._lanes.discard(lane)
                if answers is not None:  # now, not when collected: the handler then bans a sender whose stream broke
                    with contextlib.suppress(Exception):
                        await answers.aclose()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
        for listener in self._listeners:
            listener.close()  # its accept loop is done
        self._grants.clear()


def _peer_host(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return ""


async def _read_hello(sock: socket.socket) -> bytes:
    loop, hello = asyncio.get_running_loop(), b""
    while len(hello) < len(MAGIC) + TOKEN_BYTES:
        chunk = await loop.sock_recv(sock, len(MAGIC) + TOKEN_BYTES - len(hello))
        if not chunk:
            break
        hello += chunk
    return hello


def parse_grant(blob: bytes) -> tuple[int, bytes, bytes]:
    """(port, token, key) from a reducer's answer; ValueError if it is not one."""
    if len(blob) != GRANT_BYTES:
        raise ValueError(f"a lane grant of {len(blob)} bytes")
    (port,) = struct.unpack(">H", blob[:2])
    if port == 0:
        raise ValueError("a lane grant without a port")
    return port, blob[2:2 + TOKEN_BYTES], blob[2 + TOKEN_BYTES:]


def connection_host(addrs) -> str | None:
    """The IP address of a live libp2p connection (``P2P.list_peers``' addrs), if it is a direct one."""
    for addr in addrs:
        text = str(addr)
        if "/p2p-circuit" in text:
            continue
        parts = text.split("/")
        for proto in ("ip4", "ip6"):
            if proto in parts and parts.index(proto) + 1 < len(parts):
                with contextlib.suppress(ValueError):
                    return str(ipaddress.ip_address(parts[parts.index(proto) + 1]))
    return None


def listen_hosts(maddrs) -> list[str]:
    """The IP addresses this peer's p2pd listens on that a socket here can bind: the lane listens on
    the same ones (an unspecified address such as 0.0.0.0 included)."""
    hosts = []
    for addr in maddrs:
        host = connection_host([addr])
        if host is None or host in hosts:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
        except OSError:
            continue  # an announced address that is not this machine's
        hosts.append(host)
    return hosts


class LaneDialer:
    """The sender's end: asks a reducer for a grant over libp2p and connects, or says to use p2pd."""

    def __init__(self, p2p, part_size_bytes: int):
        self._p2p = p2p
        self._frame_limit = max_frame(part_size_bytes)
        self.broken: dict[str, tuple[float, str]] = {}  # peer -> (until, why its lane failed)

    async def open(self, peer: PeerID, group_id: bytes, ask: Callable[[bytes], Awaitable[bytes]],
                   part_size_bytes: int | None = None) -> Channel | None:
        """A connected lane to ``peer`` for ``group_id``, or None (the caller takes the p2pd stream).
        ``ask(group_id)`` is the libp2p call that returns the reducer's grant; ``part_size_bytes``: the
        group's part size, whose frames the lane takes (at most the dialer's)."""
        key = str(peer)
        if key in self.broken and self.broken[key][0] > time.monotonic():
            return None
        sock = None
        try:
            try:
                answer = await asyncio.wait_for(ask(group_id), GRANT_TIMEOUT)
            except asyncio.TimeoutError:
                return self._fallback(key, RETRY_AFTER, "no grant in time")  # a slow reducer, or one still setting up
            if not answer:
                return None  # refused for this group only (e.g. not yet set up there): ask again next time
            port, token, secret = parse_grant(answer)
            host = connection_host(next((p.addrs for p in await self._p2p.list_peers() if p.peer_id == peer), []))
            if host is None:
                raise LaneError("no direct libp2p connection to take its address from")
            sock = _tuned(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM))
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT)
            await asyncio.wait_for(loop.sock_sendall(sock, MAGIC + token), CONNECT_TIMEOUT)
            channel = Channel(sock, secret, outbound=True, frame_limit=group_frame_limit(self._frame_limit, part_size_bytes),
                              sealed=sealed_for(host))
            # no part is sent before the reducer has taken the grant: until then the p2pd stream is still an option
            try:
                await asyncio.wait_for(channel.accepted(), CONNECT_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - dropped or mute before acceptance: maybe a flood there, ask again soon
                retire(sock)
                return self._fallback(key, RETRY_AFTER, f"not accepted ({type(e).__name__}: {str(e)[:80]})")
            return channel
        except asyncio.CancelledError:
            if sock is not None:
                retire(sock)
            raise
        except Exception as e:  # noqa: BLE001 - no lane served, or its port unreachable: use the p2pd stream
            if sock is not None:
                retire(sock)
            return self._fallback(key, BROKEN_FOR, f"{type(e).__name__}: {str(e)[:120]}")

    def _fallback(self, key: str, seconds: float, why: str) -> None:
        self.broken[key] = (time.monotonic() + seconds, why)
        logger.debug(f"no lane to {key[:12]}…, its parts go over p2pd for {seconds:.0f} s ({why})")
        return None


def exchange(channel: Channel, inputs: AsyncIterator[averaging_pb2.AveragingData]) -> AsyncIterator[averaging_pb2.AveragingData]:
    """Send ``inputs`` over the lane while the reducer's answers are read (full duplex, like a p2pd stream).

    The sending starts now, not when the answers are first asked for: a client-mode member waits until
    it has sent everything before it reads a single answer (hivemind's ``should_delay_results``), as it
    does with the p2pd stream, whose writer also starts at once."""
    return _answers(channel, asyncio.create_task(_pump(channel, inputs)))


async def _pump(channel: Channel, inputs: AsyncIterator[averaging_pb2.AveragingData]) -> None:
    try:
        async for message in inputs:
            await channel.send(message)
        await channel.send(None)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the read side then fails, and says the lane broke
        channel.close()
    finally:  # the inputs are finished either way: whoever waits for them to be sent stops waiting
        with contextlib.suppress(Exception):
            await inputs.aclose()


async def _answers(channel: Channel, writing: asyncio.Task) -> AsyncIterator[averaging_pb2.AveragingData]:
    try:
        async for answer in channel.messages():
            yield answer
        # the reducer ends its stream only after it has read ours to the end: the pump is done,
        # unless the reducer stopped early (it refused this sender), and then there is nothing to finish
    finally:
        writing.cancel()
        channel.close()
