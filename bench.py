"""The paper's comparison, measured: `python bench.py` (GPU), `python bench.py --smoke` (CPU).

Owns: BenchConfig and running the sections (benchmarks/sections.py's table, name -> function;
`--sections=a,b` picks them), each at the size of `--preset` (train.PRESETS, small by default):
  layers     one FFN layer forward + backward: dense, top-k and clustered, grouped and loop,
             optionally compiled, beside a minimal top-k as the yardstick (benchmarks/layers.py)
  profile    the CUDA kernels that dominate each MoE layer's step (benchmarks/layers.py)
  models     whole models alone: parameters, train tokens/s in each step mode, MFU, peak
             memory, first clustering, inference tokens/s (benchmarks/sections.py)
  inference  dense, top-k, clustered, +INT4, +INT4+offload: prefill tokens/s and peak memory
  decode     generation (KV cache, CUDA graph) with INT4 and offload (benchmarks/decode.py)
  baseline   dense, top-k (each balancing) and clustered swept over the same learning rates,
             then each at its best with seeds (benchmarks/quality.py)
  quality    `seeds` trainings of each model on the same data, then held-out perplexity and
             load CV as mean +- std, the all-to-all volume expert parallelism would move,
             INT4 and offload perplexity
  paper      the paper's table at --preset=paper, 32K tokens a step: an lr sweep per model, each
             at its best with seeds, GLUE, INT4; built over several calls (benchmarks/paper.py)
  ablation, routing   the paper's ablations and the routing question (quality.GRIDS)
and the closing table that marks each of the paper's claims (benchmarks/claims.py).
Does not own: the models or training (model.py, train.py), plotting (benchmarks/plots.py).
"""
# cli first: it sets the CPU thread policy, which OpenMP reads once, as torch loads.
from cli import parse_config, run
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from train import PRESETS


@dataclass
class BenchConfig:
    # what to run:
    sections: str = "layers,models,inference,quality"  # names of SECTIONS, comma-separated
    preset: str = "small"          # the size every section uses (train.PRESETS; '' = train.py's
                                   # quick model)
    out_dir: str = "bench_out"     # bench.json, the PNGs and every training run go here
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    smoke: bool = False            # tiny sizes: the sections asked for, in seconds on a CPU
    seed: int = 0                  # weights, batches and clustering of every model
    # timing:
    tokens: int = 16384            # layers: tokens per timed forward + backward of one layer
    repeats: int = 20              # timed repeats (the median is kept)
    warmup: int = 5                # untimed repeats first
    compile_layers: bool = True    # layers: also time torch.compile'd layers (CUDA)
    batch_size: int = 16           # sequences per step (models, inference, trainings)
    model_blocks: str = ""         # models: block sizes, comma-separated ('' = the preset's)
    model_modes: str = "eager,compiled,graphed,compiled+graphed"  # models: how each train step
                                   # runs (eager | compiled | graphed: replayed from one CUDA
                                   # graph, train.py's --cuda_graph | compiled+graphed); CPU: eager
    inference_sizes: str = "small,paper"  # inference: the presets it measures
    offload_clusters: int = 4      # inference: the offload budget, in cluster entries
    decode_ckpt: str = ""          # decode: a train.py checkpoint, for prediction accuracy on text
    decode_repeats: int = 3        # decode: timed generations per row (median)
    # quality:
    dataset: str = "shakespeare"   # as train.py: a name, or folders/zips of .txt, comma-separated
    data_dir: str = "data"         # as train.py
    train_iters: int = 1000        # iterations per training
    eval_iters: int = 20           # validation batches per evaluation
    seeds: int = 3                 # trainings per model; quality is reported as mean +- std
    parallel: int = 1              # train.py processes at once on the one device (quality.py)
    routing_batches: int = 8       # held-out batches for load statistics and all-to-all volume
    sweep_iters: int = 0           # baseline: the lr sweep's budget (0 = train_iters)
    lrs: str = "3e-4,6e-4,1e-3"    # baseline: the learning rates every model is swept over
    models: str = ""               # baseline: which of its models, comma-separated ('' = all)
    ckpt_interval: int = 0         # baseline: train.py's (0: a checkpoint at every eval; large
                                   # models may need fewer: each holds weights and AdamW moments);
                                   # paper: rounded up to a multiple of its eval interval
    paper_size: str = "paper"      # paper: the size of its table (train.PRESETS)
    tokens_per_step: int = 32768   # paper, models: tokens per optimizer step (grad_accum makes it up)
    keep: str = "results/paper/runs"  # paper: where finished runs' small files are kept (and
                                   # looked up, so a later call trains only what is missing)
    max_runs: int = 0              # paper: start at most this many runs in this call (0 = all)
    paper_step: str = "compiled"   # paper, on CUDA: how its runs take a step (compiled |
                                   # compiled+graphed | graphed: train.py's --compile / --cuda_graph;
                                   # graphed runs are kept apart, in <size>-graphed / <size>-eager)
    glue_dir: str = ""             # GLUE root: grid sections also fine-tune each run on glue_task
    glue_task: str = "sst2"        # the GLUE task of the grid sections
    glue_max_examples: int = 10000  # training examples per fine-tuning (0 = all), 2 epochs

    def shrink(self):
        """--smoke: tiny sizes, so the default sections run in seconds on a CPU."""
        self.tokens, self.repeats, self.warmup, self.compile_layers = 256, 2, 1, False
        self.batch_size, self.train_iters, self.eval_iters = 2, 4, 1
        self.routing_batches, self.seeds = 1, 2
        return self


def markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(cfg: BenchConfig) -> dict:
    from benchmarks.claims import claims     # the sections are machinery, loaded here
    from benchmarks.sections import SECTIONS, TABLE_ROWS
    if cfg.smoke:
        cfg.shrink()
    if cfg.preset not in ("", *PRESETS):
        raise ValueError(f"preset must be '' or one of {sorted(PRESETS)}, got {cfg.preset!r}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python bench.py " + " ".join(sys.argv[1:])}
    results = {"env": env, "config": asdict(cfg)}
    sections = cfg.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; valid: {','.join(SECTIONS)}")

    def save():  # after every section, so a run cut short still leaves what it measured
        (out / "bench.json").write_text(json.dumps(results, indent=1))
    for name in sections:
        run, title, columns = SECTIONS[name]
        results[name] = run(cfg, device, out)
        if title is not None:
            rows = TABLE_ROWS.get(name, lambda r: r)(results[name])
            print(f"\n{title(cfg, env)}\n{markdown(rows, columns)}")
        save()
    results["claims"] = claims(results)
    try:
        from benchmarks import plots
        results["plots"] = plots.make_all(results, out)
    except ImportError as error:
        print(f"plots skipped: {error} (pip install matplotlib)")
    save()
    if results["claims"]:
        print(f"\nThe paper's claims, measured ({env['device']}, torch {env['torch']}, {env['date']}; "
              f"`{env['command']}`):")
        print(markdown(results["claims"], ["claim", "paper", "measured", "met"]))
    return results


if __name__ == "__main__":
    run(lambda argv: main(parse_config(BenchConfig, argv)), sys.argv[1:])
