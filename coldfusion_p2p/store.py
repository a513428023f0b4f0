"""Versioned bases on disk.

Layout of a store folder::

    model/                      config and tokenizer files of the swarm's model
    versions/v000003/           body.safetensors + manifest.json, one folder per base version
    certs/v000003.json          the certificate of each version of this store's history (v1 on), also of
                                versions whose body this peer skipped while catching up
    head.safetensors, head.json this contributor's private head and label names

A version is written into a hidden temporary folder, fsynced, and renamed into place, so a
crash never leaves a half-written version under a valid name. On load the body's hash is checked
against the manifest; a version that fails is skipped (and reported), never used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coldfusion_p2p.errors import UserError
from coldfusion_p2p.model import BodyState, hash_body, load_tensors, save_tensors

BODY_FILE = "body.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class VersionInfo:
    version: int
    hash: str
    parent: str | None
    contributors: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    averaged_tensors: list[str] = field(default_factory=list)  # names of the body tensors that were fused
    round_stats: dict = field(default_factory=dict)  # timings, group size, attempts


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not writing anything
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.versions_dir = self.root / "versions"
        self.model_dir = self.root / "model"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        """Remove the temporary folders of interrupted writes: those whose writing process is gone.

        A live writer's folder is left alone: any reader (``cfp2p versions``, a test) opens stores.
        """
        for tmp in self.versions_dir.glob(".tmp-*"):
            try:
                pid = int(tmp.name.split("-")[1])
            except (IndexError, ValueError):
                pid = None
            if pid is not None and _alive(pid):
                continue
            shutil.rmtree(tmp, ignore_errors=True)

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / f"v{version:06d}"

    def save(self, body: BodyState, info: VersionInfo) -> Path:
        """Write a version atomically; an existing identical version is kept as it is."""
        target = self.version_dir(info.version)
        if target.exists():
            existing = self.read_info(info.version)
            if existing is not None and existing.hash == info.hash:
                return target
            raise UserError(f"store {self.root} already holds a different v{info.version} ({existing.hash[:12] if existing else 'unreadable'})")
        tmp = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=f".tmp-{os.getpid()}-"))
        try:
            save_tensors(body, tmp / BODY_FILE, metadata={"version": str(info.version), "hash": info.hash})
            (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(info), indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            tmp.rename(target)
            _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def retire(self, version: int) -> Path | None:
        """Move a version that lost a fork out of the history (kept on disk, never loaded again)."""
        info, src = self.read_info(version), self.version_dir(version)
        if not src.exists():
            return None
        dest = self.root / "retired" / f"v{version:06d}-{(info.hash if info else 'unreadable')[:12]}-{int(time.time())}"
        dest.parent.mkdir(exist_ok=True)
        src.rename(dest)
        return dest

    def read_info(self, version: int) -> VersionInfo | None:
        try:
            data = json.loads((self.version_dir(version) / MANIFEST_FILE).read_text())
            return VersionInfo(**data)
        except (OSError, ValueError, TypeError):
            return None

    def list(self) -> list[VersionInfo]:
        """Every version with a readable manifest, oldest first (bodies are not hashed here)."""
        infos = []
        for d in sorted(self.versions_dir.glob("v[0-9]*")):
            try:
                info = self.read_info(int(d.name[1:]))
            except ValueError:
                continue
            if info is not None:
                infos.append(info)
        return infos

    def load(self, version: int) -> tuple[BodyState, VersionInfo]:
        """Load a version and check its body against the recorded hash."""
        info = self.read_info(version)
        if info is None:
            raise UserError(f"v{version} in {self.root} has no readable manifest")
        body = load_tensors(self.version_dir(version) / BODY_FILE)
        actual = hash_body(body)
        if actual != info.hash:
            raise UserError(f"v{version} in {self.root} is corrupted: body hash {actual[:12]} != recorded {info.hash[:12]}")
        return body, info

    def latest_valid(self, log=None) -> tuple[BodyState, VersionInfo] | None:
        """The newest version whose body matches its hash; corrupted ones are reported and skipped."""
        for info in reversed(self.list()):
            try:
                return self.load(info.version)
            except UserError as e:
                if log:
                    log(f"skipping {e}")
        return None

    # --- certificates ------------------------------------------------------------------------
    def cert_path(self, version: int) -> Path:
        return self.root / "certs" / f"v{version:06d}.json"

    def save_certificates(self, certs: list[dict]) -> None:
        """Write the certificates of this store's history (dicts of ``certs.Certificate.to_dict``).

        A certificate that replaces another at the same version (the store moves to a fork's winner)
        moves the old one to ``retired/``, with every later one: they were one history.
        """
        (self.root / "certs").mkdir(exist_ok=True)
        for cert in sorted(certs, key=lambda c: c["version"]):
            path = self.cert_path(cert["version"])
            text = json.dumps(cert, sort_keys=True)
            if path.is_file():
                if path.read_text() == text:
                    continue
                self.retire_certificates_from(cert["version"])
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)

    def retire_certificates_from(self, version: int) -> None:
        """Move the certificates of ``version`` and later to ``retired/`` (they were one history)."""
        dest = self.root / "retired" / f"certs-from-v{version:06d}-{int(time.time() * 1000)}"
        for path in sorted((self.root / "certs").glob("v[0-9]*.json")):
            if int(path.stem[1:]) >= version:
                dest.mkdir(parents=True, exist_ok=True)
                path.rename(dest / path.name)

    def certificates(self, start: int = 1, limit: int = 100_000) -> list[dict]:
        return self.read_certificates(self.root, start, limit)

    @staticmethod
    def read_certificates(root: Path, start: int, limit: int) -> list[dict]:
        """The certificates of a store's history from version ``start`` on, while they are consecutive."""
        out = []
        version = max(start, 1)
        while len(out) < limit:
            try:
                out.append(json.loads((Path(root) / "certs" / f"v{version:06d}.json").read_text()))
            except (OSError, ValueError):
                break
            version += 1
        return out

    def body_path(self, version: int) -> Path:
        return self.version_dir(version) / BODY_FILE
