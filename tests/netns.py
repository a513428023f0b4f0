"""Network namespaces a test makes for itself (Linux, root): real isolation for partitions and slow links.

Only addresses inside the namespaces made here are used; nothing leaves this machine. A test that
cannot make them (not root, no ``ip``, a sandbox without namespaces) is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def namespaces_or_skip() -> None:
    """Skip the calling test unless this process may create network namespaces."""
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` tool (iproute2) to make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    probe = f"cfpprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make network namespaces here: {made.stderr.strip()[:120]}")
    _ip("netns", "del", probe, check=False)


@dataclass
class Halves:
    """Two namespaces ``a`` and ``b`` linked by one veth pair: ``a_ip`` and ``b_ip`` on 10.x.y.0/24."""

    a: str
    b: str
    a_ip: str
    b_ip: str
    _link: str

    def run_in(self, ns: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def cut(self) -> None:
        """Take the link down on both sides: nothing crosses, and nothing tells either side why."""
        _ip("-n", self.a, "link", "set", self._link + "a", "down")
        _ip("-n", self.b, "link", "set", self._link + "b", "down")

    def heal(self) -> None:
        _ip("-n", self.a, "link", "set", self._link + "a", "up")
        _ip("-n", self.b, "link", "set", self._link + "b", "up")


@contextlib.contextmanager
def two_halves():
    """Make the two namespaces for the test and delete them after (their processes must be gone first)."""
    namespaces_or_skip()
    tag = f"cfp{os.getpid() % 100000}"
    a, b, link = tag + "a", tag + "b", "v" + tag
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", link + "a", "type", "veth", "peer", "name", link + "b")
        _ip("link", "set", link + "a", "netns", a)
        _ip("link", "set", link + "b", "netns", b)
        for ns, end, host in ((a, "a", 1), (b, "b", 2)):
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", link + end)
            _ip("-n", ns, "link", "set", link + end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Halves(a, b, f"{subnet}.1", f"{subnet}.2", link)
    finally:
        for ns in (a, b):
            _ip("netns", "del", ns, check=False)  # the veth pair goes with them
