"""Honest round deltas against the base: ||B_i - B[v]|| / ||B[v]|| for a local finetune.

The per-round bound on a version's drift (``fusion.max_delta_ratio``) must sit well above what an
honest contributor's finetune moves the body, and far below what an attacker would need. This prints
the ratio for each dataset given, with the manifest settings given (defaults: the demo's and the
example manifest's).

    python bench/delta_norms.py --data coldfusion_p2p/demo_data/*.jsonl --model all-MiniLM-L6-v2 \
        --examples-per-round 384 --lr 1e-4 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from coldfusion_p2p import model as M
from coldfusion_p2p.config import TrainingSpec
from coldfusion_p2p.data import load_private_data
from coldfusion_p2p.fusion import body_delta, delta_norm
from coldfusion_p2p.training import LocalTrainer, round_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--examples-per-round", type=int, nargs="+", default=[384, 2000])
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 5e-5])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    folder = M.resolve_model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = M.body_state(M.load_body_module(folder))
    names = M.averaged_names(base)
    base_norm = delta_norm([base[n].float() for n in names])
    print(f"model {args.model}: ||B[v0]|| = {base_norm:.3f}")
    rows = []
    for path in args.data:
        data = load_private_data(path)
        for examples in args.examples_per_round:
            for lr in args.lr:
                spec = TrainingSpec(lr=lr, batch_size=args.batch_size, examples_per_round=examples)
                head = M.new_head(folder, data.num_labels)
                trainer = LocalTrainer(tokenizer, data, head, spec, args.max_length, torch.device("cpu"))
                body = M.load_body_module(folder, base)
                t = time.perf_counter()
                trainer.train(body, round_seed(0, 0, data.name))
                delta = body_delta(base, M.body_state(body), names)
                norm = delta_norm(delta)
                row = {"data": data.name, "examples": examples, "lr": lr, "delta_norm": round(norm, 4),
                       "ratio": round(norm / base_norm, 5), "seconds": round(time.perf_counter() - t, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    worst = max(r["ratio"] for r in rows)
    print(f"largest honest ratio {worst:.5f} (||delta|| / ||B||); mean {sum(r['ratio'] for r in rows) / len(rows):.5f}")


if __name__ == "__main__":
    main()
