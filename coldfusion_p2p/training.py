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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# On a GPU, autocast pays only for bodies large enough that matrix work outweighs the casts and kernel
# launches it adds. Measured on an H200 (bench/train_speed.py, batch 16-64, max_length 64-128; README,
# "Training on a GPU"): all-MiniLM-L6-v2 (22.7M parameters) trains 15-36% slower under bf16 autocast
# than in float32, a BERT-base-sized body (110M) the same either way, a BERT-large-sized one (335M) 1.65x
# faster. "auto" autocasts from this many parameters on.
AUTOCAST_MIN_PARAMETERS = 200_000_000


class _QueuedChecks:
    """Each training step's loss and gradient norm, checked one step late without a wait for the GPU.

    Reading the loss each step (``.item()``) waits for the GPU to finish everything queued: it then sits
    idle while the CPU queues the next step, which cost float32 bodies of 22.7M and 110M parameters 12-14%
    of their speed on an H200 (README, "Training on a GPU"). Here each step's two numbers are copied to
    pinned host memory and marked with an event; they are read one step later, when the GPU is busy with
    the next one. A device flag that stays 1 from the first step that is not finite is handed to the
    fused AdamW as ``found_inf``, so that step and every later one leave the weights and the optimizer's
    moments as they were: the error is raised with nothing applied, as with a check before each update.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bad = torch.zeros((), dtype=torch.float32, device=device)
        self.host = torch.empty((2, 2), dtype=torch.float32, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.pending: list[int] = []

    def push(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        pair = torch.stack([loss.detach().float(), norm.detach().float()])
        self.bad = torch.maximum(self.bad, (~torch.isfinite(pair).all()).float())
        slot = step % 2
        self.host[slot].copy_(pair, non_blocking=self.cuda)
        if self.cuda:
            self.events[slot].record()
        self.pending.append(step)
        return self.bad

    def ready(self, keep: int):
        """Yield (step, loss, norm) of the queued steps, oldest first, until ``keep`` are left queued."""
        while len(self.pending) > keep:
            step = self.pending.pop(0)
            if self.cuda:
                self.events[step % 2].synchronize()
            loss, norm = self.host[step % 2].tolist()
            yield step, loss, norm


def amp_dtype_for(precision: str, device: torch.device, parameters: int) -> torch.dtype | None:
    """The autocast dtype for a body of ``parameters`` on ``device`` (None: float32)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32" or (precision == "auto" and parameters < AUTOCAST_MIN_PARAMETERS):
        return None
    if precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class LocalTrainer:
    """Owns a contributor's tokenizer, head and device; finetunes a body for one round at a time."""

    def __init__(self, tokenizer, data: PrivateData, head: ClassifierHead, spec: TrainingSpec, max_length: int, device: torch.device,
                 precision: str = "auto"):
        self.tokenizer, self.data, self.head, self.spec = tokenizer, data, head, spec
        self.max_length, self.device = max_length, device
        amp_dtype_for(precision, torch.device("cpu"), 0)  # refuse an unknown precision now, not in a round
        self.precision = precision
        self.amp_dtype: torch.dtype | None = None  # set per body by ``train`` (and ``evaluate``)
        # check each step's loss one step late, without waiting for the GPU (see ``_QueuedChecks``);
        # None: on CUDA, where a wait per step leaves the GPU idle while the next step is queued
        self.queued_checks: bool | None = None

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
        self.amp_dtype = amp_dtype_for(self.precision, self.device, sum(p.numel() for p in body.parameters()))
        body.to(self.device).train()
        self.head.to(self.device).train()
        texts, labels = self.round_examples(round_seed)
        total = math.ceil(len(texts) / self.spec.batch_size)
        params = list(body.parameters()) + list(self.head.parameters())
        queued = self.queued_checks if self.queued_checks is not None else self.device.type == "cuda"
        queued = queued and self.amp_dtype != torch.float16  # fp16's loss scaler skips steps by itself, and waits
        # the fused AdamW skips a step on the device when told to (``found_inf``), which is what lets the
        # queued checks keep the weights untouched without a wait; it is also one kernel instead of many
        optimizer = torch.optim.AdamW(params, lr=self.spec.lr, weight_decay=self.spec.weight_decay, **({"fused": True} if queued else {}))
        warmup = max(1, int(total * self.spec.warmup_ratio)) if self.spec.warmup_ratio > 0 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        loss_fn = nn.CrossEntropyLoss()
        losses: list[float] = []
        checks = _QueuedChecks(self.device) if queued else None

        def checked(step: int, value: float, norm: float = 0.0) -> None:
            if not math.isfinite(value):
                raise FloatingPointError(f"local training diverged at step {step} (loss {value})")
            if not math.isfinite(norm):
                raise FloatingPointError(f"local training diverged at step {step} (gradient norm {norm})")
            losses.append(value)
            if progress:
                progress(step, total, value)

        for step, (enc, y) in enumerate(self._batches(texts, labels, self.spec.batch_size), start=1):
            loss = loss_fn(self._forward(body, enc), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if checks is None:
                # the step's one wait for the GPU, once the backward pass is queued (a check before it stalled
                # the queue between forward and backward); nothing has been applied to the weights yet
                checked(step, loss.item())
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(optimizer)
                scaler.update()
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.found_inf = checks.push(step, loss, norm)  # once a step is not finite, no update applies
                try:
                    optimizer.step()
                finally:
                    del optimizer.found_inf
                for late in checks.ready(keep=1):  # the step before this one, done by now or nearly
                    checked(*late)
            scheduler.step()
        for late in checks.ready(keep=0) if checks is not None else ():
            checked(*late)
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
        self.amp_dtype = amp_dtype_for(self.precision, self.device, sum(p.numel() for p in body.parameters()))
        body.to(self.device).eval()
        self.head.to(self.device).eval()
        correct = 0
        for enc, y in self._batches(texts, labels, 64):
            correct += (self._forward(body, enc).argmax(-1) == y).sum().item()
        body.to("cpu")
        self.head.to("cpu")
        return correct / len(texts)
