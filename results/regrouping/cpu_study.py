"""Dynamic clustering on the quick model, on a CPU: which views move experts, what a move
costs, and what the loss rule keeps. Usage: python results/regrouping/cpu_study.py <out.json>

The quick run of `python train.py` (4 layers, d=128, E=8 in G=2, rank 8, 250 steps of 8 x 128
tokens of Tiny Shakespeare), first clustering at step 100, then a recluster every 25 steps
(5 events), validation on 20 batches every 50 steps; two seeds per variant. Every recluster
event is kept as logged (experts moved, each layer's rank of its grouping among all 35
balanced splits, margin, gain, the loss rule's numbers, the shock)."""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

VARIANTS = {"static": dict(cluster_mode="static"), "dynamic (alpha 0.7, the default)": {},
            "alpha 0.3": dict(alpha=0.3), "alpha 0 (router scores only)": dict(alpha=0.0),
            "alpha 0, loss rule": dict(alpha=0.0, regroup_rule="loss")}
SEEDS = (1337, 1338)

out = {"command": "python results/regrouping/cpu_study.py", "runs": {}}
with tempfile.TemporaryDirectory() as tmp:
    for name, extra in VARIANTS.items():
        for seed in SEEDS:
            folder = Path(tmp) / f"{len(out['runs'])}"
            cfg = train.TrainConfig(**extra, seed=seed, recluster_interval=25, eval_interval=50,
                                    eval_iters=20, sample_tokens=0, device="cpu",
                                    out_dir=str(folder), data_dir=str(Path(tmp) / "data"))
            train.train(cfg)
            read = lambda f: [json.loads(line) for line in (folder / f).read_text().splitlines()]  # noqa: E731
            events = [{k: e[k] for k in ("iter", "moved", "gain", "skipped", "rank", "of", "margin", "rule",
                                        "shock")} for e in read("reclusters.jsonl")]
            out["runs"][f"{name}, seed {seed}"] = {"variant": name, "seed": seed, "events": events,
                                                  "val_loss": [r["val_loss"] for r in read("log.jsonl")]}
            Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
