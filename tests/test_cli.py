"""The command line as a user meets it: one-line errors, exit codes, help with examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.procs import child_env, cli_command

DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmdUxedkSNCqhiKRmgCk4QDd2v33S84SGooxRKhabdzhXy"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # a new session: if anything is left running, the test's own timeout kills the whole group
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=child_env(), timeout=timeout, start_new_session=True)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr


@pytest.mark.parametrize(
    "content, extra, fragment",
    [
        (None, [], "data file not found"),
        # each is a whole `cfp2p join` start (6 s here, most of it importing torch): four of them run with -m slow,
        # and tests/test_data.py checks every message of the loader itself in the default run
        pytest.param(b"", [], "is empty", marks=pytest.mark.slow),
        pytest.param(b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', [], "single class", marks=pytest.mark.slow),
        pytest.param(b'{"text": "a", "label": "x"}\n', ["--text-column", "sentence"], "text column 'sentence' not found",
                     marks=pytest.mark.slow),
        (b'{"text": "a", "label": "x"}\n', ["--label-column", "y"], "label column 'y' not found"),
        pytest.param(b'{"text": "\xff\xfe", "label": "x"}\n', [], "not valid UTF-8", marks=pytest.mark.slow),
    ],
)
def test_join_with_bad_data_fails_before_the_network(tmp_path, content, extra, fragment):
    data = tmp_path / "mine.jsonl"
    if content is not None:
        data.write_bytes(content)
    proc = run_cli("join", "--initial-peers", DEAD_PEER, "--data", str(data), "--store", str(tmp_path / "s"), *extra)
    assert_one_line_error(proc, 2, fragment)


def test_join_with_unreachable_peer(tmp_path):
    proc = run_cli("join", "--initial-peers", DEAD_PEER, "--data", str(DEMO_DATA / "sms_spam.jsonl"),
                   "--store", str(tmp_path / "s"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    assert_one_line_error(proc, 1, "none of the initial peers answered")


def test_join_with_malformed_address(tmp_path):
    proc = run_cli("join", "--initial-peers", "localhost:31337", "--data", str(DEMO_DATA / "sms_spam.jsonl"),
                   "--store", str(tmp_path / "s"))
    assert_one_line_error(proc, 2, "not a multiaddress")


def test_bootstrap_with_bad_config(tmp_path):
    config = tmp_path / "swarm.toml"
    config.write_text("[fusion]\nweighting = 'loudest'\n")
    proc = run_cli("bootstrap", "--config", str(config), "--store", str(tmp_path / "b"))
    assert_one_line_error(proc, 2, "fusion.weighting")


def test_versions_of_missing_store(tmp_path):
    assert_one_line_error(run_cli("versions", "--store", str(tmp_path / "none")), 2, "no store")


def test_help_shows_examples():
    for command in ("join", "bootstrap"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "Example:" in proc.stdout


def test_a_lab_is_made_admits_and_revokes_members_from_the_command_line(tmp_path):
    import json
    import stat

    config = tmp_path / "swarm.toml"
    config.write_text('[swarm]\nname = "lab"\n[model]\nsource = "tiny-bert"\n')
    lab = tmp_path / "lab"
    done = run_cli("bootstrap", "init", "--config", str(config), "--out", str(lab))
    assert done.returncode == 0 and "admission members" in done.stdout, done.stderr
    for name in ("authority.key", "swarm.toml", "members.json", "revoked.json"):
        assert stat.S_IMODE((lab / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(lab.stat().st_mode) == 0o700
    assert 'mode = "members"' in (lab / "swarm.toml").read_text()
    assert_one_line_error(run_cli("bootstrap", "init", "--config", str(config), "--out", str(lab)), 2, "already holds a swarm authority")

    key = tmp_path / "alice.key"
    shown = run_cli("id", "--identity", str(key))
    assert shown.returncode == 0 and shown.stdout.startswith("ssh-rsa ") and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert run_cli("id", "--identity", str(key)).stdout == shown.stdout  # the same key next time
    admitted = run_cli("bootstrap", "admit", shown.stdout.strip(), "--name", "alice", "--expires", "2h", "--lab", str(lab),
                       "--out", str(tmp_path / "alice.token"))
    assert admitted.returncode == 0, admitted.stderr
    token = json.loads((tmp_path / "alice.token").read_text())
    assert token["name"] == "alice" and 7100 < token["expires"] - token["issued"] <= 7200
    assert_one_line_error(run_cli("bootstrap", "admit", "ssh-rsa AAAAjunk", "--name", "bob", "--lab", str(lab)), 2, "not a public key")
    assert_one_line_error(run_cli("bootstrap", "admit", shown.stdout.strip(), "--name", "bob", "--expires", "soon", "--lab", str(lab)),
                          2, "not a duration")
    assert_one_line_error(run_cli("bootstrap", "revoke", "carol", "--lab", str(lab)), 2, "no member named 'carol'")
    assert run_cli("bootstrap", "revoke", "alice", "--lab", str(lab)).returncode == 0
    assert json.loads((lab / "revoked.json").read_text()) == [token["member"]]
    listed = json.loads(run_cli("bootstrap", "members", "--lab", str(lab), "--json").stdout)
    assert listed == [{"name": "alice", "peer": token["member"], "expires": token["expires"], "revoked": True, "source": "admit"}]
    # a token is no use without the key it was issued for, nor with another key
    data = str(DEMO_DATA / "sms_spam.jsonl")
    assert_one_line_error(run_cli("join", "--initial-peers", DEAD_PEER, "--data", data, "--token", str(tmp_path / "alice.token")),
                          2, "needs the identity key")
    other = tmp_path / "other.key"
    run_cli("id", "--identity", str(other))
    from coldfusion_p2p.certs import peer_id_of_public_key

    lab_peer = f"/ip4/127.0.0.1/tcp/9/p2p/{peer_id_of_public_key(token['authority'].encode())}"  # the lab's address, not running
    assert_one_line_error(run_cli("join", "--initial-peers", lab_peer, "--data", data, "--identity", str(other),
                                  "--token", str(tmp_path / "alice.token"), "--store", str(tmp_path / "s")), 2, "not for this peer")


def test_the_installed_packages_import_cli_and_bootstrap_under_the_projects_name():
    """cli/ and bootstrap/ install as coldfusion_p2p.cli and coldfusion_p2p.bootstrap: an import of a
    top-level `cli` or `bootstrap` works only from the repository's folder, never for a user."""
    import ast

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("coldfusion_p2p", "cli", "bootstrap", "bench", "tests"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
                offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in ("cli", "bootstrap")]
    assert not offenders, offenders
    outside = subprocess.run([sys.executable, "-c", "import coldfusion_p2p.cli.main, coldfusion_p2p.bootstrap.peer, coldfusion_p2p.bootstrap.lab"],
                             cwd=root.parent, capture_output=True, text=True, timeout=120)
    assert outside.returncode == 0, outside.stderr[-2000:]
