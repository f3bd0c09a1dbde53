"""Does the way a run takes its step change what it learns? A kept run's config trained again
for its first evaluation interval in each step mode (eager, compiled, graphed, compiled +
graphed), same seed, data and lr schedule (the cosine still spans the kept run's steps), side by
side; prints each mode's validation perplexity beside the kept run's at that iteration.
Why: at the paper size, top-k finals replayed from a CUDA graph trained worse than compiled
ones from their first evaluation on (results/paper/README.md), and this tells which mode does it.
usage (CUDA): python -m results.paper.step_modes [run folder] [--iters=400] [--parallel=2]
    [--modes=eager,compiled,graphed,compiled+graphed] [--dataset=...] [--data_dir=...] [--out_dir=...]
"""
import json
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

from benchmarks.quality import read_log, run_grid
from train import TrainConfig

KEPT = "results/paper/runs/paper-32k-graphed/final/topk_lr0.001_s0"
MODES = {"eager": (False, False), "compiled": (True, False), "graphed": (False, True),
         "compiled+graphed": (True, True)}
FLAGS = {"iters": 400, "parallel": 2, "modes": ",".join(MODES), "dataset": "", "data_dir": "",
         "out_dir": "/tmp/step_modes"}


def parse(argv: list[str]) -> tuple[Path, dict]:
    """[run folder] [--flag=value ...] -> (folder, FLAGS with the values given); bad input exits
    with a one-line error."""
    folder, flags = Path(KEPT), dict(FLAGS)
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--"):
            folder = Path(arg)
        elif key not in FLAGS or not value:
            sys.exit(f"error: {arg!r}: flags are {', '.join(f'--{k}=' for k in FLAGS)}")
        else:
            flags[key] = int(value) if isinstance(FLAGS[key], int) else value
    unknown = set(flags["modes"].split(",")) - set(MODES)
    if unknown:
        sys.exit(f"error: unknown modes {sorted(unknown)}; valid: {', '.join(MODES)}")
    if not (folder / "config.json").exists():
        sys.exit(f"error: {folder} holds no config.json (a kept run's folder)")
    return folder, flags


def configs(kept: dict, flags: dict) -> list[TrainConfig]:
    """One config per mode: the kept run's, cut to its first `iters` steps."""
    names = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in kept["config"].items() if k in names})
    iters = flags["iters"]
    base = replace(base, max_iters=iters, lr_decay_iters=base.lr_decay_iters or base.max_iters,
                   eval_interval=iters, ckpt_interval=iters, resume=False, overwrite=False,
                   final_ckpt="weights", dataset=flags["dataset"] or base.dataset,
                   data_dir=flags["data_dir"] or base.data_dir)
    return [replace(base, compile=MODES[m][0], cuda_graph=MODES[m][1],
                    out_dir=str(Path(flags["out_dir"]) / m.replace("+", "_")))
            for m in flags["modes"].split(",")]


def main(argv: list[str]) -> None:
    folder, flags = parse(argv)
    kept = json.loads((folder / "config.json").read_text())
    kept_log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    runs = configs(kept, flags)
    run_grid(runs, parallel=flags["parallel"])
    at = {r["iter"]: r["val_ppl"] for r in kept_log}.get(flags["iters"])
    print(f"\nval perplexity after {flags['iters']} steps, {folder} retrained (seed {runs[0].seed}, "
          f"lr {runs[0].lr:g}, schedule over {runs[0].lr_decay_iters} steps); the kept run "
          f"(compile {kept['config']['compile']}, cuda_graph {kept['config']['cuda_graph']}): "
          + (f"{at:.1f}" if at else "no evaluation there"))
    print("| mode | compile | cuda_graph | val ppl | vs kept run |\n| --- | --- | --- | --- | --- |")
    for mode, tc in zip(flags["modes"].split(","), runs):
        ppl = read_log(tc)[-1]["val_ppl"]
        gap = f"{100 * (ppl / at - 1):+.1f}%" if at and math.isfinite(ppl) else ""
        print(f"| {mode} | {tc.compile} | {tc.cuda_graph} | {ppl:.1f} | {gap} |")


if __name__ == "__main__":
    main(sys.argv[1:])
