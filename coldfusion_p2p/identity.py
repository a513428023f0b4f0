"""A peer's identity key: its file, its public key line and its signatures, with no networking imports.

The file is what p2pd reads with ``-id``: libp2p's protobuf ``PrivateKey`` (field 1: key type, RSA
= 0; field 2: the key, PKCS#1 DER). The peer id is the hash of the public key (``certs``).
Signatures use the scheme hivemind signs DHT records with (RSA-PSS, SHA-256, base64), so one key
serves the DHT, version certificates and membership tokens. Only ``cryptography`` is needed here:
``cfp2p id`` and the lab's commands need no hivemind, and so no torch import (seconds at start).
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from coldfusion_p2p.certs import RSA_PSS, rsa_key_message
from coldfusion_p2p.errors import UserError

_RSA = 0  # libp2p's KeyType.RSA
_MAX_FILE = 1 << 16  # an RSA-4096 key in DER is about 2.4 kB


@dataclass
class Identity:
    """A peer's RSA identity key: it signs DHT records (as their owner), version certificates and tokens.

    ``key`` is cryptography's RSA private key; hivemind's ``RSAPrivateKey`` (which wraps one) is taken too.
    """

    key: rsa.RSAPrivateKey

    def __post_init__(self):
        inner = getattr(self.key, "_private_key", None)  # hivemind's RSAPrivateKey
        if isinstance(inner, rsa.RSAPrivateKey):
            self.key = inner
        if not isinstance(self.key, rsa.RSAPrivateKey):
            raise TypeError(f"an identity is an RSA private key, not {type(self.key).__name__}")

    @property
    def public_key(self) -> str:
        return self.key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data, RSA_PSS, hashes.SHA256())).decode()


def _read_varint(blob: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while i < len(blob) and shift < 64:
        b = blob[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return n, i
        shift += 7
    raise ValueError("truncated")


def encode_key_file(key: rsa.RSAPrivateKey) -> bytes:
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return rsa_key_message(der)


def decode_key_file(blob: bytes) -> rsa.RSAPrivateKey:
    """The RSA key in a libp2p ``PrivateKey`` message; ValueError for anything else."""
    fields: dict[int, int | bytes] = {}
    i = 0
    while i < len(blob):
        tag, i = _read_varint(blob, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            fields[number], i = _read_varint(blob, i)
        elif wire == 2:
            size, i = _read_varint(blob, i)
            if i + size > len(blob):
                raise ValueError("truncated")
            fields[number], i = blob[i:i + size], i + size
        else:
            raise ValueError(f"unexpected wire type {wire}")
    if fields.get(1) != _RSA or not isinstance(fields.get(2), bytes):
        raise ValueError("not an RSA key" if 1 in fields else "no key type")
    key = serialization.load_der_private_key(fields[2], password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA key")
    return key


def new_identity_file(path: str | None) -> str:
    """A new RSA-2048 identity at ``path`` (0600, never over an existing file) or in a private temporary file."""
    blob = encode_key_file(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    if path is None:
        fd, path = tempfile.mkstemp(prefix="cfp2p-identity-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
    else:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(blob)
    return path


def load_key(path: str) -> rsa.RSAPrivateKey:
    """The identity key in ``path``; a one-line UserError for a missing, damaged or foreign file."""
    try:
        with open(path, "rb") as f:
            blob = f.read(_MAX_FILE + 1)
        if len(blob) > _MAX_FILE:
            raise ValueError(f"over {_MAX_FILE} bytes")
        return decode_key_file(blob)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign key file
        raise UserError(f"identity file {path} is not a libp2p RSA private key ({type(e).__name__}: {str(e)[:80]})") from None


def load_identity(path: str) -> Identity:
    return Identity(load_key(path))
