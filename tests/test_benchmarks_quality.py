"""benchmarks/quality.py: the seed grid (parallel subprocesses, finished runs skipped) and the noise test."""
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.quality import beyond_noise, finished, read_log, run_grid, summarize
from train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(sample_tokens=0, n_layer=1, n_head=2, n_embd=16, ffn_hidden=16, n_experts=4, n_clusters=2, rank=2,
            block_size=16, batch_size=2, eval_iters=1, eval_interval=2, max_iters=2, device="cpu",
            moe="topk")


def test_summarize_and_noise_rule():
    s = summarize([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": statistics.stdev([1.0, 2.0, 3.0]), "n": 3}
    assert summarize([5.0])["std"] == 0.0
    # se of the difference = sqrt(1/3 + 1/3) = 0.816; a gap of 1 is within 2 se, of 2 beyond it
    assert not beyond_noise([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert beyond_noise([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert beyond_noise([1.0], [1.1])  # no spread to compare against: every gap counts


def test_grid_runs_in_parallel_processes_and_skips_finished(tmp_path):
    runs = [TrainConfig(**TINY, seed=s, out_dir=str(tmp_path / f"run{s}"), data_dir=str(tmp_path / "data"))
            for s in (0, 1)]
    run_grid(runs, parallel=2)
    assert all(finished(tc) for tc in runs)
    first = [read_log(tc) for tc in runs]
    assert first[0][-1]["val_loss"] != first[1][-1]["val_loss"]       # two seeds, two runs
    stamp = (tmp_path / "run0" / "log.jsonl").stat().st_mtime_ns
    run_grid(runs, parallel=2)                                         # nothing left to do
    assert (tmp_path / "run0" / "log.jsonl").stat().st_mtime_ns == stamp


def test_failed_run_is_an_error_quoting_its_output(tmp_path):
    bad = TrainConfig(**{**TINY, "device": "cuda:7"}, out_dir=str(tmp_path / "bad"),
                      data_dir=str(tmp_path / "data"))
    other = TrainConfig(**TINY, out_dir=str(tmp_path / "ok"), data_dir=str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match="failed"):
        run_grid([bad, other], parallel=2)


def test_a_run_cut_short_resumes_from_its_checkpoint(tmp_path):
    from dataclasses import replace

    from train import train
    whole = TrainConfig(**{**TINY, "max_iters": 4, "lr_decay_iters": 4}, out_dir=str(tmp_path / "whole"),
                        data_dir=str(tmp_path / "data"))
    cut = replace(whole, out_dir=str(tmp_path / "cut"))
    train(replace(cut, max_iters=2))                 # a grid run stopped at its first checkpoint
    run_grid([whole, cut], parallel=2)
    assert [r["iter"] for r in read_log(cut)] == [2, 4]
    a, b = (torch.load(f"{tc.out_dir}/ckpt.pt", weights_only=True) for tc in (whole, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_diverged_run_is_a_result_not_a_failure(tmp_path, parallel):
    from benchmarks.quality import run_variants
    base = TrainConfig(**{**TINY, "max_iters": 6, "eval_interval": 3, "log_interval": 1, "warmup_iters": 1},
                       data_dir=str(tmp_path / "data"))
    rows = run_variants(base, {"calm": {}, "wild": {"lr": 1e4, "min_lr": 1e3}}, 2, tmp_path / "g",
                        parallel, speed=False)
    calm, wild = rows
    assert "diverged" not in calm and len(calm["val_ppl_seeds"]) == 2
    assert len(wild["diverged"]) == 2 and wild["val_ppl"] == float("inf")
    assert all("at iteration" in d for d in wild["diverged"])
    # a second pass finds every run finished, the diverged ones included
    again = run_variants(base, {"calm": {}, "wild": {"lr": 1e4, "min_lr": 1e3}}, 2, tmp_path / "g",
                         parallel, speed=False)
    assert again[1]["diverged"] == wild["diverged"]


def test_a_stopped_grid_stops_its_runs(tmp_path):
    """SIGTERM to the process running a grid (as `timeout` sends it) stops the runs it started:
    none is left writing into a folder that a rerun would resume."""
    script = ("import sys; from pathlib import Path; import cli; from benchmarks import quality\n"
              "tmp = Path(sys.argv[1])\n"
              "code = lambda i: (f'import os, time; open(r\"{tmp}/pid{i}\", \"w\").write(str(os.getpid())); '\n"
              "                  'time.sleep(600)')\n"
              "start = lambda i: (['-c', code(i)], tmp / f'log{i}')\n"
              "cli.run(lambda argv: quality._pool([0, 1], start, 2, 'sleeping'), [])\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, text=True,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not all((tmp_path / f"pid{i}").exists() for i in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the pid files are written; the children sleep
    children = [int((tmp_path / f"pid{i}").read_text()) for i in (0, 1)]
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == 143 and stderr.strip() == "interrupted", stderr[-2000:]
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("how", ["ctrl_c", "sigkill"])
def test_a_stopped_grid_checkpoints_each_run_at_its_step(tmp_path, how):
    """Ctrl-C at a terminal signals the whole process group (as `timeout` does): each run
    hears one stop, from the grid, so it ends its step and checkpoints it. A grid killed
    outright (SIGKILL) cannot stop its runs itself: they hear of it from the kernel, and do the same."""
    runs = [TrainConfig(**{**TINY, "max_iters": 100000, "eval_interval": 50}, seed=s,
                        out_dir=str(tmp_path / f"run{s}"), data_dir=str(tmp_path / "data")) for s in (0, 1)]
    script = ("import pickle, sys; import cli; from benchmarks import quality\n"
              "runs = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
              "cli.run(lambda argv: quality.run_grid(runs, parallel=2), [])\n")
    grid = subprocess.Popen([sys.executable, "-c", script, pickle.dumps(runs).hex()], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not all((Path(tc.out_dir) / "ckpt.pt").exists() for tc in runs) and time.time() < deadline:
        time.sleep(0.05)
    if how == "ctrl_c":
        os.killpg(grid.pid, signal.SIGINT)
    else:
        grid.kill()
    _, stderr = grid.communicate(timeout=120)
    if how == "ctrl_c":
        assert grid.returncode == 130 and stderr.strip().endswith("interrupted"), stderr[-2000:]
    ends = [Path(tc.out_dir) / "train.out" for tc in runs]
    while not all("interrupted" in path.read_text() for path in ends) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the line is printed as the process exits
    for tc, path in zip(runs, ends):
        end = path.read_text().splitlines()[-1]
        found = re.fullmatch(r"interrupted at iteration (\d+); the checkpoint of iteration (\d+) "
                             r"is kept.*", end)
        assert found and found[1] == found[2], end
        assert torch.load(Path(tc.out_dir) / "ckpt.pt", weights_only=True)["iter"] == int(found[2])
