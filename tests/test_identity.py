"""Identity key files: the same bytes p2pd and hivemind read, without importing either."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coldfusion_p2p.certs import peer_id_of_public_key, verify_signature
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.identity import Identity, load_identity, new_identity_file
from coldfusion_p2p.procs import child_env


def test_a_key_file_made_here_is_what_hivemind_reads_and_the_other_way_round(tmp_path):
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

    from coldfusion_p2p.swarm.node import _hivemind_key

    ours = tmp_path / "ours.key"
    new_identity_file(str(ours))
    proto = crypto_pb2.PrivateKey.FromString(ours.read_bytes())
    assert proto.key_type == crypto_pb2.KeyType.RSA
    theirs_key = RSAPrivateKey.__new__(RSAPrivateKey)
    theirs_key.__setstate__({"_private_key": proto.data})
    mine = load_identity(str(ours))
    assert theirs_key.get_public_key().to_bytes().decode() == mine.public_key
    assert _hivemind_key(str(ours)).get_public_key().to_bytes().decode() == mine.public_key

    made_by_hivemind = RSAPrivateKey()
    theirs = tmp_path / "theirs.key"
    theirs.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=made_by_hivemind.to_bytes()).SerializeToString())
    assert load_identity(str(theirs)).public_key == made_by_hivemind.get_public_key().to_bytes().decode()
    assert Identity(made_by_hivemind).public_key == load_identity(str(theirs)).public_key  # hivemind's key type is taken too

    # a signature made here is one hivemind's DHT validator and the certificates accept, and not for other bytes
    signature = mine.sign(b"v1 of the swarm")
    assert RSAPublicKey.from_bytes(mine.public_key.encode()).verify(b"v1 of the swarm", signature.encode())
    assert verify_signature(mine.public_key, b"v1 of the swarm", signature)
    assert not verify_signature(mine.public_key, b"v2 of the swarm", signature)
    assert peer_id_of_public_key(mine.public_key.encode()) != peer_id_of_public_key(load_identity(str(theirs)).public_key.encode())


def test_a_new_identity_never_replaces_an_existing_file(tmp_path):
    key = tmp_path / "k.key"
    new_identity_file(str(key))
    before = key.read_bytes()
    with pytest.raises(FileExistsError):
        new_identity_file(str(key))
    assert key.read_bytes() == before


@pytest.mark.parametrize("blob", [
    b"",
    b"\x08\x00",  # a key type and no key
    b"\x08\x01\x12\x04abcd",  # Ed25519
    b"\x08\x00\x12\x7f\x30\x82",  # a length past the end
    b"\x08\x00\x12\x04abcd",  # not DER
    b"\x0d\x00\x00\x00\x00",  # a wire type libp2p's message has no field of
    b"\xff" * 20,  # a varint that never ends
    b"ssh-rsa AAAAB3NzaC1yc2E= a public key line, not a private key\n",
    b"\x00" * 70_000,
])
def test_a_damaged_or_foreign_key_file_is_one_clear_error(tmp_path, blob):
    key = tmp_path / "bad.key"
    key.write_bytes(blob)
    with pytest.raises(UserError) as refused:
        load_identity(str(key))
    assert "is not a libp2p RSA private key" in str(refused.value) and "\n" not in str(refused.value)


def test_cfp2p_id_needs_neither_hivemind_nor_torch(tmp_path):
    """``cfp2p id`` runs before a person joins a lab: it imported hivemind, and so torch, and took 5 s here."""
    key = tmp_path / "me.key"
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('heavy', sorted(m for m in ('hivemind', 'torch', 'transformers') if m in sys.modules), file=sys.stderr))\n"
              "from coldfusion_p2p.cli.main import main\n"
              f"sys.argv = ['cfp2p', 'id', '--identity', {str(key)!r}]\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == load_identity(str(key)).public_key
    assert "heavy []" in done.stderr, done.stderr
