"""Where the graphed step leaves the eager one: a run trained eagerly twice and once with
--cuda_graph, every parameter, buffer and gradient recorded after every step; prints, per step,
the tensors whose values differ between the runs and by how much. Eager against eager is the
noise floor (atomic adds make a large model's eager runs differ too).
By default the tiny clustered run of tests/test_train_graph.py, recorded whole. Flags naming a
--preset replace it (give the run's every other flag too); such a model is recorded as each
tensor's float64 sum and sum of magnitudes, compared relatively (a sum can hide a change that
cancels; a difference it shows is real).
usage (CUDA, from the repository root): python -m results.speed.graph_drift [out_dir] [train flags...]
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


def fingerprint(tensors: dict) -> dict:
    """name -> (sum, sum of magnitudes) in float64: two numbers a tensor, one copy to the host."""
    names = list(tensors)
    sums = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in tensors.values()])
    return dict(zip(names, sums.cpu()))


def recorded_whole(flags) -> bool:
    """Whether a run is recorded whole: the tiny default is; a --preset's model is fingerprinted."""
    return not any(f.startswith("--preset=") for f in flags)


def run(out: str, *flags) -> list[dict]:
    """Train, recording the model state after every optimizer step (whole, or fingerprinted
    when the flags name a --preset)."""
    states, make, complete = [], train.make_step, recorded_whole(flags)

    def recording(runner, model, *args, **kwargs):
        step = make(runner, model, *args, **kwargs)

        def wrapped(batches):
            step(batches)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            state = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
            state.update({n + ".grad": p.grad for n, p in model.named_parameters() if p.grad is not None})
            state = {n: t.detach() for n, t in state.items()}
            states.append({n: t.float().cpu().clone() for n, t in state.items()} if complete else fingerprint(state))
        return wrapped
    train.make_step = recording
    try:
        base = TINY if complete else []
        train.train(parse_config(TrainConfig, base + [f"--out_dir={out}", "--overwrite", *flags], train.PRESETS))
    finally:
        train.make_step = make
    return states


def gap(a: torch.Tensor, b: torch.Tensor, whole: bool) -> float:
    """Largest absolute difference (whole tensors), or the fingerprints' relative one."""
    if a.shape != b.shape:
        return float("inf")
    if whole:
        return float((a - b).abs().max())
    return float((a - b).abs().max() / a[1].abs().clamp(min=1e-30))


def compare(name: str, a: list[dict], b: list[dict], whole: bool = True) -> None:
    print(f"== {name}" + ("" if whole else " (relative differences of float64 sums)"))
    for it, (sa, sb) in enumerate(zip(a, b)):
        diffs = sorted(((gap(sa[k], sb[k], whole), k) for k in sa.keys() & sb.keys()), reverse=True)
        diffs = [(d, k) for d, k in diffs if d > 0]
        only = sorted(sa.keys() ^ sb.keys())
        print(f"step {it}: {len(diffs)} differ" + (f"; only in one: {only[:4]}" if only else "")
              + "".join(f"\n   {k}: {d:.3g}" for d, k in diffs[:8]))


if __name__ == "__main__":
    root, extra = (sys.argv[1] if len(sys.argv) > 1 else "/tmp/drift"), sys.argv[2:]
    eager = run(f"{root}/eager", *extra)
    again = run(f"{root}/again", *extra)
    graphed = run(f"{root}/graph", "--cuda_graph", *extra)
    compare("eager vs eager", eager, again, recorded_whole(extra))
    compare("eager vs graphed", eager, graphed, recorded_whole(extra))
