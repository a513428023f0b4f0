"""Transfers between peers: serving a store's files and fetching them, with hard size limits.

Blob names: ``model/<file>`` (config and tokenizer files), ``version/<v>`` (a base's body),
``info/<v>`` (its manifest), ``certs/<v>`` (the certificates of the server's history from v on, as
one JSON list), ``line/<digest>`` (the bootstrap peer's copy of a revocation line's path, one JSON list). A fetch trusts nothing it receives: the size the server announces must be within
the caller's limit, the bytes must add up to it, and the caller checks the content (hashes,
certificates) before anything is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import AsyncIterator

from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from coldfusion_p2p.model import MODEL_FILE_NAMES
from coldfusion_p2p.store import BODY_FILE, MANIFEST_FILE, VersionStore

CHUNK_BYTES = 1 << 20
LINES_DIR = "lines"
MAX_CERT_CHAIN = 100_000


class BlobError(Exception):
    pass


def blob_request(name: str, token: dict | None) -> bytes:
    """A download request: the blob's name, and in a private swarm the caller's membership token after a newline."""
    return name.encode() + (b"\n" + json.dumps(token, sort_keys=True).encode() if token else b"")


def split_blob_request(metadata: bytes) -> tuple[str, dict | None]:
    """(name, token or None) of a request; never raises (a malformed token is checked, and refused, later)."""
    name, _, rest = metadata[:8192].partition(b"\n")
    token = None
    if rest:
        try:
            token = json.loads(rest)
        except (ValueError, RecursionError):
            token = None
    return name.decode("utf-8", errors="replace"), token


def _blob(root: Path, name: str) -> Path | bytes | None:
    kind, _, rest = name.partition("/")
    if kind == "model" and rest in MODEL_FILE_NAMES:
        return root / "model" / rest
    if kind == "line" and len(rest) == 64 and all(c in "0123456789abcdef" for c in rest):
        return root / LINES_DIR / f"{rest}.json"  # the certificates of a revocation line's path (bootstrap peer)
    if not (rest.isdigit() and len(rest) <= 9):
        return None
    version = int(rest)
    if kind == "version":
        return root / "versions" / f"v{version:06d}" / BODY_FILE
    if kind == "info":
        return root / "versions" / f"v{version:06d}" / MANIFEST_FILE
    if kind == "certs":
        certs = VersionStore.read_certificates(root, version, MAX_CERT_CHAIN)
        return json.dumps(certs).encode() if certs else None
    return None


async def serve_blob(root: Path, name: str) -> AsyncIterator[averaging_pb2.DownloadData]:
    """Stream a stored file: the first message carries its size, the rest carry 1 MiB chunks."""
    loop = asyncio.get_event_loop()
    blob = await loop.run_in_executor(None, _blob, root, name)
    if isinstance(blob, Path) and not blob.is_file():
        blob = None
    if blob is None:
        yield averaging_pb2.DownloadData(metadata=b"missing")
        return
    if isinstance(blob, bytes):
        yield averaging_pb2.DownloadData(metadata=f"size:{len(blob)}".encode())
        for i in range(0, len(blob), CHUNK_BYTES):
            yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=blob[i : i + CHUNK_BYTES]))
        return
    yield averaging_pb2.DownloadData(metadata=f"size:{blob.stat().st_size}".encode())
    with open(blob, "rb") as f:
        while chunk := await loop.run_in_executor(None, f.read, CHUNK_BYTES):
            yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=chunk))


async def _fetch_blob(dht: DHT, prefix: str, peer: str, name: str, dest: Path, max_bytes: int, on_bytes=None, token=None) -> None:
    from coldfusion_p2p.swarm.averager import FusionAverager

    p2p = await dht.replicate_p2p()
    try:
        stub = FusionAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=prefix)
        stream = await stub.rpc_fetch_blob(averaging_pb2.DownloadData(metadata=blob_request(name, token)))
        size, written = None, 0
        with open(dest, "wb") as f:
            async for msg in stream:
                if size is None:
                    head = msg.metadata.decode(errors="replace")
                    if head.startswith("refused:"):
                        raise BlobError(f"peer {peer[:12]} refused the download of {name}: {head[8:80].strip()}")
                    if not head.startswith("size:") or not head[5:].isdigit():
                        raise BlobError(f"peer {peer[:12]} does not have {name}")
                    size = int(head[5:])
                    if size > max_bytes:
                        raise BlobError(f"peer {peer[:12]} offers {size} bytes of {name}, more than the {max_bytes} expected")
                    continue
                written += len(msg.tensor_part.buffer)
                if written > size:
                    raise BlobError(f"peer {peer[:12]} sent more of {name} than the {size} bytes it announced")
                f.write(msg.tensor_part.buffer)
                if on_bytes is not None:
                    on_bytes(written, size)
        if size is None or written != size:
            raise BlobError(f"peer {peer[:12]} sent {written} of {size} bytes of {name}")
    finally:
        await p2p.shutdown()


def fetch_blob(dht: DHT, swarm_name: str, peer: str, name: str, dest: Path, timeout: float = 120.0, on_bytes=None,
               max_bytes: int = 4 << 30, token: dict | None = None) -> None:
    """Download one blob from one peer into ``dest``; raises BlobError, whatever went wrong.

    ``on_bytes(written, size)`` follows the transfer, for a progress bar."""
    from coldfusion_p2p.swarm.averager import averager_prefix

    try:
        PeerID.from_base58(peer)
    except Exception:  # noqa: BLE001 - a peer id from a record we could not use
        raise BlobError(f"not a peer id: {peer[:20]!r}") from None
    try:
        asyncio.run(asyncio.wait_for(_fetch_blob(dht, averager_prefix(swarm_name), peer, name, dest, max_bytes, on_bytes, token),
                                        timeout))
    except BlobError:
        raise
    except Exception as e:  # noqa: BLE001 - transport errors of many kinds; the caller tries another holder
        raise BlobError(f"download of {name} from {peer[:12]} failed: {type(e).__name__}: {str(e)[:120]}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()
