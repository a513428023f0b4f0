"""A contributor's private data, loaded through ``datasets`` and validated with clear errors.

Accepted: csv, tsv, json, jsonl (optionally .gz), parquet, and a folder written by
``Dataset.save_to_disk``. The held-out split is deterministic: an example is held out when the
first byte of sha1(text) is below 10% of 256, so every run and every machine agrees on it.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from coldfusion_p2p.errors import UserError

HELD_OUT_FRACTION = 0.1
_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class PrivateData:
    """Texts and integer labels, split into train and held-out parts; labels[i] names class i."""

    name: str
    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    dropped: int = 0  # rows without a text or a label

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def _format_of(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if compressed:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _FORMATS:
        raise UserError(f"unsupported data file {path.name}: use .csv, .tsv, .json, .jsonl, .parquet (optionally .gz) or a saved dataset folder")
    return _FORMATS[suffixes[-1]], compressed


def _check_utf8(path: Path, compressed: bool) -> None:
    """Fail early, naming the byte offset, on text that is not UTF-8 (datasets' own errors are cryptic)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if compressed else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UserError(f"data file {path} is not valid UTF-8 (undecodable byte at offset {offset + e.start})") from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read data file {path}: {e}") from None
    if offset == 0:
        raise UserError(f"data file {path} is empty")


def _load_table(path: Path):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a folder that is not a saved dataset
            raise UserError(f"{path} is not a saved dataset folder: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return ds
    fmt, compressed = _format_of(path)
    if fmt != "parquet":
        _check_utf8(path, compressed)
    kwargs = {"delimiter": "\t"} if path.name.lower().removesuffix(".gz").endswith(".tsv") else {}
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pyarrow / datasets wrap parse errors in many types
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        msg = (str(cause) or type(cause).__name__).splitlines()[0][:200]
        raise UserError(f"cannot parse {path} as {fmt}: {msg}") from None


def is_held_out(text: str) -> bool:
    return hashlib.sha1(text.encode("utf-8")).digest()[0] < int(256 * HELD_OUT_FRACTION)


def load_private_data(path: str | Path, text_column: str = "text", label_column: str = "label") -> PrivateData:
    """Load and validate a labelled text dataset; raises UserError with one line on any problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    table = _load_table(path)
    columns = list(table.column_names)
    if len(table) == 0:
        raise UserError(f"data file {path} has no examples")
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise UserError(f"{role} column {column!r} not found in {path}; columns are: {', '.join(columns)} (use --{role}-column)")
    texts, labels = table[text_column], table[label_column]
    pairs = [
        (t if isinstance(t, str) else str(t), str(y))
        for t, y in zip(texts, labels)
        if t is not None and y is not None and str(t).strip() != ""
    ]
    dropped = len(texts) - len(pairs)
    if not pairs:
        raise UserError(f"data file {path} has no example with both a text and a label")
    label_names = sorted({y for _, y in pairs})
    if len(label_names) < 2:
        raise UserError(f"label column {label_column!r} in {path} has a single class ({label_names[0]!r}); a classifier needs at least 2")
    index = {name: i for i, name in enumerate(label_names)}
    data = PrivateData(path.stem.split(".")[0], label_names, [], [], [], [], dropped)
    for text, label in pairs:
        if is_held_out(text):
            data.eval_texts.append(text)
            data.eval_labels.append(index[label])
        else:
            data.train_texts.append(text)
            data.train_labels.append(index[label])
    if not data.train_texts:
        raise UserError(f"data file {path} is too small: every example fell into the held-out split")
    return data
