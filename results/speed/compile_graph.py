"""Whether --compile and a CUDA graph of the whole step go together: the tiny runs of
results/speed/graph_drift.py (dense, top-k, clustered), each eager, compiled, compiled inside
fast/train_graph's graph, and eager kernels in that graph; prints whether each ran and how far
its logged losses are from eager.
Each run has its own process: a failed capture can leave the CUDA generator capturing.
usage (CUDA, from the repository root): python -m results.speed.compile_graph [out_dir]
"""
import json
import subprocess
import sys
import traceback
from pathlib import Path

from results.speed.graph_drift import run

MODES = {"compiled": ["--compile"], "compiled+graph": ["--compile", "--cuda_graph"], "graph": ["--cuda_graph"]}


def one(root: Path, moe: str, mode: str) -> None:
    out = root / f"{moe}_{mode}"
    try:
        run(str(out), f"--moe={moe}", *MODES.get(mode, []))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [(r["train_loss"], r["val_loss"]) for r in log]
        eager = root / f"{moe}_eager" / "losses.json"
        if mode == "eager":
            eager.write_text(json.dumps(losses))
        gap = max(abs(a - b) for ea, ma in zip(json.loads(eager.read_text()), losses) for a, b in zip(ea, ma))
        print(f"{moe:9s} {mode:16s} ran; losses {losses}; largest gap to eager {gap:.3g}", flush=True)
    except Exception as error:  # a failed capture is a result here
        where = traceback.extract_tb(error.__traceback__)[-1]
        print(f"{moe:9s} {mode:16s} FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]} "
              f"(at {Path(where.filename).name}:{where.lineno})", flush=True)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/compile_graph")
    if len(sys.argv) > 3:
        one(root, sys.argv[2], sys.argv[3])
    else:
        for moe in ("dense", "topk", "clustered"):
            for mode in ("eager", *MODES):
                subprocess.run([sys.executable, "-m", "results.speed.compile_graph", str(root), moe, mode], stderr=subprocess.DEVNULL)
