import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from coldfusion_p2p import model as M
from coldfusion_p2p.errors import UserError
from coldfusion_p2p.store import VersionInfo, VersionStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = M.resolve_model_source(M.BUILTIN_TINY, cache_dir=tmp_path_factory.mktemp("models"))
    return folder, M.body_state(M.load_body_module(folder))


def test_tiny_model_is_deterministic_and_hash_is_sensitive(tiny, tmp_path):
    folder, body = tiny
    other = M.resolve_model_source(M.BUILTIN_TINY, cache_dir=tmp_path)  # built again, elsewhere
    assert M.hash_body(M.body_state(M.load_body_module(other))) == M.hash_body(body)
    changed = dict(body)
    name = M.averaged_names(body)[0]
    changed[name] = body[name].clone()
    changed[name].view(-1)[0] += 1e-7
    assert M.hash_body(changed) != M.hash_body(body)
    assert not any(k.startswith(("out.", "head")) for k in body)  # the body has no classifier


def test_store_round_trip_and_listing(tiny, tmp_path):
    _, body = tiny
    store = VersionStore(tmp_path / "s")
    h = M.hash_body(body)
    store.save(body, VersionInfo(0, h, None))
    store.save(body, VersionInfo(0, h, None))  # idempotent for the same content
    loaded, info = store.load(0)
    assert info.hash == h and M.hash_body(loaded) == h
    with pytest.raises(UserError, match="different v0"):
        store.save(body, VersionInfo(0, "f" * 64, None))
    assert [i.version for i in store.list()] == [0]


def test_corrupted_version_is_skipped(tiny, tmp_path):
    _, body = tiny
    store = VersionStore(tmp_path / "s")
    h = M.hash_body(body)
    store.save(body, VersionInfo(0, h, None))
    body1 = {k: (v + 1 if v.is_floating_point() else v) for k, v in body.items()}
    store.save(body1, VersionInfo(1, M.hash_body(body1), h))
    path = store.body_path(1)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupted"):
        store.load(1)
    notes = []
    found = store.latest_valid(log=notes.append)
    assert found is not None and found[1].version == 0 and "corrupted" in notes[0]


def test_kill_during_write_leaves_no_valid_version(tiny, tmp_path):
    """SIGKILL a process in the middle of saving: the store still lists only complete versions."""
    folder, body = tiny
    store_dir = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from coldfusion_p2p import store as S
        from coldfusion_p2p.model import save_tensors as real_save
        def slow_save(tensors, path, metadata=None):
            real_save(tensors, path, metadata)
            print("written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # die after the body is written, before the rename
        S.save_tensors = slow_save
        st = S.VersionStore({str(store_dir)!r})
        st.save({{"w": torch.ones(3)}}, S.VersionInfo(5, "x" * 64, None))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "written" in proc.stdout
    leftovers = list((store_dir / "versions").glob(".tmp-*"))
    assert leftovers, "the interrupted write should have left its temporary folder"
    store = VersionStore(store_dir)  # reopening cleans interrupted writes up
    assert store.list() == [] and not list((store_dir / "versions").glob(".tmp-*"))
    assert not os.path.exists(store.version_dir(5))


def test_a_loaded_base_does_not_change_when_its_file_is_damaged(tmp_path):
    """safetensors' load_file memory-maps; a running peer's base must not follow its file on disk."""
    path = tmp_path / "b.safetensors"
    M.save_tensors({"w": torch.zeros(1000)}, path)
    body = M.load_tensors(path)
    with open(path, "r+b") as f:  # damage the file in place, as a failing disk or a careless user would
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x3f")
    assert body["w"].abs().sum().item() == 0.0
    assert M.load_tensors(path)["w"][-1].item() == 1.0


def test_opening_a_store_leaves_a_live_writers_temporary_folder_alone(tiny, tmp_path):
    """A reader (cfp2p versions, a monitor) opening a store must not break a write in progress."""
    store = VersionStore(tmp_path / "s")
    live = store.versions_dir / f".tmp-{os.getpid()}-abc"
    live.mkdir()
    dead = store.versions_dir / ".tmp-999999999-abc"  # no such process
    dead.mkdir()
    VersionStore(tmp_path / "s")
    assert live.exists() and not dead.exists()


def test_a_checkpoint_without_a_pooler_gives_the_same_v0_in_every_process(tiny_model_dir, tmp_path):
    """transformers initialises a weight the checkpoint lacks at random on every load: such a weight
    is left out of the body, and a module built from a body is the same in every process."""
    import shutil

    folder = tmp_path / "no-pooler"
    shutil.copytree(tiny_model_dir, folder)
    weights = M.load_tensors(folder / "model.safetensors")
    M.save_tensors({k: v for k, v in weights.items() if not k.startswith("pooler.")}, folder / "model.safetensors", metadata={"format": "pt"})
    script = textwrap.dedent(f"""
        import torch
        from coldfusion_p2p import model as M
        body = M.body_state(M.load_body_module({str(folder)!r}))
        rebuilt = M.load_body_module({str(folder)!r}, body)
        pooler = rebuilt.state_dict()["pooler.dense.weight"]
        print(M.hash_body(body), sorted(body) == sorted(k for k in body if not k.startswith("pooler.")), float(pooler.double().sum()))
    """)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    lines = [r.stdout.split() for r in runs]
    assert lines[0] == lines[1] and lines[0][1] == "True"
    assert lines[0][0] == M.hash_body({k: v for k, v in weights.items() if not k.startswith("pooler.")})


def test_a_refilled_module_is_the_module_a_fresh_build_gives_and_trains_the_same(tiny_model_dir, tmp_path):
    """A round refills last round's module with the new base instead of building one: after a round of
    real training on it, the refilled module holds exactly what a fresh build from that base holds
    (the seeded pooler a pooler-less checkpoint lacks too), and the next round trains to the same bytes."""
    import shutil

    from transformers import AutoTokenizer

    from coldfusion_p2p.config import TrainingSpec
    from coldfusion_p2p.data import PrivateData
    from coldfusion_p2p.training import LocalTrainer

    folder = tmp_path / "no-pooler"
    shutil.copytree(tiny_model_dir, folder)
    weights = M.load_tensors(folder / "model.safetensors")
    M.save_tensors({k: v for k, v in weights.items() if not k.startswith("pooler.")}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())  # a config that declares half precision (transformers
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))  # 5 builds in it)
    data = PrivateData("d", ["a", "b"], ["good text", "bad text", "fine words", "poor words"] * 4, [0, 1, 0, 1] * 4, [], [], 0)

    def trained(module, seed):
        head = M.new_head(folder, 2)
        trainer = LocalTrainer(AutoTokenizer.from_pretrained(folder), data, head, TrainingSpec(batch_size=4, examples_per_round=8),
                               16, torch.device("cpu"))
        trainer.train(module, seed)
        return M.body_state(module)

    v0 = M.body_state(M.load_body_module(folder))
    assert all(v.dtype == torch.float32 and torch.equal(v, weights[k]) for k, v in v0.items())  # what the checkpoint holds, unrounded
    module = M.load_body_module(folder, v0)
    v1 = trained(module, 1)  # the module now holds a finetuned body, with gradients
    assert any(not torch.equal(v1[k], v0[k]) for k in v0)
    assert M.refill_body_module(module, v1)
    fresh = M.load_body_module(folder, v1)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in v1.items())  # a build from a base holds it exactly
    assert set(module.state_dict()) == set(fresh.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k
    assert all(p.grad is None for p in module.parameters())
    second = trained(module, 2)
    assert all(torch.equal(second[k], v) for k, v in trained(fresh, 2).items())
    assert not M.refill_body_module(module, {k: v for k, v in v1.items() if k != sorted(v1)[3]})  # not this module's tensors
    assert not M.refill_body_module(torch.nn.Linear(2, 2), v1)  # not built by load_body_module


def test_a_body_missing_a_weight_the_checkpoint_holds_is_refused(tiny):
    folder, body = tiny
    partial = {k: v for k, v in body.items() if k != sorted(body)[3]}
    with pytest.raises(UserError, match="lacks weights of this model"):
        M.load_body_module(folder, partial)
    extra = dict(body, **{"not.a.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="has tensors this model does not"):
        M.load_body_module(folder, extra)


def test_training_precision_follows_the_body_size_on_a_gpu_and_is_float32_on_the_cpu():
    from coldfusion_p2p.training import AUTOCAST_MIN_PARAMETERS, amp_dtype_for

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert all(amp_dtype_for(p, cpu, 10**9) is None for p in ("auto", "fp32", "bf16", "fp16"))
    assert amp_dtype_for("auto", gpu, AUTOCAST_MIN_PARAMETERS - 1) is None  # small bodies train faster in float32
    assert amp_dtype_for("fp32", gpu, 10**9) is None
    with pytest.raises(UserError, match="unknown precision"):
        amp_dtype_for("half", cpu, 0)


@pytest.mark.parametrize("queued", [False, True], ids=["waiting", "queued checks"])
def test_a_diverging_round_stops_before_its_step_touches_the_weights(tiny_model_dir, queued):
    """A non-finite loss stops the round before the optimizer moves a weight, whether the loop reads each
    loss before its update (the CPU's way) or one step late with the update skipped on the device (the
    GPU's way, forced here on the CPU)."""
    from transformers import AutoTokenizer

    from coldfusion_p2p.config import TrainingSpec
    from coldfusion_p2p.data import PrivateData
    from coldfusion_p2p.training import LocalTrainer

    data = PrivateData("d", ["a", "b"], ["good text", "bad text"] * 8, [0, 1] * 8, [], [], 0)
    head = M.new_head(tiny_model_dir, 2)
    trainer = LocalTrainer(AutoTokenizer.from_pretrained(tiny_model_dir), data, head, TrainingSpec(batch_size=4, examples_per_round=8),
                           16, torch.device("cpu"))
    trainer.queued_checks = queued
    body = M.load_body_module(tiny_model_dir)
    before = {k: v.clone() for k, v in M.body_state(body).items()}
    with torch.no_grad():
        next(head.parameters()).fill_(float("nan"))  # a head gone bad: the first loss is NaN
    head_before = [p.clone() for p in head.parameters()]
    with pytest.raises(FloatingPointError, match="diverged at step 1"):
        trainer.train(body, 0)
    assert all(torch.equal(before[k], v) for k, v in M.body_state(body).items())
    assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(head_before, head.parameters()))


ON_DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the queued checks' GPU path (pinned copies, events) is checked on the CPU's"))])


def _queued_trainer(tiny_model_dir, examples: int, queued: bool | None, device: str = "cpu"):
    from transformers import AutoTokenizer

    from coldfusion_p2p.config import TrainingSpec
    from coldfusion_p2p.data import PrivateData
    from coldfusion_p2p.training import LocalTrainer

    texts = [f"text number {i} says {'yes' if i % 2 else 'no'}" for i in range(32)]
    data = PrivateData("d", ["a", "b"], texts, [i % 2 for i in range(32)], [], [], 0)
    torch.manual_seed(0)
    trainer = LocalTrainer(AutoTokenizer.from_pretrained(tiny_model_dir), data, M.new_head(tiny_model_dir, 2),
                           TrainingSpec(batch_size=4, examples_per_round=examples, lr=1e-3), 16, torch.device(device))
    trainer.queued_checks = queued if device == "cpu" else (None if queued else False)  # on CUDA, queued is the default
    return trainer


@ON_DEVICES
def test_queued_checks_train_like_the_waiting_loop_and_report_every_step_in_order(tiny_model_dir, device):
    """The GPU's loop (losses read one step late, the fused AdamW) trains the same round as the waiting loop,
    within float rounding, and reports steps 1..n in order with their own losses."""
    runs = {}
    for queued in (False, True):
        trainer, seen = _queued_trainer(tiny_model_dir, 24, queued, device), []
        body = M.load_body_module(tiny_model_dir)
        result = trainer.train(body, 7, progress=lambda step, total, loss: seen.append((step, total, loss)))
        runs[queued] = (result, seen, M.body_state(body))
    (waiting, seen_w, body_w), (queued, seen_q, body_q) = runs[False], runs[True]
    assert [s[:2] for s in seen_q] == [(k, 6) for k in range(1, 7)] == [s[:2] for s in seen_w]
    assert queued.steps == waiting.steps == 6
    assert [s[2] for s in seen_q] == pytest.approx([s[2] for s in seen_w], rel=1e-4)
    assert len({s[2] for s in seen_q}) > 1  # the losses are each step's own, not one value repeated
    assert max((body_q[k] - body_w[k]).abs().max().item() for k in body_w) < 1e-4
    assert any(not torch.equal(body_q[k], M.body_state(M.load_body_module(tiny_model_dir))[k]) for k in body_q)


@ON_DEVICES
def test_queued_checks_stop_a_round_that_diverges_midway_with_the_earlier_steps_kept_and_no_later_one(tiny_model_dir, device):
    """A loss that goes NaN at step 3 is read a step late, while step 4 is already queued: the round still stops
    naming step 3, with the weights exactly as two clean steps left them (step 3's update and 4's skipped)."""
    clean = _queued_trainer(tiny_model_dir, 8, True, device)  # the same seed and data: its two steps are the first two below
    body_clean = M.load_body_module(tiny_model_dir)
    clean.train(body_clean, 7)

    trainer = _queued_trainer(tiny_model_dir, 24, True, device)
    calls = [0]

    def poison(module, args, output):  # the third forward pass of the head returns NaN
        calls[0] += 1
        return output * float("nan") if calls[0] == 3 else output

    hook = trainer.head.register_forward_hook(poison)
    body = M.load_body_module(tiny_model_dir)
    seen = []
    with pytest.raises(FloatingPointError, match="diverged at step 3"):
        trainer.train(body, 7, progress=lambda step, total, loss: seen.append(step))
    hook.remove()
    assert seen == [1, 2] and calls[0] == 4  # step 4 was queued before step 3's loss was read
    state, expected = M.body_state(body), M.body_state(body_clean)
    assert all(torch.equal(state[k].cpu(), expected[k].cpu()) for k in expected)  # a failed round leaves them on the device
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(trainer.head.parameters(), clean.head.parameters()))
