"""bench.py --smoke: every section runs on CPU and the results hold together."""
import json
import math
from pathlib import Path

import pytest

import bench
from benchmarks import quality as bench_quality


def test_smoke_runs_every_section(tmp_path):
    cfg = bench.BenchConfig(smoke=True, out_dir=str(tmp_path / "bench"), data_dir=str(tmp_path / "data"))
    results = bench.main(cfg)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert set(saved) >= {"env", "layers", "models", "inference", "quality", "claims"}
    assert {r["layer"] for r in saved["layers"]} >= {"dense FFN d->k*h->d", "top-k MoE, loop",
                                                      "clustered MoE, loop"}
    assert all(r["ms"] > 0 for r in saved["layers"])
    params = {r["model"]: r for r in saved["models"]}
    assert params["clustered"]["expert_params"] < params["topk"]["expert_params"]
    assert [r["model"] for r in saved["inference"]][:5] == [
        "dense", "topk", "clustered", "clustered+int4", "clustered+int4+offload"]
    offload = saved["inference"][4]
    assert offload["bytes_moved"] > 0 and offload["misses"] + offload["prefetches"] > 0
    runs = saved["quality"]["runs"]
    assert all(math.isfinite(runs[m]["val_loss"]) for m in ("dense", "topk", "clustered"))
    for m in ("dense", "topk", "clustered"):   # --smoke trains 2 seeds of each model
        seeds = runs[m]["val_ppl_seeds"]
        assert len(seeds) == 2 and runs[m]["val_ppl_mean"] == sum(seeds) / 2
        assert runs[m]["val_ppl_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2 ** 0.5)
    # real routing decisions: a clustered token visits exactly one device, top-k up to k
    assert runs["clustered"]["devices_per_token"] == 1.0
    assert 1.0 <= runs["topk"]["devices_per_token"] <= 2.0
    assert runs["clustered"]["ckpt_mib_int4"] < runs["clustered"]["ckpt_mib_float"]
    assert len(runs["clustered"]["reclusters"]) >= 1
    claims = {c["claim"]: c for c in saved["claims"]}
    assert claims["routing candidates per token"]["measured"] == "8 -> 6"
    assert {c["met"] for c in saved["claims"]} <= {"met", "not met", "within noise"}
    assert results["claims"] == saved["claims"]
    for png in saved.get("plots", []):
        assert (tmp_path / "bench" / png).stat().st_size > 1000


def test_sections_table_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown sections"):
        bench.main(bench.BenchConfig(sections="layers,nope", out_dir=str(tmp_path)))


def test_grid_sections_run_every_declared_variant(tmp_path):
    cfg = bench.BenchConfig(smoke=True, sections="routing", out_dir=str(tmp_path / "b"),
                            data_dir=str(tmp_path / "data"))
    rows = bench.main(cfg)["routing"]
    assert [r["variant"] for r in rows] == list(bench_quality.GRIDS["routing"])
    assert all(len(r["val_ppl_seeds"]) == 2 and r["reclusters"] >= 1 for r in rows)


def test_grid_rows_carry_a_glue_score_per_seed(tmp_path):
    sst2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
    if not (sst2 / "SST-2" / "train.tsv").exists():
        pytest.skip("../shared/data/glue is not beside the repository")
    cfg = bench.BenchConfig(smoke=True, sections="routing", out_dir=str(tmp_path / "b"),
                            data_dir=str(tmp_path / "data"), glue_dir=str(sst2), glue_max_examples=16)
    rows = bench.main(cfg)["routing"]
    for row in rows:
        assert len(row["glue_seeds"]) == 2 and all(0 <= s <= 1 for s in row["glue_seeds"])
        assert row["glue"] == sum(row["glue_seeds"]) / 2


def test_baseline_sweeps_every_model_alike_then_takes_each_ones_best_lr(tmp_path):
    cfg = bench.BenchConfig(smoke=True, sections="baseline", out_dir=str(tmp_path / "b"),
                            data_dir=str(tmp_path / "data"), lrs="1e-4,3e-3")
    rows = bench.main(cfg)["baseline"]
    sweep = [r for r in rows if r["phase"] == "sweep"]
    final = [r for r in rows if r["phase"] == "final"]
    models = list(bench_quality.GRIDS["baseline"])
    assert len(sweep) == 2 * len(models) and [r["model"] for r in final] == models
    for row in final:   # each model's final lr is its own best of the same sweep
        mine = [r for r in sweep if r["variant"].startswith(row["model"] + ", lr")]
        assert {r["lr"] for r in mine} == {1e-4, 3e-3}
        assert row["lr"] == min(mine, key=lambda r: r["val_ppl"])["lr"]
        assert len(row["val_ppl_seeds"]) == 2
        assert "vs_dense" in row and row["noise"] in ("beyond noise", "within noise")
        assert ("heldout_load_cv" in row) == (row["model"] != "dense")
    # the sweep's seed-0 run at the best lr is the final's seed 0, not a second training
    folders = [p for p in (tmp_path / "b" / "baseline").iterdir() if p.is_dir()]
    assert len(folders) == 2 * len(models) + len(models)
