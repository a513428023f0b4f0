"""A body folder with random weights in a given shape and all-MiniLM-L6-v2's tokenizer, for speed runs.

Speed does not depend on the weights, and a BERT-base or BERT-large checkpoint cannot be fetched here
(nor carried to a GPU machine whose transfers are capped): the "Training on a GPU" table in the README
was measured on folders made with this.

    python bench/random_body.py base /tmp/bodies/base            # then: bench/train_speed.py --model /tmp/bodies/base
    python bench/random_body.py large /tmp/bodies/large --tokenizer FOLDER
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=None, help="a folder with the tokenizer files (default: the installed MiniLM's)")
    args = ap.parse_args()
    import torch
    from transformers import BertConfig, BertModel

    from coldfusion_p2p.model import MODEL_FILE_NAMES, minilm_folder

    source = args.tokenizer or minilm_folder()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILE_NAMES[1:]:  # the tokenizer's files; config.json is the shape's own
        if (source / name).is_file():
            shutil.copy(source / name, args.out / name)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[args.shape]))
    model.save_pretrained(args.out)
    print(f"{args.out}: {args.shape}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
