"""The local finetune: one contributor's round of training on its private data.

Finetunes the body and the contributor's own head from the current base for the round's budget
(one pass over ``examples_per_round`` examples, reshuffled each round), on the GPU when there is one,
with bf16/fp16 autocast on CUDA.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from coldfusion_p2p.config import TrainingSpec
from coldfusion_p2p.data import PrivateData
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.model import ClassifierHead


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if choice not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {choice!r}")
    return torch.device(choice)


def round_seed(training_seed: int, version: int, data_name: str) -> int:
    """The seed of a contributor's finetune on base ``version``: the swarm's seed, the round, its data.

    ``cfp2p join`` and the central simulation in ``bench/quality.py`` both use it, so the same data
    on the same base gives the same finetune in either.
    """
    data_seed = int.from_bytes(hashlib.sha1(data_name.encode()).digest()[:4], "little")
    return training_seed * 1_000_003 + version * 7919 + data_seed


@dataclass
class TrainResult:
    steps: int
    examples: int  # distinct examples trained on this round (the data wraps when it is shorter than a round)
    loss_first: float
    loss_last: float  # mean of the last few steps
    seconds: float
    eval_accuracy: float | None  # on the contributor's held-out split, after training


ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


class LocalTrainer:
    """Owns a contributor's tokenizer, head and device; finetunes a body for one round at a time."""

    def __init__(self, tokenizer, data: PrivateData, head: ClassifierHead, spec: TrainingSpec, max_length: int, device: torch.device):
        self.tokenizer, self.data, self.head, self.spec = tokenizer, data, head, spec
        self.max_length, self.device = max_length, device
        self.amp_dtype = None
        if device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _batches(self, texts: list[str], labels: list[int], batch_size: int):
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            yield {k: v.to(self.device) for k, v in enc.items()}, torch.tensor(labels[i : i + batch_size], device=self.device)

    def _forward(self, body: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            hidden = body(**enc).last_hidden_state
            return self.head(hidden.float(), enc["attention_mask"])

    def round_examples(self, round_seed: int) -> tuple[list[str], list[int]]:
        """This round's slice of the training data: a fresh shuffle, ``examples_per_round`` long (wrapping)."""
        order = list(range(len(self.data.train_texts)))
        random.Random(round_seed).shuffle(order)
        n = self.spec.examples_per_round
        picked = [order[i % len(order)] for i in range(n)]
        return [self.data.train_texts[i] for i in picked], [self.data.train_labels[i] for i in picked]

    def train(self, body: nn.Module, round_seed: int, progress: ProgressFn | None = None) -> TrainResult:
        """Finetune ``body`` (in place) and the head for one round."""
        start = time.perf_counter()
        torch.manual_seed(round_seed)
        body.to(self.device).train()
        self.head.to(self.device).train()
        texts, labels = self.round_examples(round_seed)
        total = math.ceil(len(texts) / self.spec.batch_size)
        params = list(body.parameters()) + list(self.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        warmup = max(1, int(total * self.spec.warmup_ratio)) if self.spec.warmup_ratio > 0 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        loss_fn = nn.CrossEntropyLoss()
        losses: list[float] = []
        for step, (enc, y) in enumerate(self._batches(texts, labels, self.spec.batch_size), start=1):
            loss = loss_fn(self._forward(body, enc), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training diverged at step {step} (loss {loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            if progress:
                progress(step, total, losses[-1])
        body.to("cpu")
        accuracy = self.evaluate(body)
        tail = losses[-max(1, min(5, len(losses))):]
        distinct = min(len(self.data.train_texts), self.spec.examples_per_round)
        return TrainResult(len(losses), distinct, losses[0], sum(tail) / len(tail), time.perf_counter() - start, accuracy)

    @torch.no_grad()
    def evaluate(self, body: nn.Module, limit: int = 256) -> float | None:
        """Accuracy of body+head on (up to ``limit`` of) the held-out split."""
        texts, labels = self.data.eval_texts[:limit], self.data.eval_labels[:limit]
        if not texts:
            return None
        body.to(self.device).eval()
        self.head.to(self.device).eval()
        correct = 0
        for enc, y in self._batches(texts, labels, 64):
            correct += (self._forward(body, enc).argmax(-1) == y).sum().item()
        body.to("cpu")
        self.head.to("cpu")
        return correct / len(texts)
