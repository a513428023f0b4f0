"""A lab's folder for a private swarm: the authority's key, the manifest, members and revocations.

``cfp2p bootstrap init`` creates it; ``admit`` issues membership tokens; ``revoke`` adds a member's
peer id to ``revoked.json``, which the running bootstrap peer folds into the manifest it signs (a new
serial, published within seconds). Layout (every file 0600, the folder 0700)::

    lab/authority.key     the swarm authority's identity key: keep it secret, back it up
    lab/swarm.toml        the swarm's settings (edit, then restart the bootstrap peer)
    lab/members.json      who was admitted: name, peer id, public key, expiry
    lab/revoked.json      peer ids refused everywhere
    lab/signed_until.json revoked peer id -> {version, hash, lineage}: its signatures count on that version
                          and its ancestors (the bootstrap peer writes it when it publishes the revocation: the
                          history before stays certified)
    lab/followed_head.json the head of the certified history the bootstrap peer followed last
    lab/store/            v0, the model files, the signed manifest (published-manifest.json)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from coldfusion_p2p.config import PEER_RE, SwarmManifest
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.membership import TokenError, make_token, parse_line, peer_of_key

KEY_FILE, CONFIG_FILE, MEMBERS_FILE, REVOKED_FILE, STORE_DIR = "authority.key", "swarm.toml", "members.json", "revoked.json", "store"
SIGNED_UNTIL_FILE = "signed_until.json"
HEAD_FILE = "followed_head.json"


def _private_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _toml_string(v: str) -> str:
    """A TOML basic string: printable characters as they are, the rest escaped (a lone surrogate, which
    no UTF-8 file can hold, as U+FFFD)."""
    out = []
    for c in v:
        n = ord(c)
        if c in '"\\':
            out.append("\\" + c)
        elif 0xD800 <= n < 0xE000:
            out.append("\\uFFFD")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{n:04X}" if n < 0x10000 else f"\\U{n:08X}")
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: {"key" = value, ...}
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def manifest_toml(manifest: SwarmManifest) -> str:
    """The manifest's settings as TOML (without v0_hash and file hashes, which the bootstrap peer fills in)."""
    data = manifest.to_dict()
    lines = ["# written by `cfp2p bootstrap init`; edit and restart the bootstrap peer to change settings", "",
             "[swarm]", f"name = {_toml_value(data.pop('name'))}"]
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("v0_hash", "files")}
    for section, values in data.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]  # None: unset, the default
    return "\n".join(lines) + "\n"


def init_lab(config: str, out: str, admission: str) -> tuple[Path, SwarmManifest]:
    """Create the lab folder; refuses to overwrite an existing authority key."""
    from coldfusion_p2p.identity import new_identity_file

    manifest = SwarmManifest.from_toml(config)
    if admission not in ("open", "members", "enroll"):
        raise UserError(f"--admission must be open, members or enroll, not {admission!r}")
    manifest.admission.mode = admission
    manifest.validate()
    lab = Path(out)
    if (lab / KEY_FILE).exists():
        raise UserError(f"{lab / KEY_FILE} exists: this folder already holds a swarm authority (refusing to replace its key)")
    lab.mkdir(parents=True, exist_ok=True)
    os.chmod(lab, 0o700)
    new_identity_file(str(lab / KEY_FILE))
    _private_write(lab / CONFIG_FILE, manifest_toml(manifest))
    for name, empty in ((MEMBERS_FILE, {}), (REVOKED_FILE, [])):
        if not (lab / name).exists():
            _private_write(lab / name, json.dumps(empty))
    (lab / STORE_DIR).mkdir(exist_ok=True)
    return lab, manifest


def _lab(lab: str) -> Path:
    path = Path(lab)
    if not (path / KEY_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} is not a lab folder (no {KEY_FILE} or {CONFIG_FILE}); create one with `cfp2p bootstrap init`")
    return path


def authority(lab: str):
    from coldfusion_p2p.identity import load_identity

    return load_identity(str(_lab(lab) / KEY_FILE))


def members(lab: str) -> dict:
    try:
        data = json.loads((_lab(lab) / MEMBERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def revoked(lab: str | Path) -> list[str]:
    """The lab's revoked peer ids (empty when the file is missing or unreadable; anything not a peer id is left out)."""
    try:
        data = json.loads((Path(lab) / REVOKED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return sorted({p for p in data if isinstance(p, str) and PEER_RE.match(p)}) if isinstance(data, list) else []


def signed_until(lab: str | Path) -> dict[str, dict]:
    """Revoked peer id -> its line, {"version", "hash"} (empty when missing or unreadable; malformed lines left out)."""
    try:
        data = json.loads((Path(lab) / SIGNED_UNTIL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {p: v for p, v in data.items() if isinstance(p, str) and PEER_RE.match(p) and parse_line(v) is not None}


def record_signed_until(lab: str | Path, lines: dict[str, dict]) -> None:
    """Keep the lines the bootstrap peer just published for newly revoked peers (exactly what it signed; the
    line of a peer no longer revoked is dropped, so a second revocation draws a new one)."""
    listed = set(revoked(lab))
    kept = {p: v for p, v in signed_until(lab).items() if p in listed}
    _private_write(Path(lab) / SIGNED_UNTIL_FILE, json.dumps({**kept, **lines}, indent=1, sort_keys=True))


def followed_head(lab: str | Path) -> tuple[int, str] | None:
    """The head of the certified history the bootstrap peer followed last (None when unknown)."""
    try:
        data = json.loads((Path(lab) / HEAD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or type(data.get("version")) is not int or not isinstance(data.get("hash"), str):
        return None
    return data["version"], data["hash"]


def record_followed_head(lab: str | Path, head: tuple[int, str]) -> None:
    _private_write(Path(lab) / HEAD_FILE, json.dumps({"version": int(head[0]), "hash": str(head[1])}))


def admit(lab: str, public_key: str, name: str, lifetime: float, out: str | None) -> tuple[dict, Path]:
    """Issue a token for ``public_key`` (the line `cfp2p id` prints); writes it to ``out`` (default NAME.token)."""
    folder = _lab(lab)
    manifest = SwarmManifest.from_toml(folder / CONFIG_FILE)
    key = public_key.strip()
    if not key.startswith("ssh-rsa "):  # the member sent its key as a file
        try:
            key = Path(key).read_text()[:4096].strip()
        except OSError as e:
            raise UserError(f"not a public key, nor a file holding one: {public_key[:40]!r} ({e.strerror})") from None
    try:
        peer = peer_of_key(key)
    except TokenError:
        raise UserError("not a public key: pass the `ssh-rsa …` line that `cfp2p id` printed (or a file holding it)") from None
    if peer in revoked(folder):
        raise UserError(f"{peer} was revoked; remove it from {folder / REVOKED_FILE} first if you mean to admit it again")
    try:
        token = make_token(authority(lab), manifest.name, name, key, lifetime)
    except TokenError as e:
        raise UserError(str(e)) from None
    registry = members(lab)
    registry[peer] = {"name": name, "peer": peer, "key": key, "expires": token["expires"], "source": "admit",
                      "issued": token["issued"]}
    _private_write(folder / MEMBERS_FILE, json.dumps(registry, indent=1, sort_keys=True))
    dest = Path(out or f"{name}.token")
    _private_write(dest, json.dumps(token, indent=1, sort_keys=True) + "\n")
    return token, dest


def revoke(lab: str, who: str) -> tuple[str, str]:
    """Add a member (by name or peer id) to the revocation list: (name, peer id)."""
    folder = _lab(lab)
    registry = members(lab)
    found = [m for m in registry.values() if isinstance(m, dict) and who in (m.get("name"), m.get("peer"))]
    if len(found) > 1:
        raise UserError(f"{len(found)} members are named {who!r}; revoke one by its peer id: "
                        + ", ".join(str(m.get("peer")) for m in found))
    if found:
        name, peer = str(found[0].get("name")), str(found[0].get("peer"))
    elif PEER_RE.match(who):
        name, peer = "(not in members.json)", who
    else:
        raise UserError(f"no member named {who!r} in {folder / MEMBERS_FILE}; give a name from it or a peer id")
    listed = revoked(folder)
    if peer not in listed:
        _private_write(folder / REVOKED_FILE, json.dumps(sorted(listed + [peer]), indent=1))
    return name, peer


def lab_manifest(lab: str | Path) -> SwarmManifest:
    """The lab's settings with its revocation list folded in: what the bootstrap peer signs."""
    folder = _lab(str(lab))
    manifest = SwarmManifest.from_toml(folder / CONFIG_FILE)
    manifest.admission.revoked = sorted(set(manifest.admission.revoked) | set(revoked(folder)))
    lines = {p: v for p, v in signed_until(folder).items() if p in manifest.admission.revoked}
    manifest.admission.signed_until = {**lines, **manifest.admission.signed_until}
    return manifest.validate()


def expiry_text(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
