"""Local training speed: the join loop (``LocalTrainer``) against a plain PyTorch loop, same model, data, batch.

Both loops tokenize each batch, run the body and a linear head, and take an AdamW step; the join
loop also checks the loss, clips gradients and keeps its schedule (what ``cfp2p join`` runs). The
figure is examples per second over the steps after the first, best of ``--repeats`` measured after
``--warmup`` untimed ones (a GPU's first loops pay for kernel selection and allocator growth),
alternating the two loops so that both see the same machine. On a GPU, give it enough examples
(``--examples 2048``) that a loop lasts seconds: 256 examples at batch 64 are three timed steps.

    python bench/train_speed.py --model all-MiniLM-L6-v2 --data coldfusion_p2p/demo_data/sms_spam.jsonl --threads 2
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


def join_loop(trainer: LocalTrainer, folder: Path, seed: int) -> float:
    body = M.load_body_module(folder)
    marks = []
    trainer.train(body, seed, progress=lambda step, total, loss: marks.append(time.perf_counter()))
    return (len(marks) - 1) * trainer.spec.batch_size / (marks[-1] - marks[0])


def plain_loop(trainer: LocalTrainer, folder: Path, seed: int, device: torch.device, amp: torch.dtype | None = None,
               fused: bool = False) -> float:
    """The textbook loop on the same batches: tokenize, forward, cross-entropy, backward, AdamW (under
    autocast to ``amp`` when given, as the join loop runs on a GPU; PyTorch's fused AdamW when ``fused``)."""
    torch.manual_seed(seed)
    body = M.load_body_module(folder).to(device).train()
    head = M.new_head(folder, trainer.data.num_labels).to(device).train()
    opt = torch.optim.AdamW(list(body.parameters()) + list(head.parameters()), lr=trainer.spec.lr, weight_decay=trainer.spec.weight_decay,
                            fused=fused or None)
    loss_fn = nn.CrossEntropyLoss()
    texts, labels = trainer.round_examples(seed)
    marks = []
    for i in range(0, len(texts), trainer.spec.batch_size):
        enc = trainer.tokenizer(texts[i:i + trainer.spec.batch_size], padding=True, truncation=True,
                                max_length=trainer.max_length, return_tensors="pt").to(device)
        y = torch.tensor(labels[i:i + trainer.spec.batch_size], device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(head(body(**enc).last_hidden_state.float(), enc["attention_mask"]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        marks.append(time.perf_counter())
    return (len(marks) - 1) * trainer.spec.batch_size / (marks[-1] - marks[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(DEMO_DATA / "sms_spam.jsonl"))
    ap.add_argument("--examples", type=int, default=256, help="examples per measured round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats of every loop before the measured ones")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="the join loop's: auto, fp32, bf16 or fp16 (auto: see training.py)")
    ap.add_argument("--fused-plain", action="store_true",
                    help="on a GPU, the third loop is the plain one with PyTorch's fused AdamW (the join loop's there) "
                         "instead of the plain one in the other precision")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    folder = M.resolve_model_source(args.model, cache_dir=Path.home() / ".cache" / "cfp2p")
    device = pick_device(args.device)
    data = load_private_data(args.data)
    spec = TrainingSpec(lr=1e-4, batch_size=args.batch_size, examples_per_round=args.examples)
    trainer = LocalTrainer(AutoTokenizer.from_pretrained(folder), data, M.new_head(folder, data.num_labels), spec, args.max_length, device,
                           precision=args.precision)
    parameters = sum(p.numel() for p in M.load_body_module(folder).parameters())
    amp = amp_dtype_for(args.precision, device, parameters)  # the join loop's autocast (None: float32)
    # on a GPU, the plain loop runs both ways: like the join loop, and the other way (what autocast buys or costs)
    other = None if device.type != "cuda" else (None if amp is not None else amp_dtype_for("bf16", device, parameters))
    joined, plain, plain_other = [], [], []
    name = lambda dtype: "float32" if dtype is None else str(dtype).replace("torch.", "")  # noqa: E731
    for r in range(args.warmup + args.repeats):
        figures = [join_loop(trainer, folder, r), plain_loop(trainer, folder, r, device, amp)]
        line = f"join loop {figures[0]:.1f} ex/s, plain loop {figures[1]:.1f} ex/s ({name(amp)})"
        if device.type == "cuda":
            if args.fused_plain:
                figures.append(plain_loop(trainer, folder, r, device, amp, fused=True))
                line += f", plain with fused AdamW {figures[2]:.1f} ex/s"
            else:
                figures.append(plain_loop(trainer, folder, r, device, other if amp is None else None))
                line += f", plain {name(other if amp is None else None)} {figures[2]:.1f} ex/s"
        if r < args.warmup:
            print(f"warm-up {r + 1}: {line}", flush=True)
            continue
        for kept, figure in zip((joined, plain, plain_other), figures):
            kept.append(figure)
        print(f"repeat {r + 1 - args.warmup}: {line}", flush=True)
    where = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    print(f"{Path(args.model).name} ({parameters / 1e6:.1f}M parameters) on {device} ({where}), batch {args.batch_size}, "
          f"max_length {args.max_length}, {name(amp)}: join loop {max(joined):.1f} ex/s, plain PyTorch {max(plain):.1f} ex/s, "
          f"ratio {max(joined) / max(plain):.3f}"
          + (f"; plain {'with fused AdamW' if args.fused_plain else name(other if amp is None else None)} {max(plain_other):.1f} ex/s, "
             f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if plain_other else ""), flush=True)


if __name__ == "__main__":
    main()
