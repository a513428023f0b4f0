"""Is a base better? Linear probe and full finetuning on labelled data; export to a Hugging Face folder.

- Linear probe: the body is frozen; its mean-pooled token states feed a logistic regression
  (full-batch L-BFGS, L2-regularised) trained on the dataset's training split and scored on its
  held-out split. ColD Fusion reports this alongside finetuning (Don-Yehiya et al., 2023, §5).
- Finetune: body and a fresh head trained together (``training.LocalTrainer``, the code every
  contributor runs) for a fixed budget, then scored on the held-out split.

Both use the same deterministic held-out split as ``cfp2p join`` (``data.py``), so a contributor's
reported accuracy and this one are measured on the same examples.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from coldfusion_p2p import model as M
from coldfusion_p2p.config import TrainingSpec
from coldfusion_p2p.data import PrivateData
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.store import VersionStore
from coldfusion_p2p.training import LocalTrainer


@dataclass
class EvalSettings:
    max_length: int = 128
    probe_train_limit: int = 2000  # training examples for the probe (the first N of the split)
    eval_limit: int = 1000  # held-out examples scored
    finetune: TrainingSpec = field(default_factory=lambda: TrainingSpec(lr=5e-5, batch_size=32, examples_per_round=2000, seed=0))
    finetune_epochs: float = 1.0  # over the training split, capped by finetune.examples_per_round
    device: str = "cpu"


@torch.no_grad()
def embed(body: nn.Module, tokenizer, texts: list[str], max_length: int, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states, the same pooling as the contributors' heads."""
    body.to(device).eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = body(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())
    body.to("cpu")
    return torch.cat(out) if out else torch.zeros(0)


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, num_labels: int, l2: float = 1e-3, iters: int = 200) -> nn.Linear:
    """Multinomial logistic regression on standardised features; deterministic (full batch, L-BFGS)."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x = (x_train - mean) / std
    linear = nn.Linear(x.shape[1], num_labels, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    x = x.double()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")
    loss_fn = nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = loss_fn(linear(x), y_train) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        w = linear.weight / std.double()
        linear.bias -= (w * mean.double()).sum(1)
        linear.weight.copy_(w)
    return linear


def subset(texts: list[str], labels: list[int], limit: int) -> tuple[list[str], list[int]]:
    """At most ``limit`` examples, drawn with a fixed seed: files are often sorted by label, and
    their first rows would be a single class."""
    if len(texts) <= limit:
        return texts, labels
    picked = sorted(random.Random(0).sample(range(len(texts)), limit))
    return [texts[i] for i in picked], [labels[i] for i in picked]


def linear_probe(body: nn.Module, tokenizer, data: PrivateData, settings: EvalSettings) -> float:
    device = torch.device(settings.device)
    train_x, train_y = subset(data.train_texts, data.train_labels, settings.probe_train_limit)
    eval_x, eval_y = subset(data.eval_texts, data.eval_labels, settings.eval_limit)
    x_tr = embed(body, tokenizer, train_x, settings.max_length, device)
    x_te = embed(body, tokenizer, eval_x, settings.max_length, device)
    probe = fit_probe(x_tr, torch.tensor(train_y), data.num_labels)
    with torch.no_grad():
        pred = probe(x_te.double()).argmax(-1)
    return (pred == torch.tensor(eval_y)).float().mean().item()


def finetune_accuracy(model_dir: Path, body_state: M.BodyState, tokenizer, data: PrivateData, settings: EvalSettings) -> float:
    spec = settings.finetune
    examples = min(spec.examples_per_round, max(spec.batch_size, int(len(data.train_texts) * settings.finetune_epochs)))
    spec = TrainingSpec(**{**spec.__dict__, "examples_per_round": examples})
    eval_x, eval_y = subset(data.eval_texts, data.eval_labels, settings.eval_limit)
    scored = PrivateData(data.name, data.labels, data.train_texts, data.train_labels, eval_x, eval_y)
    head = M.new_head(model_dir, data.num_labels, seed=spec.seed)
    trainer = LocalTrainer(tokenizer, scored, head, spec, settings.max_length, torch.device(settings.device))
    body = M.load_body_module(model_dir, body_state)
    trainer.train(body, spec.seed)  # its examples are a seeded shuffle of the whole training split
    return trainer.evaluate(body, limit=len(eval_x))


def evaluate(model_dir: Path, bases: dict[str, M.BodyState], datasets: list[PrivateData], settings: EvalSettings,
             probe: bool = True, finetune: bool = True, log=None) -> list[dict]:
    """One row per (dataset, base): {dataset, base, probe, finetune} (None where not measured)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for data in datasets:
        for label, body_state in bases.items():
            row = {"dataset": data.name, "base": label, "probe": None, "finetune": None,
                   "train": len(data.train_texts), "held_out": min(len(data.eval_texts), settings.eval_limit)}
            if probe:
                row["probe"] = linear_probe(M.load_body_module(model_dir, body_state), tokenizer, data, settings)
            if finetune:
                row["finetune"] = finetune_accuracy(model_dir, body_state, tokenizer, data, settings)
            if log:
                log(f"{data.name} on {label}: " + ", ".join(f"{k} {row[k]:.3f}" for k in ("probe", "finetune") if row[k] is not None))
            rows.append(row)
    return rows


def resolve_base(store: VersionStore, spec: str) -> tuple[str, M.BodyState, Path]:
    """``spec``: a version number in ``store``, ``latest``, or a path to a version folder, a
    ``body.safetensors`` file or an exported Hugging Face folder. Returns (label, body, model folder)."""
    if spec == "latest" or spec.lstrip("v").isdigit():
        infos = store.list()
        if not infos:
            raise UserError(f"no versions in the store {store.root}")
        version = infos[-1].version if spec == "latest" else int(spec.lstrip("v"))
        body, info = store.load(version)  # re-hashed: a damaged version is refused here
        return f"v{info.version}", body, store.model_dir
    path = Path(spec)
    if path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        body = M.body_state(M.load_body_module(path))
        return path.name, body, path
    file = path / "body.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--base {spec}: not a version number, nor a version folder, body file or exported model folder")
    body = M.load_tensors(file)
    info = path / "manifest.json" if path.is_dir() else file.with_name("manifest.json")
    if info.is_file():
        want = json.loads(info.read_text()).get("hash")
        if want and M.hash_body(body) != want:
            raise UserError(f"{file} does not match the hash in {info}: damaged")
    return path.name, body, store.model_dir


def export_version(store: VersionStore, version: int | str, out: Path) -> dict:
    """Write a Hugging Face folder (config, model.safetensors, tokenizer) for one base version."""
    label, body, model_dir = resolve_base(store, str(version))
    if not (model_dir / "config.json").is_file():
        raise UserError(f"the store {store.root} has no model files (config, tokenizer); was it used by a peer?")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; pick a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        module = M.load_body_module(model_dir, body)
        # exactly the body's weights: reading the folder back gives the same body and hash (a weight
        # the original checkpoint lacked stays out, as it was)
        module.save_pretrained(tmp, state_dict=M.body_state(module), safe_serialization=True)
        for name in M.MODEL_FILE_NAMES:
            if name != "config.json" and (model_dir / name).is_file():
                shutil.copy(model_dir / name, tmp / name)
        meta = {"exported_from": str(store.root), "version": label, "hash": M.hash_body(body)}
        (tmp / "cfp2p.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
