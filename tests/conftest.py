"""Real local swarms for tests: a bootstrap peer and contributors as real ``cfp2p`` processes.

Every process is started in its own process group and the whole group is killed at teardown,
so no p2pd, DHT or averager process outlives a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from coldfusion_p2p import model as M
from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.procs import Children, child_env, cli_command

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEST_MANIFEST = """
[swarm]
name = "{name}"
[model]
source = "{source}"
[tokenizer]
max_length = 32
[training]
lr = 1e-3
batch_size = 16
examples_per_round = {examples_per_round}
[round]
min_group_size = {min_group_size}
round_window = {round_window}
matchmaking_time = 3.0
verify_timeout = 15.0
chunk_timeout = 5.0
allreduce_timeout = 60.0
"""


class LocalSwarm:
    def __init__(self, root: Path, children: Children):
        self.root, self.children = root, children
        self.boot = None
        self.initial_peer = None
        self.peers: dict[str, subprocess.Popen] = {}

    def start_bootstrap(self, source: str, name: str = "test", min_group_size: int = 2, round_window: float = 60.0,
                        examples_per_round: int = 48, timeout: float = 90, extra_toml: str = "", host: str = "127.0.0.1",
                        wrap: list[str] | None = None) -> str:
        """``host``: the address to listen on; ``wrap``: a command prefix (``ip netns exec NS``)."""
        config = self.root / "swarm.toml"
        config.write_text(TEST_MANIFEST.format(name=name, source=source, min_group_size=min_group_size,
                                               round_window=round_window, examples_per_round=examples_per_round) + extra_toml)
        return self._run_bootstrap(["--config", str(config), "--identity", str(self.root / "boot.key"), "--store", str(self.root / "boot")],
                                   timeout, host, wrap)

    def _run_bootstrap(self, args: list[str], timeout: float, host: str = "127.0.0.1", wrap: list[str] | None = None) -> str:
        """Start `cfp2p bootstrap ARGS` on loopback and wait until it writes its address: the initial peer."""
        maddrs = self.root / "bootstrap.maddrs"
        self.boot = self.children.start(
            (wrap or []) + cli_command("bootstrap", *args, "--host-maddrs", f"/ip4/{host}/tcp/0", "--maddrs-file", str(maddrs)),
            self.root / "bootstrap.log",
        )
        deadline = time.monotonic() + timeout
        while not (maddrs.is_file() and maddrs.read_text().strip()):
            assert self.boot.poll() is None, f"bootstrap exited: {self.log('bootstrap')}"
            assert time.monotonic() < deadline, "bootstrap did not come up"
            time.sleep(0.2)
        self.initial_peer = maddrs.read_text().split()[0]
        return self.initial_peer

    def start_lab(self, source: str, admission: str = "members", name: str = "test", round_window: float = 10.0,
                  timeout: float = 90, extra_toml: str = "") -> str:
        """A private swarm: `cfp2p bootstrap init` a lab folder, then run its bootstrap peer."""
        config = self.root / "swarm.toml"
        config.write_text(TEST_MANIFEST.format(name=name, source=source, min_group_size=2, round_window=round_window,
                                               examples_per_round=48) + extra_toml)
        self.lab = self.root / "lab"
        subprocess.run(cli_command("bootstrap", "init", "--config", str(config), "--out", str(self.lab), "--admission", admission),
                       check=True, capture_output=True, timeout=120, env=child_env())
        return self._run_bootstrap(["--lab", str(self.lab)], timeout)

    def member(self, name: str, expires: str = "1d") -> tuple[Path, Path]:
        """(key file, token file) of a new member admitted by the lab (`cfp2p id`, `cfp2p bootstrap admit`)."""
        key = self.root / f"{name}.key"
        public = subprocess.run(cli_command("id", "--identity", str(key)), check=True, capture_output=True, text=True, timeout=60, env=child_env()).stdout.strip()
        token = self.root / f"{name}.token"
        done = subprocess.run(cli_command("bootstrap", "admit", public, "--name", name, "--expires", expires, "--lab", str(self.lab),
                                          "--out", str(token)), capture_output=True, text=True, timeout=60, env=child_env())
        assert done.returncode == 0, done.stderr
        return key, token

    def join(self, name: str, dataset: str = "sms_spam", *extra: str, rounds: int | None = 2, initial_peers: list[str] | None = None,
             port: int = 0, host: str = "127.0.0.1", wrap: list[str] | None = None) -> subprocess.Popen:
        """``rounds`` None: until stopped; ``host``: the address to listen on; ``wrap``: a command prefix."""
        store = self.root / name
        store.mkdir(exist_ok=True)
        peers = [a for p in (initial_peers or [self.initial_peer]) for a in ("--initial-peers", p)]
        cmd = (wrap or []) + cli_command("join", *peers, "--data", str(DEMO_DATA / f"{dataset}.jsonl"),
                                         *(["--rounds", str(rounds)] if rounds is not None else []),
                                         "--store", str(store), "--host-maddrs", f"/ip4/{host}/tcp/{port}",
                                         "--threads", "1", "--events", str(store / "events.jsonl"), "--name", name, *extra)
        proc = self.children.start(cmd, self.root / f"{name}.log")
        self.peers[name] = proc
        return proc

    def log(self, name: str, tail: int | None = 3000) -> str:
        """A peer's log: its last ``tail`` characters (for a failure message), or all of it (``tail=None``,
        for a check: a line a busy peer printed a few rounds ago has left the tail)."""
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return text if tail is None else text[-tail:]

    def logged(self, name: str, text: str) -> bool:
        """Whether ``text`` is anywhere in the peer's log."""
        return text in self.log(name, tail=None)

    def events(self, name: str) -> list[dict]:
        path = self.root / name / "events.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait(self, proc: subprocess.Popen, name: str, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout}s:\n{self.log(name)}")

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            failed = [n for n, p in self.peers.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"{', '.join(failed)} exited with an error" if failed else "timed out"
                pytest.fail(f"{why} waiting for {what}:\n" + "\n".join(f"--- {n}\n{self.log(n)}" for n in self.peers))
            time.sleep(0.3)


def live_processes():
    """(pid, process group, /proc folder) of every process that is not a zombie."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(pid_dir.name), int(fields[2]), pid_dir


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a test's folder, say)."""
    cmdlines = (_read(d / "cmdline") for pid, _, d in live_processes() if pid != os.getpid())
    return [c for c in cmdlines if text in c]


def live_p2pd() -> set[int]:
    return {pid for pid, _, d in live_processes() if _read(d / "comm") == "p2pd"}


def group_size(pgid: int) -> int:
    """How many live processes a process group has."""
    return sum(1 for _, group, _ in live_processes() if group == pgid)


@pytest.fixture(autouse=True)
def no_leftover_p2pd():
    """Every p2pd daemon a test starts (through any peer) must be gone when it ends."""
    before = live_p2pd()
    yield
    deadline = time.monotonic() + 15
    while (left := live_p2pd() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"p2pd processes outlived the test: {sorted(left)}"


@pytest.fixture
def swarm(tmp_path):
    with Children() as children:
        yield LocalSwarm(tmp_path, children)
    deadline = time.monotonic() + 10  # processes killed a moment ago may take a moment to go
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(tmp_path)), "a process of this test outlived it"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return M.resolve_model_source(M.BUILTIN_TINY, cache_dir=tmp_path_factory.mktemp("models"))
