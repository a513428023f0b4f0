import gzip
import json

import pytest

from coldfusion_p2p.data import is_held_out, load_private_data
from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.errors import UserError

ROWS = [{"text": f"example number {i} about {'cats' if i % 2 else 'dogs'}", "label": "cat" if i % 2 else "dog"} for i in range(60)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


def test_formats_agree(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    csv = tmp_path / "d.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(csv), index=False)
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    loaded = [load_private_data(p) for p in (jsonl, csv, parquet, folder, gz)]
    first = loaded[0]
    assert first.labels == ["cat", "dog"]
    assert len(first.train_texts) + len(first.eval_texts) == 60
    for other in loaded[1:]:
        assert other.labels == first.labels
        assert sorted(other.train_texts) == sorted(first.train_texts)
        assert sorted(other.eval_texts) == sorted(first.eval_texts)


def test_held_out_split_is_deterministic_and_about_ten_percent():
    data = load_private_data(DEMO_DATA / "rotten_tomatoes.jsonl")
    total = len(data.train_texts) + len(data.eval_texts)
    assert 0.05 < len(data.eval_texts) / total < 0.16
    assert all(is_held_out(t) for t in data.eval_texts)
    assert not any(is_held_out(t) for t in data.train_texts)


def test_custom_columns(tmp_path):
    rows = [{"sentence": r["text"], "y": r["label"]} for r in ROWS]
    data = load_private_data(_write_jsonl(tmp_path / "c.jsonl", rows), text_column="sentence", label_column="y")
    assert data.num_labels == 2


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "missing.jsonl", "not found"),
        (lambda p: _file(p / "empty.jsonl", b""), "is empty"),
        (lambda p: _write_jsonl(p / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]), "single class"),
        (lambda p: _write_jsonl(p / "cols.jsonl", [{"body": "a", "label": "x"}]), "text column 'text' not found"),
        (lambda p: _write_jsonl(p / "lab.jsonl", [{"text": "a", "category": "x"}]), "label column 'label' not found"),
        (lambda p: _file(p / "bad.jsonl", b'{"text": "caf\xe9", "label": "x"}\n'), "not valid UTF-8"),
        (lambda p: _file(p / "broken.jsonl", b'{"text": "a", "label": \n'), "cannot parse"),
        (lambda p: _file(p / "d.xlsx", b"x"), "unsupported data file"),
    ],
)
def test_bad_data_gets_one_line_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(UserError) as e:
        load_private_data(path)
    assert fragment in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
