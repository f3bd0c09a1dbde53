"""train.py --expert_parallel: one step's gradients (and clipping) on W CPU processes (gloo)
against one process, and torchrun end to end: the checkpoint is a full single-process model,
2 + resume 2 iterations equal 4, and a stopped run resumes as if unbroken."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel import ep
from checkpoint import load_model
from model import GPT, GPTConfig
from parallel.ddp import DataParallel
from train import TrainConfig, build_optimizer, parse_config

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(n_layer=2, n_head=2, n_embd=16, ffn_hidden=24, n_experts=4, top_k=2, block_size=16,
           vocab_size=64, moe="topk", moe_impl="loop", balance="bias")
B = 2


def _loss(model, idx):
    _, lm, aux = model(idx[:, :-1], idx[:, 1:])
    return lm + aux


def _check(rank, world, size):
    torch.manual_seed(0)
    full = GPT(GPTConfig(**CFG))
    for block in full.blocks:                       # outputs large enough to compare
        block.ffn.bank.w2.data.normal_(0, 0.3)
    model = copy.deepcopy(full)
    idx = torch.randint(0, CFG["vocab_size"], (world, B, CFG["block_size"] + 1),
                        generator=torch.Generator().manual_seed(1))
    # The reference: the mean over ranks of each rank's loss (LM mean + aux on its tokens).
    sum(_loss(full, idx[r]) for r in range(world)).div(world).backward()

    ep_group, replica_group = ep.expert_parallel_groups(rank, world, size)
    ep.parallelize(model, ep_group)
    shards = [p for block in model.blocks for p in block.ffn.bank.parameters()]
    _loss(model, idx[rank]).backward()
    ep.sync_grads(model, shards, world, replica_group)

    def compare():
        position = rank % size
        for (name, p), (ref_name, ref) in zip(model.named_parameters(), full.named_parameters()):
            assert name == ref_name
            want = ref.grad
            if any(p is s for s in shards):
                want = want.chunk(size)[position]
            torch.testing.assert_close(p.grad, want, msg=lambda m: f"{name}: {m}")
    compare()
    # Clipping sees the whole model's norm: the same scale as one process.
    norm = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.05)
    assert norm > 0.05
    ep.clip_grad_norm(model, shards, 0.05, ep_group)
    compare()
    # The balancing biases move on the loads of every rank's tokens: as one process over all.
    layers = model.moe_layers()   # as train.train_step does after the optimizer step
    DataParallel("cpu", "float32").sum_over_ranks(
        [c for layer in layers for c in (layer.step_counts, layer.step_cluster_counts)])
    for layer in layers:
        layer.balance_step()
    for layer in full.moe_layers():
        layer.balance_step()
    for layer, ref in zip(model.moe_layers(), full.moe_layers()):
        assert ref.expert_bias.any() and torch.equal(layer.expert_bias, ref.expert_bias)


def _worker(rank, world, size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check(rank, world, size)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,size", [(2, 2), (4, 2)])
def test_gradients_match_one_process(tmp_path, world, size):
    mp.spawn(_worker, args=(world, size, str(tmp_path / "store")), nprocs=world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLUSTERED = ["--moe=clustered", "--n_clusters=2", "--rank=2", "--burn_in=1",
             "--recluster_interval=1", "--probe_tokens=16", "--balance=bias", "--bias_rate=0.01"]


def _torchrun_command(out, *extra) -> list[str]:
    args = ["--n_layer=2", "--n_head=2", "--n_embd=16", "--ffn_hidden=16", "--n_experts=4",
            "--block_size=16", "--batch_size=2", "--moe=topk", "--dropout=0", "--device=cpu",
            "--sample_tokens=0",
            "--expert_parallel=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=1",
            "--lr_decay_iters=4", "--lr=3e-3", f"--out_dir={out}", f"--data_dir={out.parent / 'data'}"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "train.py", *args, *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(out, *extra):
    result = subprocess.run(_torchrun_command(out, *extra), cwd=ROOT, capture_output=True,
                            text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("moe", ["topk", "clustered"])
def test_torchrun_checkpoint_is_full_and_resume_is_exact(tmp_path, moe):
    """Clustered: the first clustering at iteration 1, then a recluster every iteration (under
    expert parallelism: gather, regroup, re-slice, optimizer state carried), across a resume."""
    extra = CLUSTERED if moe == "clustered" else []
    _torchrun(tmp_path / "a", "--max_iters=4", *extra)
    _torchrun(tmp_path / "b", "--max_iters=2", *extra)
    _torchrun(tmp_path / "b", "--max_iters=4", "--resume", *extra)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 4 and len(a["rng_ranks"]) == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    # The checkpoint is the full model: one process loads it, runs it, and takes its optimizer.
    model, ckpt = load_model(tmp_path / "a" / "ckpt.pt")
    bank = model.blocks[0].ffn.bank
    assert (bank.base1.shape[0] == 2 and int(model.blocks[0].ffn.n_reclusters) == 3) \
        if moe == "clustered" else bank.w1.shape[0] == 4
    logits, loss, _ = model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))
    assert torch.isfinite(loss)
    cfg = TrainConfig(**ckpt["config"])
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(ckpt["optimizer"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert [optimizer.state[p]["exp_avg"].shape for p in params] == [p.shape for p in params]


def test_a_stopped_torchrun_checkpoints_one_step_on_every_rank_and_resumes_as_if_unbroken(tmp_path):
    """Ctrl-C reaches torchrun, which sends each rank a SIGINT, at slightly different steps:
    the ranks agree at the next log step, checkpoint that step (with the eval interval's sums)
    and stop; the resumed run then ends where an unbroken one does, weights and log alike."""
    schedule = ["--eval_interval=8", "--log_interval=3", "--lr_decay_iters=40"]
    cut = tmp_path / "cut"
    process = subprocess.Popen(_torchrun_command(cut, *schedule, "--max_iters=100000"), cwd=ROOT,
                               text=True, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (cut / "ckpt.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # past step 8's own checkpoint: the stop's comes at a later log step
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    at = torch.load(cut / "ckpt.pt", weights_only=True)["iter"]
    assert at > 8 and (at % 3 == 0 or at % 8 == 0), stderr[-3000:]   # a log step after the first
    assert stderr.count("stopping at the next log step, where every rank checkpoints it") == 1  # rank 0's
    assert f"interrupted at iteration {at}; the checkpoint of iteration {at} is kept" in stderr
    end = 8 * (at // 8 + 2)
    _torchrun(cut, *schedule, f"--max_iters={end}", "--resume")
    _torchrun(tmp_path / "whole", *schedule, f"--max_iters={end}")
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("cut", "whole"))
    assert a["iter"] == b["iter"] == end
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    timings = {"time", "tokens_per_sec", "mfu", "recluster_s"}
    logs = [[{k: v for k, v in json.loads(line).items() if k not in timings}
             for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("cut", "whole")]
    assert len(logs[1]) == end // 8 and logs[0] == logs[1]


def test_config_errors():
    with pytest.raises(ValueError, match="needs a MoE"):
        parse_config(TrainConfig, ["--expert_parallel=2", "--moe=dense"]).validate()
    with pytest.raises(ValueError, match="n_clusters .* divisible by expert_parallel"):
        parse_config(TrainConfig, ["--expert_parallel=4", "--n_clusters=2"]).validate()
    with pytest.raises(ValueError, match="needs hierarchical"):
        parse_config(TrainConfig, ["--expert_parallel=2", "--hierarchical=False"]).validate()
    with pytest.raises(ValueError, match="divisible by expert_parallel"):
        parse_config(TrainConfig, ["--expert_parallel=3", "--moe=topk", "--n_experts=4"]).validate()


def test_only_rank_0_looks_at_the_out_dir_claim(tmp_path, monkeypatch):
    """Under torchrun rank 0 alone claims the out_dir, so only it asks whether a run holds it:
    another rank asking while rank 0 holds its claim (or just as rank 0 takes it) would stop
    the run it is part of."""
    from checkpoint import OutDirClaim, UsageError, check_out_dir
    from train import TrainConfig
    cfg = TrainConfig(out_dir=str(tmp_path / "run"))
    with OutDirClaim(cfg.out_dir):  # rank 0's claim, held
        monkeypatch.setenv("RANK", "1")
        check_out_dir(cfg)
        for rank in ("0", None):
            if rank is None:
                monkeypatch.delenv("RANK")
            else:
                monkeypatch.setenv("RANK", rank)
            with pytest.raises(UsageError, match="in use by a training run still going"):
                check_out_dir(cfg)
