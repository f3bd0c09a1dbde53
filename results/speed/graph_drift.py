"""Where the graphed clustered step leaves the eager one: the tiny clustered run of
tests/test_train_graph.py trained eagerly twice and once with --cuda_graph, every parameter,
buffer and gradient copied after every step; prints, per step, the tensors whose values
differ between the runs and by how much.
usage (CUDA, from the repository root): python -m results.speed.graph_drift [out_dir] [extra train flags...]
"""
import itertools
import sys

import torch

import train
from train import TrainConfig, parse_config

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--ffn_hidden=64", "--n_experts=8",
        "--n_clusters=2", "--rank=4", "--block_size=64", "--batch_size=4", "--eval_iters=2",
        "--device=cuda", "--warmup_iters=2", "--lr=3e-3", "--max_iters=12", "--eval_interval=6",
        "--burn_in=4", "--recluster_interval=4", "--grad_accum=2", "--balance=bias",
        "--bias_rate=0.01", "--moe=clustered"]


def run(out: str, *flags) -> list[dict]:
    """Train, recording the whole model state after every optimizer step."""
    states, make = [], train.make_step

    def recording(runner, model, *args, **kwargs):
        step = make(runner, model, *args, **kwargs)

        def wrapped(batches):
            step(batches)
            torch.cuda.synchronize()
            state = {n: t.detach().float().cpu().clone()
                     for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
            state.update({n + ".grad": p.grad.detach().float().cpu().clone()
                          for n, p in model.named_parameters() if p.grad is not None})
            states.append(state)
        return wrapped
    train.make_step = recording
    try:
        train.train(parse_config(TrainConfig, TINY + [f"--out_dir={out}", "--overwrite", *flags]))
    finally:
        train.make_step = make
    return states


def compare(name: str, a: list[dict], b: list[dict]) -> None:
    print(f"== {name}")
    for it, (sa, sb) in enumerate(zip(a, b)):
        diffs = sorted(((float((sa[k] - sb[k]).abs().max()) if sa[k].shape == sb[k].shape else float("inf"), k)
                        for k in sa.keys() & sb.keys()), reverse=True)
        diffs = [(d, k) for d, k in diffs if d > 0]
        only = sorted(sa.keys() ^ sb.keys())
        print(f"step {it}: {len(diffs)} differ" + (f"; only in one: {only[:4]}" if only else "")
              + "".join(f"\n   {k}: {d:.3g}" for d, k in diffs[:8]))


if __name__ == "__main__":
    root, extra = (sys.argv[1] if len(sys.argv) > 1 else "/tmp/drift"), sys.argv[2:]
    eager = run(f"{root}/eager", *extra)
    again = run(f"{root}/again", *extra)
    graphed = run(f"{root}/graph", "--cuda_graph", *extra)
    compare("eager vs eager", eager, again)
    compare("eager vs graphed", eager, graphed)
