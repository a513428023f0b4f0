"""``cfp2p eval`` and ``cfp2p export`` on a real store with real model code."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from coldfusion_p2p import model as M
from coldfusion_p2p.demo import DEMO_DATA
from coldfusion_p2p.evaluate import fit_probe
from coldfusion_p2p.procs import child_env, cli_command
from coldfusion_p2p.store import VersionInfo, VersionStore


def _store_with_v0(root, folder):
    """A store holding a model folder's files and its v0, as a peer that brought the model leaves it."""
    vs = VersionStore(root)
    vs.model_dir.mkdir(parents=True, exist_ok=True)
    for name in M.MODEL_FILE_NAMES:
        if (folder / name).is_file():
            shutil.copy(folder / name, vs.model_dir / name)
    v0 = M.body_state(M.load_body_module(folder))
    vs.save(v0, VersionInfo(0, M.hash_body(v0), parent=None))
    return vs, v0


@pytest.fixture
def store(tmp_path, tiny_model_dir) -> VersionStore:
    """A store as a peer leaves it: model files, v0 and a v1 that differs from it."""
    vs, v0 = _store_with_v0(tmp_path / "store", tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    v1 = {k: (t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t) for k, t in v0.items()}
    vs.save(v1, VersionInfo(1, M.hash_body(v1), parent=M.hash_body(v0), contributors=["a", "b"]))
    return vs


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=child_env(), timeout=300, check=False)


def test_export_loads_with_automodel_offline_and_equals_the_version(store, tmp_path):
    out = tmp_path / "exported"
    got = _cli("export", "--store", str(store.root), "--version", "1", "--out", str(out))
    assert got.returncode == 0, got.stderr
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(out, local_files_only=True)
    AutoTokenizer.from_pretrained(out, local_files_only=True)
    body, info = store.load(1)
    assert M.hash_body(M.body_state(model)) == info.hash == json.loads((out / "cfp2p.json").read_text())["hash"]
    again = _cli("export", "--store", str(store.root), "--version", "1", "--out", str(out))  # never overwrite
    assert again.returncode == 2 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    # a damaged version is refused, and nothing is written
    body_file = store.root / "versions" / "v000001" / "body.safetensors"
    raw = bytearray(body_file.read_bytes())
    raw[-10] ^= 0xFF
    body_file.write_bytes(bytes(raw))
    bad = _cli("export", "--store", str(store.root), "--version", "1", "--out", str(tmp_path / "other"))
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "other").exists()


def test_eval_compares_a_base_with_v0_by_probe_and_finetune(store):
    got = _cli("eval", "--store", str(store.root), "--base", "1", "--data", str(DEMO_DATA / "sms_spam.jsonl"),
               "--data", str(DEMO_DATA / "trec6.jsonl"), "--max-examples", "64", "--batch-size", "16", "--max-length", "32",
               "--lr", "1e-3", "--threads", "1", "--json")
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout)
    assert report["reference"] == "v0" and report["base"] == "v1"
    rows = {(r["dataset"], r["base"]): r for r in report["rows"]}
    assert set(rows) == {(d, b) for d in ("sms_spam", "trec6") for b in ("v0", "v1")}
    for r in rows.values():
        assert 0.0 <= r["probe"] <= 1.0 and 0.0 <= r["finetune"] <= 1.0 and r["held_out"] >= 30
    # a random tiny model on 64 examples: the probe only has to run; the real encoder is held to more below
    assert rows[("sms_spam", "v0")]["probe"] > 0.5
    text = _cli("eval", "--store", str(store.root), "--base", "latest", "--data", str(DEMO_DATA / "trec6.jsonl"),
                "--no-finetune", "--max-examples", "64", "--max-length", "32")
    assert text.returncode == 0 and "probe v0" in text.stdout and "probe v1" in text.stdout, text.stdout + text.stderr


def test_eval_refuses_bad_input_in_one_line(store, tmp_path):
    for args, needle in ((("--data", str(tmp_path / "missing.csv")), "missing.csv"),
                         (("--data", str(DEMO_DATA / "trec6.jsonl"), "--base", "7"), "v7"),
                         (("--data", str(DEMO_DATA / "trec6.jsonl"), "--label-column", "nope"), "nope")):
        got = _cli("eval", "--store", str(store.root), *args)
        assert got.returncode == 2, got.stderr
        assert needle in got.stderr and "Traceback" not in got.stderr and len(got.stderr.strip().splitlines()) == 1, got.stderr


def test_probe_separates_what_is_separable_and_fails_on_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] + 0.5 * x[:, 7] > 0).long()
    probe = fit_probe(x[:300], y[:300], 2)
    assert (probe(x[300:].double()).argmax(-1) == y[300:]).float().mean() > 0.95
    noise = torch.randint(0, 2, (400,), generator=g)
    probe = fit_probe(x[:300], noise[:300], 2)
    assert (probe(x[300:].double()).argmax(-1) == noise[300:]).float().mean() < 0.7


@pytest.mark.slow  # 26 s of the real encoder: the default run was at 14.5 of its 15 minutes (the demo runs the encoder too)
def test_probe_of_the_real_encoder_beats_the_majority_class(tmp_path):
    """all-MiniLM-L6-v2's v0, probed on sms_spam (88% "ham"): it must beat always answering the majority class."""
    from collections import Counter

    from coldfusion_p2p.data import load_private_data

    vs, _ = _store_with_v0(tmp_path / "store", M.minilm_folder())
    got = _cli("eval", "--store", str(vs.root), "--base", "0", "--data", str(DEMO_DATA / "sms_spam.jsonl"), "--no-finetune",
               "--max-examples", "600", "--max-length", "64", "--threads", "2", "--json")
    assert got.returncode == 0, got.stderr
    probe = json.loads(got.stdout)["rows"][0]["probe"]
    held_out = load_private_data(DEMO_DATA / "sms_spam.jsonl").eval_labels
    majority = Counter(held_out).most_common(1)[0][1] / len(held_out)
    assert probe > majority, (probe, majority)
