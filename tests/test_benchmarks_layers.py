"""benchmarks/layers.py: the minimal top-k yardstick computes what our top-k layer computes;
results/speed/step_profile.py buckets a whole train step built by layers.train_step_fn;
results/speed/grouped_layout.py casts the expert weights column-major to the same values."""
from pathlib import Path

import torch

from benchmarks.layers import MinimalTopK
from model import GPTConfig, init_weights
from moe import MoE


def test_minimal_topk_equals_our_topk_layer():
    torch.manual_seed(0)
    layer = MoE(GPTConfig(moe="topk", n_embd=16, ffn_hidden=24, n_experts=6, top_k=2))
    init_weights(layer, n_layer=1)
    minimal = MinimalTopK(6, 16, 24, 2, "cpu")
    with torch.no_grad():
        minimal.router.weight.copy_(layer.router.weight)
        minimal.w1.copy_(layer.bank.w1)
        minimal.w2.copy_(layer.bank.w2)
    x = torch.randn(2, 9, 16, requires_grad=True)
    ours, mine = layer(x)[0], minimal(x)[0]
    torch.testing.assert_close(mine, ours)
    grad = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, [x, layer.bank.w1], grad)
    g_mine = torch.autograd.grad(mine, [x, minimal.w1], grad)
    for a, b in zip(g_ours, g_mine):
        torch.testing.assert_close(a, b)


def test_step_profile_buckets_a_whole_train_step_by_kernel_kind():
    from dataclasses import replace

    from results.speed.step_profile import bucket, profile_step
    from train import TrainConfig
    assert bucket("aten::_grouped_mm") == "grouped matmul" and bucket("aten::addmm") == "matmul"
    assert bucket("aten::sort") == "sort, top-k, cumsum" and bucket("aten::index_select") == "gather, scatter, index"
    assert bucket("something new") == "other"
    tiny = TrainConfig(n_layer=1, n_head=2, n_embd=16, ffn_hidden=32, block_size=8, batch_size=2,
                       n_experts=4, top_k=2, vocab_size=64, device="cpu")
    (dense, _, _), (topk, _, ops) = (profile_step(replace(tiny, moe=moe), torch.device("cpu"), steps=1)
                                     for moe in ("dense", "topk"))
    assert any(name.startswith("aten::sort [[") for name in ops)  # top-k's sort, with its shapes
    assert dense["matmul"] > 0 and dense["optimizer (AdamW, clip)"] > 0
    assert "sort, top-k, cumsum" not in dense and topk["sort, top-k, cumsum"] > 0  # top-k's sort of slots


def test_step_profile_counts_each_cuda_kernel_once():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from results.speed.step_profile import bucket_times, operator_times
    # An operator and the kernel it launched both report the kernel's 4 ms as self device time.
    op = SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=4000,
                         self_cpu_time_total=50, input_shapes=[[8, 4], [4, 2]])
    kernel = SimpleNamespace(key="nvjet_tst_128x256", device_type=DeviceType.CUDA, self_device_time_total=4000,
                             self_cpu_time_total=0)
    # AdamW's step is a record_function range, which the GPU's timeline shows as well.
    annotation = SimpleNamespace(key="Optimizer.step#AdamW.step", device_type=DeviceType.CUDA,
                                 self_device_time_total=4000, self_cpu_time_total=0, is_user_annotation=True)
    assert bucket_times([op, kernel, annotation], cuda=True, steps=2) == {"matmul": 2.0}
    assert bucket_times([op, kernel], cuda=False, steps=2) == {"matmul": 0.025}
    cpu_range = SimpleNamespace(**{**vars(annotation), "device_type": DeviceType.CPU, "input_shapes": []})
    assert operator_times([op, kernel, annotation, cpu_range], cuda=True, steps=2) == \
        {"aten::mm [[8, 4], [4, 2]]": 2.0}


def test_step_profile_refuses_an_unknown_flag_in_one_line():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "results.speed.step_profile", "paper", "topk", "--graph"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "error: unknown flags ['graph']; valid: --compile --cuda_graph --steps= --tokens_per_step= --batch_size="]


def test_grouped_layout_casts_the_same_values_column_major_and_prints_its_table(capsys):
    from results.speed.grouped_layout import layouts, main
    w = torch.randn(3, 4, 6)
    row, col = (cast() for cast in layouts(w, torch.bfloat16).values())
    assert torch.equal(row, col) and row.stride() == (24, 6, 1) and col.stride() == (24, 1, 4)
    main("small", 64, 1)  # on a CPU: tiny shapes, each layout checked against the stored one
    names = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[-3:]]
    assert names == ["| dense MLP, equal FLOPs", "| grouped, row-major (as stored)", "| grouped, column-major"]
