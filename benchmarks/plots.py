"""PNG plots of a bench.py run (matplotlib is optional: bench.py skips plots without it).

Owns: val-loss curves of the trained variants, expert-load heatmaps (layer x expert) for
top-k vs clustered, and cluster membership over reclusterings. Reads bench.py's results
dict only; computes nothing new.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(runs: dict, path: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        ax.plot([r["iter"] for r in run["log"]], [r["val_loss"] for r in run["log"]], "o-", label=name)
    ax.set(xlabel="iteration", ylabel="val loss", title="Validation loss, same data and seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_heatmaps(runs: dict, path: Path):
    names = [n for n in ("topk", "clustered") if n in runs and "loads" in runs[n]]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        loads = runs[name]["loads"]
        fractions = [[v / max(sum(row), 1) for v in row] for row in loads]
        image = ax.imshow(fractions, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert (original id)", ylabel="layer",
               title=f"{name}: token share per expert (CV {runs[name]['load_cv']:.3f})")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def membership(reclusters: list[dict], path: Path, layer: int = 0):
    """Cluster of each original expert (rows) at each recluster (columns), one layer."""
    grid = [[event["membership"][layer][e] for event in reclusters]
            for e in range(len(reclusters[0]["membership"][layer]))]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(reclusters), 5))
    ax.imshow(grid, aspect="auto", cmap="tab10", interpolation="nearest")
    ax.set_xticks(range(len(reclusters)), [str(e["iter"]) for e in reclusters])
    ax.set(xlabel="recluster at iteration", ylabel="expert", title=f"cluster membership, layer {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_all(results: dict, out: Path) -> list[str]:
    runs = results.get("quality", {}).get("runs", {})
    made = []
    if runs:
        loss_curves(runs, out / "val_loss.png")
        load_heatmaps(runs, out / "expert_load.png")
        made += ["val_loss.png", "expert_load.png"]
        if runs.get("clustered", {}).get("reclusters"):
            membership(runs["clustered"]["reclusters"], out / "membership.png")
            made.append("membership.png")
    return made
