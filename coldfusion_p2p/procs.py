"""Child processes that are always ended: each in its own process group, stopped group-wide.

A peer is several processes (the Python process, hivemind's DHT and averager children, p2pd). If
the Python process dies hard its children live on, so whoever starts a peer kills the whole group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "coldfusion_p2p.cli.main", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def wait_for_address(path: Path, proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """The first address a starting bootstrap peer writes to ``path`` (its ``--maddrs-file``); a one-line
    WorkError when it exits first or does not write one within ``timeout`` seconds."""
    from coldfusion_p2p.errors import WorkError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().split()[0]
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
            raise WorkError(f"the bootstrap peer exited early ({' '.join(tail) or 'no output'})")
        time.sleep(0.2)
    raise WorkError(f"the bootstrap peer did not start listening within {timeout:.0f}s")


class Children:
    """A set of started process groups; ``stop()`` (or leaving the ``with``) ends them all."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env or child_env(), start_new_session=True,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM each leader (it shuts its own children down), then SIGKILL whatever is left of each group."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:  # the group may outlive its leader (p2pd, hivemind children)
            self.signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
