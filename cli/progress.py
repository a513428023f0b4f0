"""Progress bars for ``cfp2p join`` on a terminal: download, local training (with loss), averaging.

A listener for ``contributor.Events``: it gets every event and the frequent ``live`` updates, and
log lines are printed above the bars. Off a terminal, ``cfp2p join`` prints plain log lines instead.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class JoinProgress:
    shows = frozenset({"train_step"})  # events whose log line the bars replace

    def __init__(self, console: Console):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<26}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._version = 0

    def __enter__(self) -> "JoinProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def log(self, message: str) -> None:
        # log lines may quote text from other peers: never read them as Rich markup
        self.progress.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(message)}", highlight=False, soft_wrap=True)

    def _task(self, key: str, description: str, total: float | None, **fields) -> TaskID:
        """One bar per kind, reused round after round: the screen keeps three lines, not three per round."""
        if key not in self._tasks:
            self._tasks[key] = self.progress.add_task(description, total=total, info="", **fields)
        else:
            self.progress.reset(self._tasks[key], total=total, description=description, info="", **fields)
        return self._tasks[key]

    def __call__(self, kind: str, **f) -> None:
        p = self.progress
        if kind == "download_bytes":
            key = f"download {f['name']}"
            if key != getattr(self, "_download_name", None):
                self._download_name = key
                self._task("download", f"download {f['name']}", f["total"])
            p.update(self._tasks["download"], completed=f["done"], info=f"{f['done'] / 2**20:.1f}/{f['total'] / 2**20:.1f} MiB")
        elif kind == "train_step":
            task = self._tasks.get("train")
            if task is None or f.get("version") != self._version or f["step"] <= 1:
                self._version = f.get("version", 0)
                task = self._task("train", f"train on v{self._version}", f["total"])
            p.update(task, completed=f["step"], info=f"loss {f['loss']:.4f}")
        elif kind == "phase" and f.get("state") == "ready":
            if "avg" in self._tasks:  # a new task: reset() would keep the last round's total
                p.remove_task(self._tasks.pop("avg"))
            self._task("avg", f"matchmaking on v{f.get('version')}", None)
            p.update(self._tasks["avg"], info="waiting for the round's peers")
        elif kind == "waiting" and "avg" in self._tasks:
            p.update(self._tasks["avg"], info=f"{f.get('ready')} ready, {f.get('training')} still training")
        elif kind == "averaging" and "avg" in self._tasks:
            p.update(self._tasks["avg"], info=f"gathering a group (up to {f.get('expected')} ready)")
        elif kind == "allreduce" and "avg" in self._tasks:
            p.update(self._tasks["avg"], description="all-reduce", info="averaging the body deltas")
        elif kind == "committed" and "avg" in self._tasks:
            p.update(self._tasks["avg"], description=f"committed v{f['version']}", total=1, completed=1,
                     info=f"{f['hash'][:12]}, {len(f.get('contributors', []))} contributor(s)")
        elif kind in ("unverified", "stale") and "avg" in self._tasks:
            p.update(self._tasks["avg"], info=kind)
