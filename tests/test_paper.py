"""bench.py --sections=paper: built in parts, each finished run kept, nothing trained twice."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import bench
from benchmarks import paper, quality

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def _kept(keep: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in keep.glob("*/*") if (p / "log.jsonl").exists()}


def test_the_paper_table_is_built_in_parts_and_never_trains_a_kept_run_twice(tmp_path, monkeypatch):
    glue = str(GLUE) if (GLUE / "SST-2" / "train.tsv").exists() else ""
    cfg = lambda **kw: bench.BenchConfig(smoke=True, sections="paper", out_dir=str(tmp_path / "b"),
                                         data_dir=str(tmp_path / "data"), keep=str(tmp_path / "keep"),
                                         glue_dir=glue, **kw)
    keep = paper.keep_dir(cfg())
    # Part 1: one run of one model, as a short GPU call would.
    bench.main(cfg(models="dense", max_runs=1))
    assert _kept(keep) == {"sweep/dense_lr0.0003"}
    assert not (tmp_path / "b" / "paper" / keep.name / "sweep" / "dense_lr0.0003" / "ckpt.pt").exists()

    # Part 2: the rest. The sweep decides each model's final lr; finals are measured; then the
    # ablations (the variant waits for a clustered model behind top-k: not here).
    monkeypatch.setattr(paper, "VARIANT_GAP", 1e9)
    rows = bench.main(cfg(parallel=2))["paper"]
    r = paper.regime(cfg())
    sweep = {f"sweep/{m}_lr{lr:g}" for m in paper.MODELS for lr in paper.sweep_lrs(keep, m, r["lrs"])}
    best = {m: paper.best_lr(keep, m, r["lrs"]) for m in paper.MODELS}
    finals = {f"final/{m}_lr{best[m]:g}_s{i}" for m in paper.MODELS for i in range(r["seeds"])}
    ablations = {f"ablation/{a}_lr{best['clustered']:g}" for a in paper.ABLATIONS}
    assert _kept(keep) == sweep | finals | ablations
    for m in paper.MODELS:
        lrs = paper.sweep_lrs(keep, m, r["lrs"])
        ppl = {lr: paper._final_ppl(keep / "sweep" / f"{m}_lr{lr:g}") for lr in lrs}
        assert best[m] == min(ppl, key=ppl.get)
        assert min(lrs) < best[m] < max(lrs) or len(lrs) == len(r["lrs"]) + paper.WIDEN
    for name in finals:
        measures = json.loads((keep / name / "measures.json").read_text())
        assert ("heldout_load_cv" in measures) == ("dense" not in name)
        assert ("val_loss_int4" in measures) == ("clustered" in name)
        if glue:
            assert set(measures["glue"]) == {"cola", "sst2", "stsb"}
    by_model = {row["model"]: row for row in rows if row["phase"] == "final"}
    assert set(by_model) == {*paper.MODELS, "clustered + INT4 (same checkpoints)"}
    for m in paper.MODELS:  # the row is the mean over the kept seeds' last perplexities
        values = [json.loads((keep / n / "log.jsonl").read_text().splitlines()[-1])["val_ppl"]
                  for n in sorted(finals) if n.startswith(f"final/{m}_")]
        mean = float(by_model[m]["val_ppl"].split(" ± ")[0])
        assert mean == pytest.approx(sum(values) / len(values), abs=0.06)
        assert by_model[m]["tokens_per_step"] == 2 * 32 * 2 and by_model[m]["seeds"] == 2
    assert "vs_topk" in by_model["clustered"] and "vs_dense" in by_model["topk"]
    # The curve: every evaluation of the finals, ending where the final rows end.
    for m in paper.MODELS:
        points = [row for row in rows if row["phase"] == "curve" and row["model"] == m]
        log = [json.loads(line) for line in (keep / f"final/{m}_lr{best[m]:g}_s0" / "log.jsonl").read_text().splitlines()]
        assert [p["steps"] for p in points] == [e["iter"] for e in log]
        assert points[-1]["val_ppl"] == by_model[m]["val_ppl"]
        assert ("vs_dense" in points[-1]) == (m != "dense") and points[-1].get("vs_dense") == by_model[m].get("vs_dense")
    assert json.loads((keep / "speed.json").read_text())["cpu"].keys() == set(paper.MODELS)
    # The ablations: the clustered finals' lr and budget, one change each, measured without GLUE.
    final = json.loads((keep / f"final/clustered_lr{best['clustered']:g}_s0" / "config.json").read_text())["config"]
    for name, change in paper.ABLATIONS.items():
        kept = keep / f"ablation/{name}_lr{best['clustered']:g}"
        conf = json.loads((kept / "config.json").read_text())["config"]
        assert {k for k in conf if conf[k] != final[k]} <= {"out_dir", *change}
        assert all(conf[k] == v for k, v in change.items())
        measures = json.loads((kept / "measures.json").read_text())
        assert {"heldout_load_cv", "infer_peak_mib"} <= set(measures) and "glue" not in measures
    rows_of = lambda phase: {row["model"]: row for row in rows if row["phase"] == phase}  # noqa: E731
    assert set(rows_of("ablation")) == {f"clustered, {a}" for a in paper.ABLATIONS} and not rows_of("variant")
    assert all("vs_clustered" in row and "vs_topk" in row for row in rows_of("ablation").values())

    # Part 2b: clustered behind top-k by more than VARIANT_GAP: only the variant is trained.
    monkeypatch.setattr(paper, "VARIANT_GAP", -1.0)
    rows = bench.main(cfg(parallel=2))["paper"]
    assert _kept(keep) == sweep | finals | ablations | {f"ablation/G4_lr{best['clustered']:g}"}
    assert set(rows_of("variant")) == {"clustered, G4"}

    # Part 3: everything is kept, so a call trains nothing and gives the same table.
    monkeypatch.setattr(quality, "train", lambda tc: pytest.fail(f"trained {tc.out_dir} again"))
    monkeypatch.setattr(quality.subprocess, "Popen", lambda *a, **k: pytest.fail("started a run again"))
    again = bench.main(cfg(parallel=2))["paper"]
    assert json.dumps(again) == json.dumps(rows)   # (as text: CPU memory figures are nan)


def test_models_must_name_the_tables_models(tmp_path):
    cfg = bench.BenchConfig(smoke=True, sections="paper", out_dir=str(tmp_path), keep=str(tmp_path / "k"),
                            models="dense,moe")
    with pytest.raises(ValueError, match="models must name some of dense,topk,clustered"):
        bench.main(cfg)


def _sweep_run(keep: Path, model: str, lr: float, ppl: float) -> None:
    folder = keep / "sweep" / f"{model}_lr{lr:g}"
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text(json.dumps({"iter": 500, "val_ppl": ppl}) + "\n")


def test_a_sweep_widens_past_an_edge_that_wins_and_decides_only_inside_it(tmp_path):
    grid = (3e-4, 6e-4, 1e-3)
    for lr, ppl in zip(grid, (273, 236, 230)):          # best at the top edge: not yet a best
        _sweep_run(tmp_path, "topk", lr, ppl)
    assert paper.sweep_lrs(tmp_path, "topk", grid) == [3e-4, 6e-4, 1e-3, 2e-3]
    assert paper.best_lr(tmp_path, "topk", grid) is None       # the final waits for 2e-3
    _sweep_run(tmp_path, "topk", 2e-3, 240)
    assert paper.best_lr(tmp_path, "topk", grid) == 1e-3
    for lr, ppl in zip(grid, (200, 210, 220)):          # best at the bottom: halve, twice at most
        _sweep_run(tmp_path, "dense", lr, ppl)
    _sweep_run(tmp_path, "dense", 1.5e-4, 190)
    _sweep_run(tmp_path, "dense", 7.5e-5, 180)
    assert paper.sweep_lrs(tmp_path, "dense", grid) == [7.5e-5, 1.5e-4, 3e-4, 6e-4, 1e-3]
    assert paper.best_lr(tmp_path, "dense", grid) == 7.5e-5    # the widening stops: the edge stands
    for lr, ppl in zip(grid, (300, 250, 260)):          # best inside: the grid as given
        _sweep_run(tmp_path, "clustered", lr, ppl)
    assert paper.sweep_lrs(tmp_path, "clustered", grid) == list(grid)
    assert paper.best_lr(tmp_path, "clustered", grid) == 6e-4


def test_a_kept_run_of_other_settings_is_refused_not_reused(tmp_path):
    cfg = bench.BenchConfig(smoke=True, sections="paper", out_dir=str(tmp_path / "b"),
                            data_dir=str(tmp_path / "data"), keep=str(tmp_path / "keep"))
    bench.main(bench.BenchConfig(**{**cfg.__dict__, "models": "dense", "max_runs": 1}))
    kept = paper.keep_dir(cfg) / "sweep" / "dense_lr0.0003" / "config.json"
    record = json.loads(kept.read_text())
    record["config"]["n_layer"] = 3
    kept.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="trained with other settings than this plan .n_layer: kept 3, plan 1"):
        bench.main(cfg)


def test_a_kept_run_from_before_a_new_config_field_counts_as_its_default(tmp_path):
    cfg = bench.BenchConfig(smoke=True, sections="paper", out_dir=str(tmp_path / "b"), models="dense",
                            max_runs=1, data_dir=str(tmp_path / "data"), keep=str(tmp_path / "keep"))
    bench.main(cfg)
    kept = paper.keep_dir(cfg) / "sweep" / "dense_lr0.0003"
    record = json.loads((kept / "config.json").read_text())
    del record["config"]["regroup_rule"]  # a field added after the run was made
    (kept / "config.json").write_text(json.dumps(record))
    before = (kept / "log.jsonl").read_text()
    bench.main(cfg)  # trains the next run, and neither refuses nor retrains the kept one
    assert (kept / "log.jsonl").read_text() == before
    assert _kept(paper.keep_dir(cfg)) == {"sweep/dense_lr0.0003", "sweep/dense_lr0.001"}


def test_tokens_per_step_must_fill_whole_micro_batches(tmp_path):
    cfg = bench.BenchConfig(sections="paper", out_dir=str(tmp_path), keep=str(tmp_path / "k"),
                            tokens_per_step=10000, device="cpu")
    with pytest.raises(ValueError, match="tokens_per_step must be a multiple of 8192"):
        bench.main(cfg)


def test_both_regimes_train_on_the_same_tokens(tmp_path):
    budgets = {}
    for tokens_per_step in (8192, 32768):
        cfg = bench.BenchConfig(sections="paper", out_dir=str(tmp_path), keep=str(tmp_path / "k"),
                                tokens_per_step=tokens_per_step)
        runs = paper.planned(cfg, torch.device("cpu"), paper.keep_dir(cfg))
        budgets[tokens_per_step] = {tc.batch_size * tc.block_size * tc.grad_accum * tc.max_iters for tc in runs}
    assert budgets[8192] == budgets[32768] == {500 * 32768}   # the sweep: 16.4M tokens in each regime


def test_a_checkpoint_interval_rounds_up_to_an_evaluation(tmp_path):
    """Checkpoints are written at evaluations, so --ckpt_interval=1000 with evaluations every
    400 steps means a checkpoint every 1,200, not one at the end only."""
    cfg = bench.BenchConfig(sections="paper", out_dir=str(tmp_path), keep=str(tmp_path / "k"), ckpt_interval=1000)
    runs = paper.planned(cfg, torch.device("cpu"), paper.keep_dir(cfg))
    assert {(tc.eval_interval, tc.ckpt_interval) for tc in runs} == {(100, 1000)}
    for name in paper.MODELS:  # a complete sweep, best inside the grid: the finals are planned
        for lr, ppl in zip(paper.regime(cfg)["lrs"], (300, 250, 260)):
            _sweep_run(paper.keep_dir(cfg), name, lr, ppl)
    finals = [tc for tc in paper.planned(cfg, torch.device("cpu"), paper.keep_dir(cfg)) if "/final/" in tc.out_dir]
    assert finals and {(tc.eval_interval, tc.ckpt_interval) for tc in finals} == {(400, 1200)}


def test_a_glue_measure_cut_short_goes_on_with_the_tasks_it_had_not_finished(tmp_path, monkeypatch):
    """A call's time limit can stop GLUE between tasks: the next measure fine-tunes only
    the tasks without a summary, side by side, and reports all three."""
    import train
    cfg = bench.BenchConfig(smoke=True, sections="paper", out_dir=str(tmp_path / "b"),
                            data_dir=str(tmp_path / "data"), keep=str(tmp_path / "keep"), glue_dir="glue")
    tc = paper.planned(cfg, torch.device("cpu"), paper.keep_dir(cfg))[0]
    train.train(tc)
    folder = Path(tc.out_dir)
    cola = {"summary": True, "task": "cola", "score": {"mean": 0.1}}
    (folder / "glue_cola.jsonl").write_text(json.dumps(cola))
    (folder / "glue_sst2.jsonl").write_text(json.dumps({"task": "sst2", "seed": 0}))  # cut before its summary
    asked = []

    def fake_pool(jobs, start, parallel, what):  # eval_glue.py's summary for each task asked
        asked.append((list(jobs), parallel))
        for task in jobs:
            args = dict(a[2:].split("=", 1) for a in map(str, start(task)[0][1:]))
            assert args["task"] == task and args["ckpt"] == str(folder / "ckpt.pt")
            with open(args["out"], "a") as f:
                f.write(json.dumps({"summary": True, "task": task, "score": {"mean": 0.5}}) + "\n")
    monkeypatch.setattr(paper, "_pool", fake_pool)
    monkeypatch.setattr(paper.os, "cpu_count", lambda: 4)
    assert paper.measure(cfg, tc, torch.device("cpu"))["glue"] == {"cola": 0.1, "sst2": 0.5, "stsb": 0.5}
    assert asked == [(["sst2", "stsb"], 2)]
    assert paper.measure(cfg, tc, torch.device("cpu"))["glue"] == {"cola": 0.1, "sst2": 0.5, "stsb": 0.5}
    assert asked[1] == ([], 1)  # all three done: nothing fine-tuned


def test_glue_tasks_run_side_by_side_as_free_memory_allows(monkeypatch):
    cuda, n_params = torch.device("cuda"), 973_444_608     # top-k at the paper's size: 19.6 GB a task
    for free_gib, at_once in ((80, 3), (45, 2), (30, 1), (5, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * 2**30, 80 * 2**30))
        assert paper.glue_at_once(cuda, n_params, 3) == at_once
    assert paper.glue_at_once(cuda, n_params, 1) == 1


def test_how_runs_take_a_step_sets_train_flags_and_keeps_each_kind_of_step_apart(tmp_path):
    cuda = torch.device("cuda")  # planning only: nothing runs on it
    flags, keeps = {}, {}
    for step in paper.STEPS:
        cfg = bench.BenchConfig(sections="paper", out_dir=str(tmp_path), keep=str(tmp_path / "k"), paper_step=step)
        flags[step] = {(tc.compile, tc.cuda_graph) for tc in paper.planned(cfg, cuda, paper.keep_dir(cfg))}
        keeps[step] = paper.keep_dir(cfg).name
    assert flags == {"compiled": {(True, False)}, "graphed": {(False, True)},
                     "compiled+graphed": {(True, True)}}
    assert keeps == {"compiled": "paper-32k", "compiled+graphed": "paper-32k-graphed", "graphed": "paper-32k-eager"}
    assert bench.BenchConfig().paper_step == "compiled"
    cpu = paper.planned(cfg, torch.device("cpu"), paper.keep_dir(cfg))
    assert {(tc.compile, tc.cuda_graph) for tc in cpu} == {(False, False)}
    # A kept compiled run counts as done for the default plan; where it ran does not matter.
    keep = tmp_path / "k" / "paper-32k"
    _sweep_run(keep, "dense", 3e-4, 300)
    default = bench.BenchConfig(sections="paper", out_dir=str(tmp_path), keep=str(tmp_path / "k"))
    kept = next(tc for tc in paper.planned(default, cuda, keep) if tc.out_dir.endswith("dense_lr0.0003"))
    assert kept.compile and not kept.cuda_graph
    (keep / "sweep" / "dense_lr0.0003" / "config.json").write_text(
        json.dumps({"config": asdict(replace(kept, out_dir="/elsewhere", ckpt_interval=100))}))
    assert paper.done_in(keep, kept)
    # Another kind of step is another run: found among compiled ones, it is refused, not reused.
    for other in (replace(kept, compile=False), replace(kept, cuda_graph=True)):
        with pytest.raises(ValueError, match="(compile: kept True, plan False|cuda_graph: kept False, plan True)"):
            paper.done_in(keep, other)
    with pytest.raises(ValueError, match="paper_step must be one of compiled, graphed, compiled\\+graphed, got 'fast'"):
        paper.planned(bench.BenchConfig(paper_step="fast"), cuda, keep)


def test_step_modes_retrains_a_kept_runs_first_interval_as_it_ran(tmp_path, capsys):
    """results/paper/step_modes.py retrains a kept run's first evaluation interval with the lr
    schedule still spanning the kept run's steps, so (eager on a CPU, which repeats a run bit for
    bit) it logs the kept run's validation loss there; bad input is one line."""
    import subprocess
    import sys

    import train
    from results.paper.step_modes import KEPT, main
    assert (Path(__file__).resolve().parents[1] / KEPT / "config.json").exists()  # the default run
    kept = tmp_path / "kept"
    train.train(train.parse_config(train.TrainConfig, [
        "--sample_tokens=0", "--n_layer=1", "--n_head=2", "--n_embd=32", "--ffn_hidden=32",
        "--n_experts=4", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--device=cpu",
        "--warmup_iters=2", "--lr=3e-3", "--moe=topk", "--max_iters=8", "--eval_interval=4",
        f"--out_dir={kept}", f"--data_dir={tmp_path / 'data'}"]))
    main([str(kept), "--iters=4", "--modes=eager", "--parallel=1", f"--out_dir={tmp_path / 'modes'}"])
    first = json.loads((kept / "log.jsonl").read_text().splitlines()[0])
    again = json.loads((tmp_path / "modes" / "eager" / "log.jsonl").read_text().splitlines()[0])
    assert first["iter"] == again["iter"] == 4 and first["lr"] == again["lr"]
    assert again["val_loss"] == first["val_loss"]
    assert "| eager | False | False |" in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "results.paper.step_modes", str(kept), "--modes=fast"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "error: unknown modes ['fast']; valid: eager, compiled, graphed, compiled+graphed"]
