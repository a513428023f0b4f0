"""What each part of the join loop's step costs: the plain loop with one part of the join loop added at a
time (gradient clipping, reading the loss before the step, the lr schedule, tokenizing in the loop),
then the join loop itself, all on the same batches and the same body, in rounds (the first is warm-up).

    python bench/train_parts.py --model FOLDER --device cuda --precision bf16 --batch-size 32 --max-length 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from coldfusion_p2p import model as M  # noqa: E402
from coldfusion_p2p.config import TrainingSpec  # noqa: E402
from coldfusion_p2p.data import load_private_data  # noqa: E402
from coldfusion_p2p.demo import DEMO_DATA  # noqa: E402
from coldfusion_p2p.training import LocalTrainer, amp_dtype_for, pick_device  # noqa: E402

VARIANTS = {"plain": {}, "+clip": {"clip": True}, "+loss read first": {"item_first": True}, "+schedule": {"schedule": True},
            "+tokenize": {"tokenize": True}, "all four": {"clip": True, "item_first": True, "schedule": True, "tokenize": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(DEMO_DATA / "sms_spam.jsonl"))
    ap.add_argument("--examples", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    folder = M.resolve_model_source(args.model, cache_dir=Path.home() / ".cache" / "cfp2p")
    device, data = pick_device(args.device), load_private_data(args.data)
    spec = TrainingSpec(lr=1e-4, batch_size=args.batch_size, examples_per_round=args.examples)
    trainer = LocalTrainer(AutoTokenizer.from_pretrained(folder), data, M.new_head(folder, data.num_labels), spec, args.max_length, device,
                           precision=args.precision)
    body, head = M.load_body_module(folder).to(device), M.new_head(folder, data.num_labels).to(device)
    amp = amp_dtype_for(args.precision, device, sum(p.numel() for p in body.parameters()))
    texts, labels = trainer.round_examples(0)
    b = args.batch_size
    batches = [(texts[i:i + b], trainer.tokenizer(texts[i:i + b], padding=True, truncation=True, max_length=args.max_length,
                                                   return_tensors="pt"), torch.tensor(labels[i:i + b])) for i in range(0, len(texts), b)]

    def loop(clip=False, item_first=False, schedule=False, tokenize=False) -> float:
        params = list(body.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
        marks = []
        for raw, enc, y in batches:
            if tokenize:
                enc = trainer.tokenizer(raw, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            enc, y = {k: v.to(device) for k, v in enc.items()}, y.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = nn.functional.cross_entropy(head(body(**enc).last_hidden_state.float(), enc["attention_mask"]), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if item_first:
                loss.item()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if schedule:
                sched.step()
            loss.item()
            marks.append(time.perf_counter())
        return (len(marks) - 1) * b / (marks[-1] - marks[0])

    def join() -> float:
        marks = []
        trainer.train(M.load_body_module(folder), 0, progress=lambda *_: marks.append(time.perf_counter()))
        return (len(marks) - 1) * b / (marks[-1] - marks[0])

    for r in range(args.rounds):
        figures = {name: loop(**kw) for name, kw in VARIANTS.items()} | {"join loop": join()}
        print(f"round {r + 1}{' (warm-up)' if r == 0 and args.rounds > 1 else ''}: "
              + ", ".join(f"{k} {v:.0f}" for k, v in figures.items()) + " examples/s", flush=True)


if __name__ == "__main__":
    main()
