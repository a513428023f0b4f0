"""Can other peers dial this one? A dial-back through a peer that is already connected.

A joiner asks one of its initial peers to open a plain TCP connection back to it: to the address
that peer *observes* for the joiner's connection (behind a NAT, the router's public address) and
the port the joiner listens on (or announces). A home router without a forwarded port refuses it,
and the joiner learns that it cannot be dialled: it then takes part as a client (it sends its delta
and reduces no part of the all-reduce, serves no files, and never leads a group), which needs no
incoming connection at all.

The server side only ever connects to the caller's own observed address of a direct connection (a
relayed caller's address names the relay: it gets no answer), one port, at most once per caller per
``MIN_INTERVAL`` seconds and ``MAX_CONCURRENT`` at once, and sends nothing on the connection.
Every byte of the request is checked: a port number and a newline, nothing else.
"""

from __future__ import annotations

import asyncio
import re
import time

DIAL_BACK = "cfp2p.dial_back"
CONNECT_TIMEOUT = 3.0  # seconds the server tries to connect back
MIN_INTERVAL = 10.0  # seconds between two dial-backs for one caller
_OBSERVED = re.compile(r"^/ip([46])/([0-9a-fA-F.:]+)/tcp/\d+$")  # a direct connection only: a relayed one names the relay
MAX_CONCURRENT = 8  # dial-backs served at once by one peer
REACHABLE, UNREACHABLE, UNKNOWN = "reachable", "unreachable", "unknown"


class DialBackServer:
    """The handler every full peer serves (registered by the averager, next to its RPCs)."""

    def __init__(self):
        self._last: dict[str, float] = {}
        self._busy = 0

    async def handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = UNKNOWN
        caller, now = str(info.peer_id), time.monotonic()
        found = _OBSERVED.match(str(info.addr))
        if self._busy >= MAX_CONCURRENT or not found or now - self._last.get(caller, -1e9) <= MIN_INTERVAL:
            writer.close()  # busy, relayed, or asked a moment ago: no answer at all
            return
        self._last[caller] = now
        if len(self._last) > 10_000:  # forget old callers
            self._last = {p: t for p, t in self._last.items() if now - t < MIN_INTERVAL}
        self._busy += 1
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\n"), 5.0)  # "PORT\n", nothing else
            text = raw[:-1].decode("ascii", errors="replace")
            if text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535:
                answer = REACHABLE if await _connects(found.group(2), int(text)) else UNREACHABLE
            writer.write(answer.encode())
            await writer.drain()
        except Exception:  # noqa: BLE001 - a caller that hangs up or sends junk gets nothing more
            pass
        finally:
            self._busy -= 1
            writer.close()


async def _connects(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def _ask(dht, node, peer: str, port: int) -> str:
    """Runs in the DHT process (``DHT.run_coroutine``): one dial-back request to ``peer``."""
    from hivemind.p2p import PeerID

    try:
        _info, reader, writer = await asyncio.wait_for(node.p2p.call_binary_stream_handler(PeerID.from_base58(peer), DIAL_BACK), 5.0)
    except Exception:  # noqa: BLE001 - an old peer, or one that does not answer
        return UNKNOWN
    try:
        writer.write(f"{port}\n".encode())
        await writer.drain()
        answer = (await asyncio.wait_for(reader.read(32), CONNECT_TIMEOUT + 5.0)).decode("ascii", errors="replace")
        return answer if answer in (REACHABLE, UNREACHABLE) else UNKNOWN
    except Exception:  # noqa: BLE001
        return UNKNOWN
    finally:
        writer.close()


def listen_port(maddrs: list[str]) -> int | None:
    """The TCP port in the first address that has one."""
    for m in maddrs:
        found = re.search(r"/tcp/(\d+)", m)
        if found:
            return int(found.group(1))
    return None


def check_reachable(dht, peers: list[str], port: int) -> tuple[str, str | None]:
    """(REACHABLE | UNREACHABLE | UNKNOWN, a peer behind the answer), asking up to three of ``peers``: any
    "reachable" wins (one lying or badly placed peer cannot demote this one while another can dial it);
    "unreachable" only when no peer could dial it and at least one said it tried."""
    from functools import partial

    said_no = None
    for peer in peers[:3]:
        try:
            answer = dht.run_coroutine(partial(_ask, peer=peer, port=port))
        except Exception:  # noqa: BLE001 - the DHT process could not ask: no answer from this peer
            answer = UNKNOWN
        if answer == REACHABLE:
            return REACHABLE, peer
        if answer == UNREACHABLE and said_no is None:
            said_no = peer
    return (UNREACHABLE, said_no) if said_no else (UNKNOWN, None)
