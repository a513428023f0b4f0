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


@dataclass
class HomeNetwork:
    """A "public" namespace, and home namespaces each behind its own router namespace that masquerades
    (NAT): a home peer dials out to the public network; nothing outside its home can dial it, and two
    homes cannot reach each other at all."""

    public: str
    public_ip: str  # where public peers listen
    homes: list[str]
    home_ips: list[str]  # private addresses, unroutable from anywhere but their own home

    def run_in(self, ns: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=True)


@contextlib.contextmanager
def home_networks(count: int = 2):
    """Make the public namespace (a bridge), ``count`` routers and ``count`` homes; skips without root,
    ``ip`` or ``iptables``."""
    namespaces_or_skip()
    if shutil.which("iptables") is None:
        pytest.skip("needs iptables (NAT inside a router namespace): apt-get install iptables")
    tag = f"cfn{os.getpid() % 100000}"
    pub = tag + "p"
    routers, homes = [f"{tag}r{i}" for i in range(count)], [f"{tag}h{i}" for i in range(count)]
    n = os.getpid() % 200
    public_net = f"10.{150 + os.getpid() % 40}.{n}"
    try:
        for ns in [pub, *routers, *homes]:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", pub, "link", "add", "br0", "type", "bridge")
        _ip("-n", pub, "addr", "add", f"{public_net}.1/24", "dev", "br0")
        _ip("-n", pub, "link", "set", "br0", "up")
        home_ips = []
        for i, (router, home) in enumerate(zip(routers, homes)):
            home_net = f"192.168.{n + i}"
            _ip("link", "add", f"{tag}a{i}", "type", "veth", "peer", "name", f"{tag}b{i}")  # public bridge <-> router
            _ip("link", "add", f"{tag}c{i}", "type", "veth", "peer", "name", f"{tag}d{i}")  # router <-> home
            _ip("link", "set", f"{tag}a{i}", "netns", pub)
            _ip("-n", pub, "link", "set", f"{tag}a{i}", "master", "br0")
            _ip("-n", pub, "link", "set", f"{tag}a{i}", "up")
            for dev, ns, addr in ((f"{tag}b{i}", router, f"{public_net}.{10 + i}/24"), (f"{tag}c{i}", router, f"{home_net}.1/24"),
                                  (f"{tag}d{i}", home, f"{home_net}.2/24")):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", addr, "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", home, "route", "add", "default", "via", f"{home_net}.1")
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _run("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", f"{tag}b{i}", "-j", "MASQUERADE")
            home_ips.append(f"{home_net}.2")
        yield HomeNetwork(pub, f"{public_net}.1", homes, home_ips)
    finally:
        for ns in [pub, *routers, *homes]:
            _ip("netns", "del", ns, check=False)
