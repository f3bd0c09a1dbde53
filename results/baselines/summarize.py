"""Tables from the raw run folders beside this file: `python results/baselines/summarize.py
results/baselines/small_h200`. Each folder holds one train.py run (config.json: its flags and
data; log.jsonl: every eval; train_out.txt: its printed lines). Mean and sample std over
seeds; a gap is "beyond noise" past two standard errors of the difference (bench_quality)."""
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def runs(root: Path):
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg = json.loads((folder / "config.json").read_text())["config"]
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        out = (folder / "train_out.txt").read_text()
        end = ("diverged: " + out.split("non-finite loss nan at iteration ")[1].split(";")[0]
               if "non-finite" in out else "" if log[-1]["iter"] == cfg["max_iters"]
               else f"stopped at {log[-1]['iter']} (last eval)")
        name = folder.name.rsplit("__lr", 1)[0]
        yield name, cfg, log, end


def main(root: Path):
    sweep, final = [], defaultdict(list)
    for name, cfg, log, end in runs(root):
        tokens = cfg["max_iters"] * cfg["batch_size"] * cfg["block_size"]
        last = log[-1]
        row = (name, cfg["lr"], tokens, cfg["seed"], last["iter"], last["val_ppl"], last["load_cv"], end)
        (sweep.append(row) if cfg["max_iters"] == 2000 else final[name, cfg["lr"], tokens].append(row))
    print("| model | lr | tokens | val ppl (seed 0) | train load CV | note |\n| --- | --- | --- | --- | --- | --- |")
    for name, lr, tokens, seed, it, ppl, cv, end in sweep:
        shown = f"{ppl:.1f}" if not end else f"({ppl:.1f} at {it})"
        print(f"| {name} | {lr:g} | {tokens / 1e6:.1f}M | {shown} | {cv:.3f} | {end} |")
    print("\n| model | lr | tokens | seeds | val ppl mean ± std | per seed | train load CV | vs dense | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    dense = next((rows for (name, _, _), rows in final.items() if name == "dense"), [])
    dense_ppl = [r[5] for r in dense if not r[7]]
    for (name, lr, tokens), rows in final.items():
        done = [r for r in rows if not r[7]]
        ppl = [r[5] for r in done]
        mean = statistics.fmean(ppl) if ppl else math.nan
        std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        notes = "; ".join(f"seed {r[3]}: {r[7]}" for r in rows if r[7])
        versus = ""
        if ppl and dense_ppl and name != "dense":
            se = math.sqrt(std ** 2 / len(ppl) + statistics.stdev(dense_ppl) ** 2 / len(dense_ppl))
            gap = mean / statistics.fmean(dense_ppl) - 1
            versus = f"{gap:+.1%} ({'beyond' if abs(mean - statistics.fmean(dense_ppl)) > 2 * se else 'within'} noise)"
        print(f"| {name} | {lr:g} | {tokens / 1e6:.1f}M | {len(done)} of {len(rows)} | "
              + (f"{mean:.1f} ± {std:.1f}" if ppl else "none finished") + f" | "
              f"{', '.join(f'{p:.1f}' for p in ppl)} | "
              + (f"{statistics.fmean(r[6] for r in done):.3f}" if done else "") + f" | {versus} | {notes} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
