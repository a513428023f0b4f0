"""The swarm manifest: what every peer of a swarm must agree on, validated.

A lab writes it as TOML (see ``bootstrap/swarm.toml``); the bootstrap peer completes it with the
model's v0 hash and file hashes and publishes it in the DHT, where every joining peer reads it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coldfusion_p2p.errors import UserError
from coldfusion_p2p.membership import parse_line

STRATEGIES = ("mean", "weighted", "nesterov", "trimmed_mean", "filtered_mean")  # coldfusion_p2p/strategies.py
COMPRESSIONS = ("none", "float16", "8bit")  # deltas on the wire (swarm/averager.py:wire_compression)

SWARM_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
PEER_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,60}$")


@dataclass
class ModelSpec:
    source: str = "all-MiniLM-L6-v2"  # a built-in name (all-MiniLM-L6-v2, tiny-bert) or a Hugging Face folder
    v0_hash: str = ""  # sha256 of the pretrained body's tensors, filled in by the bootstrap peer
    files: dict[str, str] = field(default_factory=dict)  # config/tokenizer file name -> sha256


@dataclass
class TokenizerSpec:
    max_length: int = 128


@dataclass
class TrainingSpec:
    lr: float = 5e-5
    batch_size: int = 32
    examples_per_round: int = 2000  # each contributor trains one pass over this many examples a round
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    seed: int = 0


@dataclass
class FusionSpec:
    # mean (ColD Fusion's), weighted (by examples trained this round), nesterov (DiLoCo's outer
    # optimizer), trimmed_mean (robust per coordinate) or filtered_mean (robust: per part of the all-reduce, a
    # member 5x further from the median than the median member is left out); coldfusion_p2p/strategies.py
    strategy: str = "mean"
    outer_lr: float | None = None  # None: the strategy's own (1.0, the plain average; nesterov 0.7)
    momentum: float = 0.9  # nesterov's
    trim_fraction: float = 0.3  # trimmed_mean: members dropped at each end of every coordinate (at least one of three or more)
    weighting: str = "uniform"  # uniform (the paper's) or examples: with strategy "mean", the same as "weighted"
    # none, float16 or 8bit (uniform 8-bit quantization), for the all-reduce of deltas. float16: half the
    # bytes and half the all-reduce time on a slow uplink, and the same probe accuracy as none at every
    # version in bench/quality.py's four-contributor setting (notes of issue 10)
    compression: str = "float16"
    # one round moves the base by at most this fraction of its L2 norm: every reducer bans a member whose
    # delta part is longer, and a longer average is scaled down to it. Honest rounds measured on
    # all-MiniLM-L6-v2 move it by well under a tenth of this (bench/delta_norms.py, README "Threat model").
    max_delta_ratio: float = 0.05


@dataclass
class RoundSpec:
    min_group_size: int = 2  # a peer alone waits instead of forking a private history
    round_window: float = 120.0  # seconds the ready peers wait for peers still training on the same base
    matchmaking_time: float = 5.0  # at most, seconds a leader gathers followers (it begins once its group is complete)
    allreduce_timeout: float = 180.0
    chunk_timeout: float = 10.0  # seconds without data before a sender is dropped from an all-reduce (2x for a reducer)
    verify_timeout: float = 30.0  # seconds to wait for the group's result hashes
    max_attempts: int = 3  # all-reduce attempts on the same deltas before keeping B[v]


@dataclass
class AdmissionSpec:
    # open: anyone may join; members: only keys with a token from the swarm's authority (`cfp2p bootstrap admit`);
    # enroll: the bootstrap peer issues a token to any new key, a few per source address an hour, and can revoke it
    mode: str = "open"
    revoked: list = field(default_factory=list)  # peer ids refused everywhere (`cfp2p bootstrap revoke`)
    # revoked peer id -> {version, hash}: the certified version its signatures still count on, with its
    # ancestors (the bootstrap peer fills it in when it publishes a revocation); a revoked peer not listed
    # has all its signatures withdrawn
    signed_until: dict = field(default_factory=dict)
    enroll_days: float = 30.0  # lifetime of a token the bootstrap peer issues in enroll mode
    enroll_per_address: int = 3  # new keys enrolled per source address an hour
    enroll_per_hour: int = 60  # new keys enrolled an hour in all


@dataclass
class SwarmManifest:
    name: str = "coldfusion"
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    fusion: FusionSpec = field(default_factory=FusionSpec)
    round: RoundSpec = field(default_factory=RoundSpec)
    admission: AdmissionSpec = field(default_factory=AdmissionSpec)

    def validate(self) -> "SwarmManifest":
        problems = []
        if not SWARM_NAME_RE.match(self.name):
            problems.append(f"swarm name {self.name!r} must be 1-48 letters, digits, '_' or '-'")
        if self.tokenizer.max_length < 8 or self.tokenizer.max_length > 4096:
            problems.append("tokenizer.max_length must be within 8..4096")
        t = self.training
        if not (0 < t.lr < 1):
            problems.append("training.lr must be within (0, 1)")
        if t.batch_size < 1 or t.examples_per_round < 1:
            problems.append("training.batch_size and training.examples_per_round must be positive")
        f = self.fusion
        if f.strategy not in STRATEGIES:
            problems.append(f"fusion.strategy must be one of {', '.join(STRATEGIES)}")
        if f.outer_lr is not None and not (0 < f.outer_lr <= 2):
            problems.append("fusion.outer_lr must be within (0, 2]")
        if not (0 <= f.momentum < 1):
            problems.append("fusion.momentum must be within [0, 1)")
        if not (0 < f.trim_fraction < 0.5):
            problems.append("fusion.trim_fraction must be within (0, 0.5)")
        if f.weighting not in ("uniform", "examples"):
            problems.append("fusion.weighting must be 'uniform' or 'examples'")
        elif f.weighting == "examples" and f.strategy not in ("mean", "weighted"):
            problems.append(f"fusion.weighting = 'examples' goes with strategy 'mean' or 'weighted', not {f.strategy!r}")
        if f.compression not in COMPRESSIONS:
            problems.append("fusion.compression must be 'none', 'float16' or '8bit'")
        if not (0 < f.max_delta_ratio <= 1):
            problems.append("fusion.max_delta_ratio must be within (0, 1]")
        r = self.round
        if r.min_group_size < 2:
            problems.append("round.min_group_size must be at least 2")
        if not 1 <= r.max_attempts <= 100:  # redo levels reach 2·max_attempts − 1, and a record carries at most 1000
            problems.append("round.max_attempts must be between 1 and 100")
        for name in ("round_window", "matchmaking_time", "allreduce_timeout", "verify_timeout", "chunk_timeout"):
            if getattr(r, name) <= 0:
                problems.append(f"round.{name} must be positive (seconds)")
        a = self.admission
        if a.mode not in ("open", "members", "enroll"):
            problems.append("admission.mode must be 'open', 'members' or 'enroll'")
        if not all(isinstance(p, str) and PEER_RE.match(p) for p in a.revoked) or len(a.revoked) > 10_000:
            problems.append("admission.revoked must list peer ids (Qm…)")
        if (not isinstance(a.signed_until, dict) or len(a.signed_until) > 10_000
                or not all(isinstance(p, str) and PEER_RE.match(p) and parse_line(v) is not None for p, v in a.signed_until.items())):
            problems.append("admission.signed_until must map peer ids (Qm…) to {version = N, hash = \"<64 hex>\"}")
        if not (0 < a.enroll_days <= 3650) or a.enroll_per_address < 1 or a.enroll_per_hour < 1:
            problems.append("admission.enroll_days must be within (0, 3650] days; the enroll rates must be positive")
        if problems:
            raise UserError("invalid swarm manifest: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> "SwarmManifest":
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a table of settings")
        sections = {
            "model": ModelSpec,
            "tokenizer": TokenizerSpec,
            "training": TrainingSpec,
            "fusion": FusionSpec,
            "round": RoundSpec,
            "admission": AdmissionSpec,
        }
        unknown = set(data) - set(sections) - {"name", "swarm"}
        if unknown:
            raise UserError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")
        swarm_table = data.get("swarm", {})  # TOML writes the name under [swarm], the DHT record at top level
        if not isinstance(swarm_table, dict) or set(swarm_table) - {"name"}:
            raise UserError(f"{where}: [swarm] takes only a name")
        kwargs: dict[str, Any] = {"name": swarm_table.get("name", data.get("name", cls.name))}
        for key, spec_type in sections.items():
            values = data.get(key, {})
            if not isinstance(values, dict):
                raise UserError(f"{where}: [{key}] must be a table")
            allowed = {f.name: f for f in dataclasses.fields(spec_type)}
            bad = set(values) - set(allowed)
            if key == "fusion" and "max_delta_norm" in bad:
                raise UserError(f"{where}: [fusion] max_delta_norm was replaced by max_delta_ratio (a fraction of the base's norm, e.g. 0.05)")
            if bad:
                raise UserError(f"{where}: unknown setting(s) in [{key}]: {', '.join(sorted(bad))}")
            converted = {}
            for k, v in values.items():
                default = getattr(spec_type(), k)
                if default is None and k == "outer_lr" and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
                    converted[k] = None if v is None else float(v)  # optional: None is the strategy's own
                    continue
                if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)  # TOML writes 1 for 1.0
                if type(v) is not type(default):
                    raise UserError(f"{where}: [{key}] {k} = {v!r} has the wrong type (want {type(default).__name__})")
                converted[k] = v
            kwargs[key] = spec_type(**converted)
        return cls(**kwargs).validate()

    def strategy(self):
        """The fusion strategy this manifest names, with its settings (a ``strategies.Strategy``)."""
        from coldfusion_p2p.strategies import strategy_for

        f = self.fusion
        name = "weighted" if f.strategy == "mean" and f.weighting == "examples" else f.strategy
        return strategy_for(name, f.outer_lr, f.momentum, f.trim_fraction)

    @classmethod
    def from_toml(cls, path: str | Path) -> "SwarmManifest":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"swarm config not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"swarm config {path} is not valid TOML: {e}") from None
        return cls.from_dict(data, where=str(path))
