"""The paper's headline claims against what a bench run measured: met, not met, or within
noise (a quality gap within two standard errors over seeds). Our own goals where the paper
states none are marked "(ours: ...)"."""
import math

from benchmarks.quality import beyond_noise


def _verdict(met: bool, noisy: bool = False) -> str:
    return "within noise" if noisy else ("met" if met else "not met")


def claims(results: dict) -> list[dict]:
    """Each of the paper's headline claims against what this run measured. A quality claim
    whose gap is within two standard errors over seeds says "within noise"."""
    rows = []

    def add(claim, paper, value, verdict):
        rows.append({"claim": claim, "paper": paper, "measured": value, "met": verdict})
    quality = results.get("quality", {})
    runs = quality.get("runs", {})
    top, clu = runs.get("topk"), runs.get("clustered")
    if top and clu:
        n = clu["n_seeds"]
        ratio = clu["total_params"] / top["total_params"]
        add("total parameters vs top-k", "about 80% fewer", f"{1 - ratio:.0%} fewer ({ratio:.2f}x)",
            _verdict(ratio <= 0.25))
        ratio = clu["expert_params"] / top["expert_params"]
        add("expert parameters vs top-k", "up to 5x fewer", f"{1 / ratio:.2f}x fewer", _verdict(1 / ratio >= 4))
        if quality.get("parallel", 1) <= 1:  # parallel runs share the GPU: their speed means nothing
            speed = clu["train_tokens_per_sec_mean"] / top["train_tokens_per_sec_mean"]
            add("train throughput vs top-k (compiled, steady state)", "+10-20%", f"{speed:.2f}x",
                _verdict(speed >= 1.1))
        var = top["load_variance_mean"] / max(clu["load_variance_mean"], 1e-12)
        add("expert-load variance vs top-k (held-out)", ">3x lower",
            f"{var:.2f}x lower (CV {top['load_cv_mean']:.3f} -> {clu['load_cv_mean']:.3f}, n={n})",
            _verdict(var >= 3))
        gap = clu["val_ppl_mean"] / top["val_ppl_mean"] - 1
        noisy = not beyond_noise(clu["val_ppl_seeds"], top["val_ppl_seeds"])
        add("val perplexity vs top-k", "matches",
            f"{gap:+.1%} ({top['val_ppl_mean']:.1f} +- {top['val_ppl_std']:.1f} -> "
            f"{clu['val_ppl_mean']:.1f} +- {clu['val_ppl_std']:.1f}, n={n})",
            _verdict(abs(gap) <= 0.03, noisy))
        add("routing candidates per token", "E -> G + E/G", f"{top['routing_candidates']} -> "
            f"{clu['routing_candidates']}", _verdict(clu["routing_candidates"] < top["routing_candidates"]))
        add("devices per token under expert parallelism", "k -> 1", f"{top['devices_per_token']:.2f} -> "
            f"{clu['devices_per_token']:.2f}", _verdict(clu["devices_per_token"] < top["devices_per_token"]))
        add("INT4 perplexity change", "small", f"{clu['int4_ppl_change']:+.2%}",
            _verdict(abs(clu["int4_ppl_change"]) <= 0.01))
    models = {(r["model"], r["block_size"], r["mode"]): r for r in results.get("models", [])}
    row_modes = list(dict.fromkeys(mode for _, _, mode in models))
    for (name, block, mode), row in models.items():
        top, dense = models.get(("topk", block, mode)), models.get(("dense", block, mode))
        how = f"block {block}, {row['mode']}"
        paper = results.get("config", {}).get("preset") == "paper"
        goal = 1.15 if paper else 1.0     # ours: the paper's +10-20% at its size, parity below it
        if name.startswith("clustered") and top:
            add(f"train throughput vs top-k ({name}, {how})", f"+10-20% (ours: >= {goal}x)",
                f"{row['speed_vs_topk']:.2f}x", _verdict(row["speed_vs_topk"] >= goal))
            if mode == row_modes[0]:  # inference is timed once per model
                add(f"inference (prefill) vs top-k ({name}, block {block})", "faster",
                    f"{row['infer_vs_topk']:.2f}x", _verdict(row["infer_vs_topk"] >= 1.0))
        if name == "topk" and dense:
            speed = row["train_tokens_per_sec"] / dense["train_tokens_per_sec"]
            add(f"top-k vs dense of equal active width ({how})", "(ours: >= 0.8x)", f"{speed:.2f}x",
                _verdict(speed >= 0.8))
        if name == "dense" and row.get("mfu") is not None:
            add(f"dense model FLOPs utilization ({how})", "(ours: >= 45%)", f"{row['mfu']:.1%}",
                _verdict(row["mfu"] >= 0.45))
        if name == "clustered" and "first_recluster_s" in row and paper and mode == row_modes[0]:
            add(f"first clustering, wall time (block {block})", "(ours: <= 3 s at the paper's size)",
                f"{row['first_recluster_s']:.2f} s", _verdict(row["first_recluster_s"] <= 3))
    rows += paper_claims(results.get("paper", []))
    infer = {(r["size"], r["model"]): r for r in results.get("inference", [])}
    for size in ("default", "large"):
        off, top_r, den_r = (infer.get((size, m)) for m in ("clustered+int4+offload", "topk", "dense"))
        if off and top_r and den_r and not math.isnan(off["peak_mib"]):
            vs_top, vs_dense = off["peak_mib"] / top_r["peak_mib"], off["peak_mib"] / den_r["peak_mib"]
            add(f"inference peak memory vs top-k ({size})", "about 50% lower", f"{vs_top:.2f}x",
                _verdict(vs_top <= 0.5))
            add(f"inference peak memory vs dense ({size})", "close to dense", f"{vs_dense:.2f}x",
                _verdict(vs_dense <= 1.1))
    return rows


# Each section: (function(cfg, device, out) -> result, title(cfg, env), table columns).


def paper_claims(table: list[dict]) -> list[dict]:
    """The paper's claims (and our goals) against the paper section's final rows. A claim whose
    runs are not all kept yet says "not yet measured"; one this setting cannot test says so."""
    rows = []
    final = {r["model"]: r["numbers"] for r in table if r.get("phase") == "final" and "numbers" in r}
    if not final:
        return rows
    dense, top, clu = (final.get(m) for m in ("dense", "topk", "clustered"))
    mean = lambda values: sum(values) / len(values)  # noqa: E731

    def add(claim, paper, measured, verdict):
        rows.append({"claim": claim, "paper": paper, "measured": measured, "met": verdict})

    def gap(a, b, goal):  # perplexity of a vs b; met if a is at most `goal` above b, beyond noise
        change = mean(a["val_ppl"]) / mean(b["val_ppl"]) - 1
        n = min(len(a["val_ppl"]), len(b["val_ppl"]))
        noisy = n > 1 and not beyond_noise(a["val_ppl"], b["val_ppl"])
        verdict = ("within noise" if noisy and change > goal else "met") if change <= goal or noisy \
            else "not met"
        return f"{change:+.1%} ({mean(a['val_ppl']):.1f} vs {mean(b['val_ppl']):.1f}, n={n})", verdict
    missing = "not yet measured"
    if top and dense:
        measured, verdict = gap(top, dense, 0.0)
        add("top-k beats dense (val perplexity)", "(ours: beyond noise)", measured,
            "met" if verdict == "met" and beyond_noise(top["val_ppl"], dense["val_ppl"]) else
            ("within noise" if not beyond_noise(top["val_ppl"], dense["val_ppl"]) else "not met"))
    if top and clu:
        add("val perplexity vs top-k", "+9% (26.8 vs 24.5); ours: within 5%", *gap(clu, top, 0.05))
        ratio = clu["total_params"] / top["total_params"]
        add("total parameters vs top-k", "0.21x (188M vs 875M); ours: <= 0.35x", f"{ratio:.2f}x",
            _verdict(ratio <= 0.35))
        gpus = sorted(set(top["speed"]) & set(clu["speed"]))
        add("train throughput vs top-k (alone, same GPU)", "+18% (8.5k vs 7.2k tok/s)",
            "; ".join(f"{clu['speed'][g]['train_tokens_per_sec'] / top['speed'][g]['train_tokens_per_sec']:.2f}x "
                      f"({g})" for g in gpus) or missing,
            _verdict(all(clu["speed"][g]["train_tokens_per_sec"] >= 1.1 * top["speed"][g]["train_tokens_per_sec"]
                         for g in gpus)) if gpus else missing)
        add("train peak memory vs top-k (alone, same GPU)", "0.58x (19.2 vs 33.1 GB)",
            "; ".join(f"{clu['speed'][g]['train_peak_mib'] / top['speed'][g]['train_peak_mib']:.2f}x ({g})"
                      for g in gpus) or missing,
            _verdict(all(clu["speed"][g]["train_peak_mib"] <= 0.6 * top["speed"][g]["train_peak_mib"]
                         for g in gpus)) if gpus else missing)
        if top["heldout_load_cv"] and clu["heldout_load_cv"]:
            cv_top, cv_clu = mean(top["heldout_load_cv"]), mean(clu["heldout_load_cv"])
            add("held-out load CV vs top-k", "3x lower (0.12 vs 0.36); ours: <= 0.15 each",
                f"{cv_clu:.3f} vs {cv_top:.3f}", _verdict(cv_clu <= 0.15 and cv_top <= 0.15))
    if clu and clu["val_loss_int4"]:
        change = math.exp(mean(clu["val_loss_int4"]) - mean(clu["val_loss"])) - 1
        add("INT4 residuals: perplexity change", "+2.6% (27.5 vs 26.8)", f"{change:+.2%}", _verdict(change <= 0.03))
    if clu and dense and clu["infer_peak_mib_int4_offload"] and dense["infer_peak_mib"]:
        ratio = mean(clu["infer_peak_mib_int4_offload"]) / mean(dense["infer_peak_mib"])
        add("inference peak memory, INT4 + offload vs dense", "close to dense (15.7-16.5 vs 15.4 GB)",
            f"{ratio:.2f}x", _verdict(ratio <= 1.1))
    add("GLUE average vs Switch top-2", "83.5 vs 85.1 (MNLI, QQP, SST-2)",
        "MNLI and QQP are not staged here; CoLA, SST-2 and STS-B are in the table", "not measurable here")
    return rows
