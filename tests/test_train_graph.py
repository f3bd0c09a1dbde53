"""fast/train_graph.py: on CUDA the graphed train step trains as the eager one (losses and
parameters) for dense, top-k and clustered models (across a first clustering and two
reclusters), eager or compiled kernels, and captures once per stretch between resets, a
compiled model without compiling again."""
import json

import pytest
import torch

import train
from fast.train_graph import GraphedTrainStep
from train import TrainConfig, parse_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--ffn_hidden=64", "--n_experts=8",
        "--n_clusters=2", "--rank=4", "--block_size=64", "--batch_size=4", "--eval_iters=2",
        "--device=cuda", "--warmup_iters=2", "--lr=3e-3", "--max_iters=14", "--eval_interval=7",
        "--burn_in=4", "--recluster_interval=4", "--grad_accum=2", "--balance=bias",
        "--bias_rate=0.01"]


def _run(tmp_path, name, *extra):
    cfg = parse_config(TrainConfig, TINY + [f"--out_dir={tmp_path / name}",
                                           f"--data_dir={tmp_path / 'data'}", *extra])
    train.train(cfg)
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return log, torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]


@cuda
@pytest.mark.parametrize("moe,compile,impl", [("dense", False, "auto"), ("topk", False, "auto"),
                                              ("clustered", False, "auto"), ("clustered", False, "triton"),
                                              ("topk", True, "auto"), ("clustered", True, "auto")])
def test_graphed_step_trains_as_the_eager_one(tmp_path, moe, compile, impl):
    # clustered: burn_in 4 and recluster_interval 4 in 14 steps are a first clustering (new
    # parameters, a new optimizer) and two reclusters, each followed by a fresh capture.
    if impl == "triton":
        from fast.triton_combine import combine_available
        if not combine_available("cuda"):
            pytest.skip("the Triton combine needs Triton")
    extra = [f"--moe={moe}", f"--moe_impl={impl}"] + (["--compile"] if compile else [])
    eager_log, eager = _run(tmp_path, "eager", *extra)
    graph_log, graphed = _run(tmp_path, "graph", *extra, "--cuda_graph")
    assert len(eager_log) == len(graph_log) == 2
    if moe == "clustered":
        assert len((tmp_path / "graph" / "reclusters.jsonl").read_text().splitlines()) == 3
    # Eager kernels replay bit for bit. Compiled ones need not: the capture compiles again with
    # autocast's cast cache off, inductor may fuse those bf16 kernels otherwise, and a token
    # near a routing tie then picks another expert. So compiled runs are held to their losses,
    # at 1e-4: tight enough to catch a stale gradient joining a step after a recluster.
    for a, b in zip(eager_log, graph_log):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4 if compile else 1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4 if compile else 1e-5)
    assert eager.keys() == graphed.keys()
    for key in ([] if compile else eager):
        torch.testing.assert_close(graphed[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)
    if moe != "dense":  # the balancing biases moved inside the graph too
        assert graphed["blocks.0.ffn.expert_bias"].any()


@cuda
def test_a_compiled_model_is_captured_without_compiling_again():
    """bench's models section feeds views of one token tensor, whose strides the capture's
    contiguous copies lack: warm-up and capture read the same copies, so the compiled model
    compiles once, in warm-up (compiling inside a capture fails)."""
    from benchmarks.layers import train_step_fn
    tc = parse_config(TrainConfig, TINY + ["--moe=topk", "--compile", "--cuda_graph"])
    step, model, _ = train_step_fn(tc, torch.device("cuda"))
    before = [p.detach().clone() for p in model.parameters()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):  # two warm-up steps, the capture, a replay
            step()
    torch.cuda.synchronize()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_what_a_graph_cannot_hold_is_refused():
    from fast.train_graph import config_rules
    failing = lambda *flags: [m for ok, m in config_rules(parse_config(TrainConfig, list(flags)))  # noqa: E731
                              if not ok]
    assert any("group sizes on the host" in m for m in failing("--moe=topk", "--moe_impl=loop", "--cuda_graph"))
    if not torch.cuda.is_available():
        assert any("needs CUDA" in m for m in failing("--moe=clustered", "--cuda_graph"))


@cuda
def test_captures_once_per_reset_and_replays_new_batches():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, device="cuda"))
    seen = []

    def step(batches):
        (x, y), = batches
        loss = ((x * w).sum() - y.sum()) ** 2
        loss.backward()
        with torch.no_grad():
            w.sub_(0.01 * w.grad)
            seen.append(loss.detach())
    model = torch.nn.Module()
    model.w = w
    graphed = GraphedTrainStep(step, model, warmup=1)
    for i in range(4):
        x = torch.full((4,), float(i), device="cuda")
        graphed([(x, x)])
    assert graphed.captures == 1
    graphed.reset()
    graphed([(x, x)])
    graphed([(x, x)])
    assert graphed.captures == 2
    # the replays saw each call's batch: a reference run of the same updates, eagerly
    torch.manual_seed(0)
    ref = torch.randn(4, device="cuda")
    for i in list(range(4)) + [3, 3]:
        x = torch.full((4,), float(i), device="cuda")
        grad = 2 * ((x * ref).sum() - x.sum()) * x
        ref = ref - 0.01 * grad
    torch.testing.assert_close(w.detach(), ref)
