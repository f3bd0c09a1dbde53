"""train.py end to end on CPU: loss falls, resume is exact across a recluster, clear errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from train import TrainConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--sample_tokens=0", "--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=32", "--n_experts=4",
        "--n_clusters=2", "--rank=2", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--device=cpu", "--warmup_iters=2", "--lr=3e-3"]


def _cfg(tmp_path, *extra):
    return parse_config(TrainConfig, TINY + [f"--out_dir={tmp_path / 'out'}",
                                             f"--data_dir={tmp_path / 'data'}", *extra])


def test_clustered_training_loss_falls(tmp_path, capsys):
    cfg = _cfg(tmp_path, "--max_iters=40", "--eval_interval=10", "--burn_in=10",
               "--recluster_interval=10")
    train.train(cfg)
    printed = capsys.readouterr().out     # the first event groups the experts, later ones move them
    assert "first clustering at iteration 10: 4 experts grouped into 2 clusters in 2 layers " in printed
    assert re.search(r"recluster at iteration 20: \d+ experts moved; ", printed)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [10, 20, 30, 40]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    assert log[-1]["n_reclusters"] == 3 and "cluster_load_cv" in log[-1]
    assert log[-1]["expert_params"] < log[0]["expert_params"]         # compressed after warmup
    for key in ("train_loss", "val_ppl", "tokens_per_sec", "load_cv", "lr", "total_params",
                "experts_moved"):
        assert key in log[-1]


@pytest.mark.parametrize("moe,balance", [("topk", "aux"), ("topk", "bias"), ("clustered", "bias")])
def test_resume_equals_uninterrupted(tmp_path, moe, balance):
    schedule = [f"--moe={moe}", "--eval_interval=4", "--burn_in=2", f"--balance={balance}",
                "--recluster_interval=3", "--lr_decay_iters=8", "--dropout=0.1", "--bias_rate=0.01"]
    train.train(_cfg(tmp_path / "a", "--max_iters=8", *schedule))
    train.train(_cfg(tmp_path / "b", "--max_iters=4", *schedule))
    train.train(_cfg(tmp_path / "b", "--max_iters=8", "--resume", *schedule))
    a = torch.load(tmp_path / "a" / "out" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 8
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    biases = [v for k, v in a["model"].items() if k.endswith("expert_bias")]
    assert all(v.any() for v in biases) == (balance == "bias")       # the bias is model state


def test_config_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="valid keys: .*dataset"):
        parse_config(TrainConfig, ["--no_such_flag=1"])
    with pytest.raises(ValueError, match="expects int"):
        parse_config(TrainConfig, ["--max_iters=many"])
    with pytest.raises(ValueError, match="top_k"):
        _cfg(tmp_path, "--moe=topk", "--top_k=9").validate()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _cfg(tmp_path, "--resume").validate()
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "train.py", "--n_embd=30", "--n_head=4"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "divisible by n_head" in result.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        train.load_model(bad)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "--moe=dense", "--max_iters=4", "--eval_interval=2", "--log_interval=1")
    real_forward = train.GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss, aux = real_forward(self, idx, targets)
        if self.training and poisoned.calls >= 2:
            loss = loss * float("nan")
        poisoned.calls += self.training
        return logits, loss, aux
    poisoned.calls = 0
    monkeypatch.setattr(train.GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="iteration 2"):
        train.train(cfg)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter"] == 2


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import checkpoint
    cfg = _cfg(tmp_path, "--moe=dense", "--max_iters=4", "--eval_interval=2")
    real = checkpoint.shutil.disk_usage
    saves = []

    def filling(path):  # room for the first checkpoint, then the disk is full
        usage = real(path)
        saves.append(path)
        return usage if len(saves) == 1 else usage._replace(free=1000)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", filling)
    with pytest.raises(checkpoint.CheckpointError) as error:
        train.train(cfg)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "out" / "ckpt.pt") in message
    assert "GiB free" in message and "last good checkpoint is kept" in message
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter"] == 2
    assert not (tmp_path / "out" / "ckpt.tmp").exists()


def test_a_failed_write_removes_its_temp_file_and_keeps_the_last(tmp_path, monkeypatch):
    import checkpoint
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic({"w": torch.ones(3)}, path)

    def no_space(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save_atomic({"w": torch.zeros(3)}, path)
    assert not path.with_suffix(".tmp").exists()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_final_weights_only_checkpoint_is_smaller_and_cannot_resume(tmp_path):
    base = ["--moe=topk", "--eval_interval=2"]
    train.train(_cfg(tmp_path / "full", "--max_iters=4", *base))
    train.train(_cfg(tmp_path / "w", "--max_iters=4", "--final_ckpt=weights", *base))
    full, weights = (tmp_path / "full" / "out" / "ckpt.pt"), (tmp_path / "w" / "out" / "ckpt.pt")
    assert weights.stat().st_size < 0.5 * full.stat().st_size
    a, b = (torch.load(p, weights_only=True) for p in (full, weights))
    assert b["optimizer"] is None and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    result = subprocess.run([sys.executable, "train.py", *TINY, "--moe=topk", "--max_iters=6",
                             "--resume", f"--out_dir={tmp_path / 'w' / 'out'}",
                             f"--data_dir={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "holds weights only" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
    schedule = ["--moe=clustered", "--eval_interval=4", "--burn_in=2", "--recluster_interval=2"]
    train.train(_cfg(tmp_path, "--max_iters=4", *schedule))
    out = tmp_path / "out"
    # A run that logged iteration 8 and a recluster at 4, then died before its checkpoint.
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": 8, "val_loss": 0.0}) + "\n")
    with open(out / "reclusters.jsonl", "a") as f:
        f.write(json.dumps({"iter": 4}) + "\n")
    train.train(_cfg(tmp_path, "--max_iters=8", "--resume", *schedule))
    iters = [json.loads(line)["iter"] for line in (out / "log.jsonl").read_text().splitlines()]
    events = [json.loads(line)["iter"] for line in (out / "reclusters.jsonl").read_text().splitlines()]
    assert iters == [4, 8] and events == [2, 4, 6]


def test_checkpoints_every_ckpt_interval_and_at_the_end(tmp_path):
    cfg = _cfg(tmp_path, "--moe=dense", "--max_iters=6", "--eval_interval=2", "--ckpt_interval=4")
    saved = []
    real = train.save_atomic
    train.save_atomic = lambda obj, path: (saved.append(obj["iter"]), real(obj, path))
    try:
        train.train(cfg)
    finally:
        train.save_atomic = real
    assert saved == [4, 6]
    assert [json.loads(line)["iter"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()] == [2, 4, 6]
