"""The direct lane (swarm/lane.py) against what an outsider or a peer on the path can send it: real
TCP on loopback, real AES-GCM, a real server; only the averager behind it is a small echo."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from coldfusion_p2p.swarm import lane
from coldfusion_p2p.swarm.lane import MAGIC, Channel, LaneError, LaneServer, connection_host, exchange, listen_hosts, parse_grant

@pytest.fixture(autouse=True)
def sealed_on_loopback(monkeypatch):
    """These tests run on loopback, where lanes go unencrypted: they test the cipher, so it is on."""
    monkeypatch.setattr(lane, "SEAL_LOOPBACK", True)


PEER = PeerID.from_base58("QmSVH5LqDyHsXcmDHVeC2mewyMf3TeTiC42VWPorke4fQb")
GROUP = b"group-1"


def part(i: int, size: int = 1000) -> averaging_pb2.AveragingData:
    return averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=GROUP, weight=float(i),
                                       tensor_part=runtime_pb2.Tensor(buffer=bytes([i % 256]) * size, dtype="float32"))


class Echo:
    """The averager's side, as the server sees it: answers each part with its own bytes; records
    what it was given and how its input stream ended."""

    def __init__(self):
        self.calls, self.seen, self.ended, self.closed = [], [], [], 0

    async def __call__(self, peer, group_id, messages):
        self.calls.append((peer, group_id))
        try:
            async for message in messages:
                self.seen.append(message.weight)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=message.tensor_part)
            self.ended.append("clean")
        except LaneError as e:
            self.ended.append(str(e))
        finally:
            self.closed += 1  # the averager's handler runs its clean-up (and bans a sender cut off) here


async def served(echo=None, write_timeout=None):
    server = LaneServer(echo or Echo(), part_size_bytes=1 << 16, write_timeout=write_timeout)
    await server.start(["127.0.0.1"])
    return server


async def dial(port: int, hello: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, hello)
    return sock


async def closed_without_answer(sock: socket.socket) -> bool:
    """True if the server hung up on us without sending a byte."""
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 16), 5)
    sock.close()
    return data == b""


def test_a_granted_sender_exchanges_parts_and_both_ends_see_an_authenticated_end():
    async def scenario():
        echo = Echo()
        server = await served(echo)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 20)
            await channel.accepted()
            answers = [a async for a in exchange(channel, _aiter([part(i) for i in range(1, 6)]))]
            await asyncio.sleep(0.1)
            return echo, answers
        finally:
            await server.close()

    echo, answers = asyncio.run(scenario())
    assert echo.calls == [(PEER, GROUP)]  # the peer libp2p authenticated when it asked, and its group
    assert echo.seen == [1.0, 2.0, 3.0, 4.0, 5.0] and echo.ended == ["clean"]
    assert [a.tensor_part.buffer for a in answers] == [bytes([i]) * 1000 for i in range(1, 6)]


@pytest.mark.parametrize("attack", ["no token", "wrong token", "token used twice", "expired grant", "wrong magic"])
def test_a_connection_without_a_live_grant_is_closed_before_anything_reaches_the_averager(attack, monkeypatch):
    monkeypatch.setattr(lane, "HELLO_TIMEOUT", 0.3)  # a silent connection is dropped after this
    if attack == "expired grant":
        monkeypatch.setattr(lane, "GRANT_TTL", -1.0)

    async def scenario():
        echo = Echo()
        server = await served(echo)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            if attack == "token used twice":  # the first use is honest and complete
                channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 20)
                await channel.accepted()
                assert len([a async for a in exchange(channel, _aiter([part(1)]))]) == 1
            hello = {"no token": b"", "wrong token": MAGIC + bytes(16), "wrong magic": b"cfp2p-lane/0\n" + token}.get(attack, MAGIC + token)
            return await closed_without_answer(await dial(port, hello)), echo
        finally:
            await server.close()

    closed, echo = asyncio.run(scenario())
    assert closed
    assert len(echo.calls) == (1 if attack == "token used twice" else 0)


async def sealed_frames(key: bytes, messages) -> list[bytes]:
    """The frames a real sender's Channel puts on the wire for ``messages`` (None: the end)."""
    here, there = socket.socketpair()
    here.setblocking(False)
    sender = Channel(here, key, outbound=True, frame_limit=1 << 20)
    for message in messages:
        await sender.send(message)
    here.close()
    wire = b""
    while chunk := there.recv(1 << 20):
        wire += chunk
    there.close()
    out, i = [], 0
    while i < len(wire):
        (n,) = struct.unpack("<I", wire[i:i + 4])
        out.append(wire[i:i + 4 + n])
        i += 4 + n
    return out


@pytest.mark.parametrize("attack", ["flipped byte", "replayed frame", "dropped frame", "cut before the end", "huge frame",
                                    "wrong key", "not a message"])
def test_a_tampered_lane_ends_with_an_error_and_never_passes_a_changed_part_on(attack):
    """A peer on the path (or one that learned a token but not its key) can change, replay, drop or
    cut frames: the server passes on only the frames before the first bad one, says the stream
    failed (never a clean end), and goes on serving other grants."""

    async def scenario():
        echo = Echo()
        server = await served(echo)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            wire = await sealed_frames(key if attack != "wrong key" else bytes(32), [part(1), part(2), part(3), None])
            if attack == "flipped byte":
                bad = bytearray(wire[1])
                bad[40] ^= 1
                wire[1] = bytes(bad)
            elif attack == "replayed frame":
                wire.insert(1, wire[0])
            elif attack == "dropped frame":
                del wire[1]
            elif attack == "cut before the end":
                wire = wire[:2]
            elif attack == "huge frame":
                wire[1] = struct.pack("<I", 1 << 30) + b"x" * 64
            elif attack == "not a message":  # sealed with the right key and counter, but not a protobuf message
                sealed = AESGCM(key).encrypt(lane._TO_REDUCER + struct.pack("<Q", 1), b"\xff\xff\xff", None)
                wire[1] = struct.pack("<I", len(sealed)) + sealed
            sock = await dial(port, MAGIC + token)
            for frame in wire:
                await asyncio.get_running_loop().sock_sendall(sock, frame)
            sock.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.3)
            sock.close()
            # the server still serves an honest sender afterwards
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 20)
            await channel.accepted()
            after = [a async for a in exchange(channel, _aiter([part(7)]))]
            await asyncio.sleep(0.1)
            return echo, after
        finally:
            await server.close()

    echo, after = asyncio.run(scenario())
    # the authentic frames before the first bad one, nothing after it
    assert echo.seen[:-1] == {"wrong key": [], "cut before the end": [1.0, 2.0]}.get(attack, [1.0]), (attack, echo.seen)
    assert echo.ended[0] != "clean", echo.ended
    assert echo.seen[-1] == 7.0 and echo.ended[-1] == "clean" and len(after) == 1


def test_the_sender_takes_a_lane_only_once_the_reducer_accepted_and_otherwise_p2pd(monkeypatch):
    """``LaneDialer.open``: a channel only after the reducer's sealed acceptance; None (so the part
    goes over p2pd) for a refusal, a dead port, a port whose listener never accepts, or a lying
    grant; a peer whose lane failed is not tried again, one that only refused is."""

    class Peers:  # the libp2p connection the dialer takes the reducer's address from
        async def list_peers(self):
            return [type("Info", (), {"peer_id": PEER, "addrs": ["/ip4/127.0.0.1/tcp/1"]})()]

    async def scenario():
        server = await served()
        mute = socket.socket()
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)  # accepts connections and never answers
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        dead_port = free.getsockname()[1]
        free.close()  # nothing listens here
        out = {}
        try:
            for case, grant in [("refused", lambda: b""),
                                ("granted", lambda: server.grant(PEER, GROUP)),
                                ("dead port", lambda: struct.pack(">H", dead_port) + bytes(48)),
                                ("mute listener", lambda: struct.pack(">H", mute.getsockname()[1]) + bytes(48)),
                                ("lying grant", lambda: server.grant(PEER, GROUP)[:18] + bytes(32))]:
                dialer = lane.LaneDialer(Peers(), 1 << 16)

                async def ask(group_id, grant=grant):
                    return grant()

                channel = await dialer.open(PEER, GROUP, ask)
                out[case] = (channel is not None, str(PEER) in dialer.broken)
                if channel is not None:
                    answers = [a async for a in exchange(channel, _aiter([part(3)]))]
                    out[case] += (len(answers),)
        finally:
            mute.close()
            await server.close()
        return out

    monkeypatch.setattr(lane, "CONNECT_TIMEOUT", 1.0)
    out = asyncio.run(scenario())
    assert out == {"refused": (False, False), "granted": (True, False, 1), "dead port": (False, True),
                   "mute listener": (False, True), "lying grant": (False, True)}, out


def test_over_loopback_frames_go_unencrypted_and_the_token_still_decides_who_is_served(monkeypatch):
    """Without the cipher (loopback only: ``sealed_for``), both ends agree on plain frames, the exchange
    works the same, and a connection without a live token is still closed unserved."""
    monkeypatch.setattr(lane, "SEAL_LOOPBACK", False)
    assert not lane.sealed_for("127.0.0.1") and not lane.sealed_for("::1")
    assert lane.sealed_for("10.0.0.2") and lane.sealed_for("192.168.1.5") and lane.sealed_for("not an address")

    async def scenario():
        echo = Echo()
        server = await served(echo)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            sock = await dial(port, MAGIC + token)
            channel = Channel(sock, key, outbound=True, frame_limit=1 << 20, sealed=False)
            await channel.accepted()
            answers = [a async for a in exchange(channel, _aiter([part(i) for i in (4, 5)]))]
            refused = await closed_without_answer(await dial(port, MAGIC + token))  # used once already
            await asyncio.sleep(0.1)
            return echo, answers, refused
        finally:
            await server.close()

    echo, answers, refused = asyncio.run(scenario())
    assert echo.seen == [4.0, 5.0] and echo.ended == ["clean"] and len(echo.calls) == 1 and refused
    assert [a.tensor_part.buffer for a in answers] == [bytes([4]) * 1000, bytes([5]) * 1000]


def test_a_member_holds_one_lane_per_group_so_its_buffers_are_bounded():
    """Found by the red team: 2,000 granted connections, each announcing a maximal frame, took an honest
    reducer from 210 MB to 2.3 GB. Now a (peer, group) has one lane at a time: no new grant while it is
    open, and a token taken before it opened is refused."""

    async def scenario():
        echo = Echo()
        server = await served(echo)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            other = parse_grant(server.grant(PEER, b"group-2"))  # another group: its own lane
            channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 20)
            await channel.accepted()
            await asyncio.sleep(0.1)
            during = server.grant(PEER, GROUP)
            second = Channel(await dial(other[0], MAGIC + other[1]), other[2], outbound=True, frame_limit=1 << 20)
            await second.accepted()
            answers = [a async for a in exchange(channel, _aiter([part(1)]))]
            await asyncio.sleep(0.1)
            after = server.grant(PEER, GROUP)  # the lane is closed: the member may ask again
            second.close()
            return during, after, len(answers)
        finally:
            await server.close()

    during, after, answered = asyncio.run(scenario())
    assert during == b"" and answered == 1 and len(after) == lane.GRANT_BYTES


def test_a_flood_of_silent_connections_cannot_crowd_out_a_granted_sender(monkeypatch):
    """Found by the red team: 64 idle connections (no token) made every honest sender fall back to p2pd.
    Now the oldest silent connection from the same address is dropped for a new one, and a sender's
    token arrives at once."""
    monkeypatch.setattr(lane, "HELLO_TIMEOUT", 30.0)  # the flood would otherwise time out on its own

    async def scenario():
        echo = Echo()
        server = await served(echo)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            flood = [await dial(port, b"") for _ in range(3 * lane.MAX_UNAUTHENTICATED_PER_HOST)]
            await asyncio.sleep(0.2)
            channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 20)
            await asyncio.wait_for(channel.accepted(), 5)
            answers = [a async for a in exchange(channel, _aiter([part(2)]))]
            pending = len(server._pending)
            dropped = sum([await closed_without_answer(sock) for sock in flood[:lane.MAX_UNAUTHENTICATED_PER_HOST]])
            for sock in flood:
                sock.close()
            return len(answers), pending, dropped
        finally:
            await server.close()

    answered, pending, dropped = asyncio.run(scenario())
    assert answered == 1 and pending <= lane.MAX_UNAUTHENTICATED_PER_HOST and dropped == lane.MAX_UNAUTHENTICATED_PER_HOST


def test_a_flood_of_connections_holds_few_descriptors_on_the_reducer(monkeypatch):
    """Found by the second red-team pass: dropped connections stayed open a second, so a flood at
    1,300 connects a second filled a 1,024 open-files limit and a member's next step failed. Now a
    dropped connection is closed as soon as its handler ends: milliseconds."""
    import os

    monkeypatch.setattr(lane, "HELLO_TIMEOUT", 30.0)

    async def scenario():
        server = await served()
        try:
            base = len(os.listdir("/proc/self/fd"))
            flood = [await dial(server.port, b"") for _ in range(200)]  # held open here: 200 descriptors of ours
            await asyncio.sleep(0.3)
            held = len(os.listdir("/proc/self/fd")) - base - len(flood)
            for sock in flood:
                sock.close()
            return held
        finally:
            await server.close()

    held = asyncio.run(scenario())
    assert held <= lane.MAX_UNAUTHENTICATED_PER_HOST + 4, held


def test_a_reducer_stops_serving_a_sender_that_stopped_reading_within_its_write_timeout():
    """Found by the red team: a member that never read its averages held its reducer's handler for
    30 s, longer than the other members' patience with that reducer, so they blamed an honest peer.
    The reducer now gives up after its write timeout (the senders' timeout) and closes the handler,
    which is where the averager bans that sender."""

    async def scenario():
        echo = Echo()
        server = await served(echo, write_timeout=0.5)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            sock = await dial(port, MAGIC + token)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sender = Channel(sock, key, outbound=True, frame_limit=1 << 22)
            await sender.accepted()
            started = asyncio.get_running_loop().time()
            with contextlib.suppress(LaneError):
                for i in range(400):  # 400 parts of 64 KB, and never a read of the averages coming back
                    await sender.send(part(i, size=1 << 16))
                    if echo.closed:
                        break
            for _ in range(100):
                if echo.closed:
                    break
                await asyncio.sleep(0.05)
            took = asyncio.get_running_loop().time() - started
            sock.close()
            return echo.closed, took
        finally:
            await server.close()

    closed, took = asyncio.run(scenario())
    assert closed == 1 and took < 8, took


def test_a_lane_sends_before_its_answers_are_read_and_finishes_its_inputs_when_it_breaks():
    """A client-mode member reads no answer until all its parts are sent (hivemind's delayed results),
    and waits on its inputs' end for that: ``exchange`` must send at once, and end the inputs (so that
    the wait ends) also when the reducer cuts the lane."""
    from hivemind.utils.asyncio import attach_event_on_finished

    async def cuts_at_once(peer, group_id, messages):
        raise LaneError("refused")
        yield  # an async generator, like the averager's handler

    async def many_parts(n):  # far more than the socket buffers hold: a cut lane stops the sending midway
        for i in range(n):
            yield part(i, size=1 << 16)

    async def scenario(serve, n):
        server = await served(serve)
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 20)
            await channel.accepted()
            sent = asyncio.Event()
            answers = exchange(channel, attach_event_on_finished(many_parts(n), sent))
            await asyncio.wait_for(sent.wait(), 5)  # before a single answer is asked for
            got = []
            with contextlib.suppress(LaneError):
                async for answer in answers:
                    got.append(answer)
            return len(got)
        finally:
            await server.close()

    assert asyncio.run(scenario(Echo(), 3)) == 3
    assert asyncio.run(scenario(cuts_at_once, 2000)) == 0


def test_grants_are_bounded_and_parsed_strictly():
    async def scenario():
        server = await served()
        try:
            for _ in range(10):  # a member asking again replaces its unused grant for the group
                server.grant(PEER, GROUP)
            one = len(server._grants)
            for i in range(lane.MAX_GRANTS + 50):
                server.grant(PEER, b"group-%d" % i)
            return one, len(server._grants)
        finally:
            await server.close()

    assert asyncio.run(scenario()) == (1, lane.MAX_GRANTS)
    for junk in (b"", b"\x00" * 10, b"\x00\x00" + bytes(48), b"\x10\x00" + bytes(47), b"\x10\x00" + bytes(49)):
        with pytest.raises(ValueError):
            parse_grant(junk)
    port, token, key = parse_grant(b"\x1f\x90" + bytes(range(48)))
    assert port == 8080 and token == bytes(range(16)) and key == bytes(range(16, 48))


def test_a_lane_goes_only_to_the_address_of_a_live_direct_connection():
    assert connection_host(["/ip4/10.1.2.3/tcp/4001"]) == "10.1.2.3"
    assert connection_host(["/ip4/1.2.3.4/tcp/1/p2p/QmRelay/p2p-circuit", "/ip6/::1/tcp/5"]) == "::1"
    assert connection_host(["/dns4/example.org/tcp/1", "/ip4/999.1.1.1/tcp/1"]) is None
    assert connection_host([]) is None
    assert listen_hosts(["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/udp/1/quic", "/ip4/203.0.113.9/tcp/1"]) == ["127.0.0.1"]


async def _aiter(items):
    for item in items:
        yield item


@pytest.mark.parametrize("value, sealed", [("1", True), ("0", False), pytest.param("", False, marks=pytest.mark.slow)])
def test_cfp2p_seal_loopback_turns_the_cipher_on_over_loopback(value, sealed):
    """For peers reached through a plain TCP port forward on 127.0.0.1, where loopback is not this machine."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CFP2P_SEAL_LOOPBACK": value}
    out = subprocess.run([sys.executable, "-c", "from coldfusion_p2p.swarm import lane; print(lane.sealed_for('127.0.0.1'))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(sealed), out.stderr[-500:]


async def _channel_pair(sealed: bool) -> tuple[Channel, Channel]:
    here, there = socket.socketpair()
    for s in (here, there):
        s.setblocking(False)
    key = bytes(range(32))
    return (Channel(here, key, outbound=True, frame_limit=1 << 20, sealed=sealed),
            Channel(there, key, outbound=False, frame_limit=1 << 20, sealed=sealed))


@pytest.mark.parametrize("sealed", [True, False])
@pytest.mark.parametrize("compression", ["NONE", "FLOAT16"])
def test_a_float32_part_crosses_a_lane_raw_and_arrives_as_the_same_tensor(sealed, compression):
    """A LanePart's tensor goes as raw bytes after the message's fields (float32, or its float16
    encoding), sealed or not, and the reducer gets the values and fields hivemind's own encoding and
    decoding would give it; over a p2pd stream the same part is exactly hivemind's message."""
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    from coldfusion_p2p.swarm.lane import LanePart, as_message, part_tensor, raw_part

    kind = runtime_pb2.CompressionType.Value(compression)
    values = [torch.randn(1000), torch.randn(3, 7), torch.zeros(0), torch.tensor([float("nan"), -0.0, 1e38, 1e-9])]

    async def scenario():
        sender, reducer = await _channel_pair(sealed)
        for i, t in enumerate(values):
            await sender.send(raw_part(t, kind, weight=float(i + 1), **({"code": averaging_pb2.PART_FOR_AVERAGING, "group_id": GROUP} if i == 0 else {})))
        await sender.send(None)
        got = [m async for m in reducer.messages()]
        sender.close(), reducer.close()
        return got

    got = asyncio.run(scenario())
    assert len(got) == len(values)
    assert got[0].code == averaging_pb2.PART_FOR_AVERAGING and got[0].group_id == GROUP
    for i, (t, m) in enumerate(zip(values, got)):
        assert m.weight == float(i + 1) and m.tensor_part.compression == kind
        received, want = part_tensor(m), deserialize_torch_tensor(serialize_torch_tensor(t, kind))
        assert received.shape == t.shape and received.dtype == torch.float32
        nan = torch.isnan(want)  # NaN stays NaN; every other value bit for bit, -0.0 included
        assert torch.equal(torch.isnan(received), nan) and received[~nan].numpy().tobytes() == want[~nan].numpy().tobytes()
        if compression == "NONE":
            assert received.numpy().tobytes() == t.numpy().tobytes()  # uncompressed: NaN's bits too
        if t.numel():
            assert isinstance(m, LanePart) and received.data_ptr() % 16 == 0  # no protobuf buffer in between; aligned
            sent = raw_part(t, kind, weight=float(i + 1), **({"code": averaging_pb2.PART_FOR_AVERAGING, "group_id": GROUP} if i == 0 else {}))
            assert m.wire.dtype == sent.wire.dtype  # passed on, a received part is the message it came as
            assert as_message(m).SerializeToString() == as_message(sent).SerializeToString()
            received += 0  # writable: the runner may keep and reduce it
    t = values[1]
    hivemind = averaging_pb2.AveragingData(tensor_part=serialize_torch_tensor(t, kind), weight=2.0)
    assert as_message(raw_part(t, kind, weight=2.0)).SerializeToString() == hivemind.SerializeToString()
    assert torch.equal(deserialize_torch_tensor(as_message(raw_part(t, kind)).tensor_part), part_tensor(raw_part(t, kind)))


@pytest.mark.parametrize("sealed", [True, False])
@pytest.mark.parametrize("lie", ["fewer bytes than its size", "more bytes than its size", "another dtype", "compressed",
                                 "bytes in both places", "bytes that are not a multiple of four"])
def test_raw_bytes_that_do_not_match_their_fields_are_judged_as_a_p2pd_stream_would_judge_them(lie, sealed):
    """A peer's raw bytes become a tensor only when they are exactly what the fields declare (an
    uncompressed float32 part of that shape); anything else is handed on as the protobuf message
    it would be on a p2pd stream, and its decoding fails there as it would have."""
    import torch
    from hivemind.compression import deserialize_torch_tensor

    from coldfusion_p2p.swarm.lane import LanePart, part_tensor

    fields = runtime_pb2.Tensor(compression=runtime_pb2.CompressionType.NONE, size=[10], dtype="float32")
    raw = torch.arange(10, dtype=torch.float32).numpy().tobytes()
    if lie == "fewer bytes than its size":
        raw = raw[:36]
    elif lie == "more bytes than its size":
        raw += bytes(4)
    elif lie == "another dtype":
        fields.dtype = "float64"
        fields.size[:] = [5]
    elif lie == "compressed":
        fields.compression = runtime_pb2.CompressionType.FLOAT16
    elif lie == "bytes in both places":
        fields.buffer = bytes(40)
    elif lie == "bytes that are not a multiple of four":
        raw = raw[:39]
    head = averaging_pb2.AveragingData(tensor_part=fields, weight=1.0).SerializeToString()

    async def scenario():
        sender, reducer = await _channel_pair(sealed)
        plain = struct.pack("<I", len(head)) + head + raw
        if sealed:
            await sender._send_sealed(plain)
        else:
            await sender._write(struct.pack("<I", len(plain)) + plain, b"")
        got = await reducer.receive()
        sender.close(), reducer.close()
        return got

    got = asyncio.run(scenario())
    assert not isinstance(got, LanePart) and isinstance(got, averaging_pb2.AveragingData)
    assert got.tensor_part.buffer == raw  # the raw bytes, where a p2pd stream's message holds them
    expected = averaging_pb2.AveragingData(tensor_part=fields, weight=1.0)
    expected.tensor_part.buffer = raw
    try:
        want = deserialize_torch_tensor(expected.tensor_part)
    except Exception as e:  # noqa: BLE001 - what hivemind does with it, whatever it is
        with pytest.raises(type(e)):
            part_tensor(got)
    else:
        assert torch.equal(part_tensor(got), want)


@pytest.mark.parametrize("sealed", [True, False])
def test_a_frame_whose_fields_run_past_its_end_breaks_the_lane(sealed):
    async def scenario():
        sender, reducer = await _channel_pair(sealed)
        plain = struct.pack("<I", 1000) + b"\x08\x01"
        if sealed:
            await sender._send_sealed(plain)
        else:
            await sender._write(struct.pack("<I", len(plain)) + plain, b"")
        try:
            with pytest.raises(LaneError, match="not a part message"):
                await asyncio.wait_for(reducer.receive(), 5)
        finally:
            sender.close(), reducer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("sealed", [True, False])
def test_a_part_that_asks_for_gradients_arrives_without_them(sealed):
    """requires_grad is the sender's to set in the fields, raw or protobuf: a received part never tracks
    gradients (the average then would, and so would the averager's tensors from then on)."""
    import copy

    from hivemind.compression import serialize_torch_tensor

    from coldfusion_p2p.swarm.lane import LanePart, part_tensor, raw_part

    t = torch_randn(100)
    raw = raw_part(t, weight=1.0)
    raw.meta.tensor_part.requires_grad = True
    whole = averaging_pb2.AveragingData(tensor_part=serialize_torch_tensor(t.requires_grad_(True), runtime_pb2.CompressionType.NONE))
    assert whole.tensor_part.requires_grad

    async def scenario():
        sender, reducer = await _channel_pair(sealed)
        await sender.send(raw)
        await sender.send(whole)
        got = [await reducer.receive(), await reducer.receive()]
        sender.close(), reducer.close()
        return got

    got = asyncio.run(scenario())
    assert isinstance(got[0], LanePart) and got[0].tensor_part.requires_grad  # what it asked for, as sent
    assert all(not part_tensor(m).requires_grad for m in got)
    assert not raw_part(t).meta.tensor_part.requires_grad  # and this peer never asks for it
    with pytest.raises(AttributeError):
        copy.copy(LanePart.__new__(LanePart)).meta  # no recursion into an unset meta


def torch_randn(n: int):
    import torch

    return torch.randn(n)


def test_float16_parts_encode_and_decode_as_hivemind_does_them():
    """``encode_tensor``/``decode_tensor`` take a fast path for float16 parts of float32 tensors (torch's
    cast rather than numpy's): the same bytes out and the same values in as hivemind's own functions,
    for every value float16 cannot hold too; and any message that is not such a part, or whose bytes are
    not what its sizes say, is decoded (or refused) exactly as hivemind's decoder does it."""
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    from coldfusion_p2p.swarm.lane import decode_tensor, encode_tensor

    f16, none = runtime_pb2.CompressionType.FLOAT16, runtime_pb2.CompressionType.NONE
    g = torch.Generator().manual_seed(3)
    odd = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 6e-5, 65504.0, 65520.0, -1e6, 1e30, float("inf"), float("-inf"), float("nan"), 1 / 3])
    for tensor in (odd, torch.randn(300, generator=g) * 1e-3, torch.randn(7, 11, generator=g), torch.empty(0), torch.empty(4, 0)):
        for compression in (f16, none):
            ours, theirs = encode_tensor(tensor, compression), serialize_torch_tensor(tensor, compression)
            assert ours.SerializeToString() == theirs.SerializeToString()
            back, want = decode_tensor(theirs), deserialize_torch_tensor(theirs)
            assert back.dtype == want.dtype and back.shape == want.shape
            nan = torch.isnan(want)  # NaN stays NaN (its payload bits may differ: no part holding NaN is accepted)
            assert torch.equal(torch.isnan(back), nan)
            assert torch.equal(back[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bit for bit, -0.0 included
    ones = serialize_torch_tensor(torch.ones(10), f16)
    lies = {"odd byte count": ones.buffer[:19], "bytes for 9 values": ones.buffer[:18], "bytes for 11": ones.buffer + bytes(2)}
    for why, buffer in lies.items():
        t = runtime_pb2.Tensor(compression=f16, buffer=buffer, size=[10], dtype="float32")
        with pytest.raises(Exception) as theirs:
            deserialize_torch_tensor(t)
        with pytest.raises(type(theirs.value)):
            decode_tensor(t)
    for t in (runtime_pb2.Tensor(compression=f16, buffer=ones.buffer, size=[10], dtype="float64"),
              runtime_pb2.Tensor(compression=f16, buffer=ones.buffer, size=[2, 5], dtype="float32"),
              runtime_pb2.Tensor(compression=f16, buffer=ones.buffer, size=[2**31, 2**31, 0, 10], dtype="float32")):
        try:
            want = deserialize_torch_tensor(t)
        except Exception as e:  # noqa: BLE001 - what hivemind does with it, whatever it is
            with pytest.raises(type(e)):
                decode_tensor(t)
        else:
            got = decode_tensor(t)
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert not decode_tensor(runtime_pb2.Tensor(compression=f16, buffer=ones.buffer, size=[10], dtype="float32")).requires_grad


def test_a_lane_takes_frames_only_as_long_as_its_groups_parts():
    """A grant carries its group's part size: a lane of a group of 16 KiB parts ends on a frame of 256 KiB
    (it never allocates room for it), though the server takes frames that long from a group whose parts
    are that long."""

    async def scenario():
        echo = Echo()
        server = LaneServer(echo, part_size_bytes=1 << 20)
        await server.start(["127.0.0.1"])
        outcomes = []
        try:
            for group, part_size in ((b"group-narrow", 1 << 14), (b"group-wide", 1 << 20)):
                port, token, key = parse_grant(server.grant(PEER, group, part_size))
                channel = Channel(await dial(port, MAGIC + token), key, outbound=True, frame_limit=1 << 22)
                await channel.accepted()
                message = part(1, size=1 << 18)
                message.group_id = group
                try:
                    outcomes.append(len([a async for a in exchange(channel, _aiter([message]))]))
                except LaneError as e:
                    outcomes.append(str(e))
            return outcomes, echo
        finally:
            await server.close()

    (narrow, wide), echo = asyncio.run(scenario())
    assert wide == 1, wide
    assert narrow != 1 and echo.seen.count(1.0) == 1, (narrow, echo.seen)  # only the wide group's part reached the averager
    assert any(e.startswith("a frame of 262") for e in echo.ended), echo.ended  # refused for its length


@pytest.mark.parametrize("sealed", [True, False])
def test_a_sender_refused_midway_reads_the_refusal_and_a_sender_that_never_hangs_up_is_let_go(monkeypatch, sealed):
    """A reducer that refuses a sender midway answers with a code and stops reading, with the sender's parts
    still coming. Closed at once with those bytes unread, the socket was reset, and the reset threw away
    whatever of the answers still waited in the reducer's send buffer (a sender that reads late, as a
    client-mode member does, or a slow link): the sender saw a broken lane instead of a refusal. The
    reducer now ends its sending side and drops what still comes until the sender hangs up: the sender
    reads every answer, the code and the clean end. A sender that goes on sending and never hangs up is
    let go after ``FINISH_WAIT``."""
    monkeypatch.setattr(lane, "SEAL_LOOPBACK", sealed)

    async def refuses(peer, group_id, messages):
        for _ in range(20):  # 1.3 MB of answers, far more than the sender's small receive buffer holds
            message = await anext(messages)
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=message.tensor_part)
        yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)

    async def many_parts(n):
        for i in range(n):
            yield part(i, size=1 << 16)

    async def scenario():
        server = await served(refuses)
        loop = asyncio.get_running_loop()
        try:
            port, token, key = parse_grant(server.grant(PEER, GROUP))
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, MAGIC + token)
            channel = Channel(sock, key, outbound=True, frame_limit=1 << 20, sealed=sealed)
            await channel.accepted()
            answers = exchange(channel, many_parts(2000))  # far more than the socket buffers hold
            await asyncio.sleep(0.5)  # the reducer has refused and finished long before this sender reads
            got = [answer.code async for answer in answers]

            port, token, key = parse_grant(server.grant(PEER, GROUP + b"-2"))
            sock = await dial(port, MAGIC + token)
            stubborn = Channel(sock, key, outbound=True, frame_limit=1 << 20, sealed=sealed)
            await stubborn.accepted()
            started = loop.time()
            with contextlib.suppress(LaneError):
                for i in range(100000):  # never reads, never hangs up: until the reducer lets it go
                    await stubborn.send(part(i, size=1 << 16))
            let_go = loop.time() - started
            sock.close()
            return got, let_go
        finally:
            await server.close()

    got, let_go = asyncio.run(scenario())
    assert got == [averaging_pb2.AVERAGED_PART] * 20 + [averaging_pb2.BAD_GROUP_ID], got
    assert let_go < lane.FINISH_WAIT + 3, let_go
