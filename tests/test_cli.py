"""cli.py through every entry point, as a user meets it: bad input is one line on stderr, a
non-zero exit, no traceback, and nothing written or removed; --debug keeps the traceback;
an out_dir holding a run is protected; --resume continues the checkpoint's run and refuses
a flag that contradicts it; Ctrl-C (or SIGTERM) ends the step under way, checkpoints it and
prints one line, exit 130 (143), and the run resumes as if unbroken;
every entry point sets the CPU thread policy before torch loads; --help describes every flag."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import Progress, upgrade_config
from cli import StopAtStep, Terminated, help_text, parse_config
from train import PRESETS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--ffn_hidden=32", "--n_experts=4",
        "--n_clusters=2", "--rank=2", "--block_size=32", "--batch_size=2", "--max_iters=2",
        "--eval_interval=2", "--eval_iters=1", "--device=cpu", "--sample_tokens=0"]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _run_all(*commands, env=None):
    """Several commands at once (each as _run) -> their results, in order."""
    running = [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, text=True, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    outputs = [p.communicate(timeout=300) for p in running]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output)
            for p, output in zip(running, outputs)]


def _messages(stderr: str) -> list[str]:
    """stderr's lines but the progress bars' (tqdm's \r updates, read as lines)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"\s*\d+%\|", line)]


def _snapshot(*folders) -> dict:
    """Every file under the folders: size and modification time (what 'untouched' means)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders
            if Path(folder).exists() for p in Path(folder).rglob("*") if p.is_file()}


def _one_line_error(result, *phrases):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-500:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run, and a truncated copy of its checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    train.train(parse_config(TrainConfig, TINY + [f"--out_dir={root / 'run'}",
                                                  f"--data_dir={root / 'data'}"]))
    data = (root / "run" / "ckpt.pt").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "ckpt.pt").write_bytes(data[:len(data) // 3])
    return root


def test_a_truncated_checkpoint_is_one_line_everywhere(run_dir):
    bad, text = run_dir / "bad" / "ckpt.pt", ROOT / "assets" / "tinyshakespeare.txt.gz"
    before = _snapshot(run_dir / "bad")
    for args in (["eval_ppl.py", f"--ckpt={bad}", f"--text={run_dir / 'run' / 'config.json'}"],
                 ["sample.py", f"--ckpt={bad}", "--device=cpu"],
                 ["eval_glue.py", f"--ckpt={bad}", "--task=sst2", f"--data_dir={run_dir}"]):
        _one_line_error(_run(*args), "cannot read checkpoint", str(bad), "corrupt, truncated")
    assert text.exists() and _snapshot(run_dir / "bad") == before


def test_resume_from_a_truncated_checkpoint_leaves_the_run_as_it_was(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((run_dir / "bad" / "ckpt.pt").read_bytes())
    (out / "log.jsonl").write_text('{"iter": 2}\n')
    before = _snapshot(out)
    result = _run("train.py", *TINY, "--max_iters=4", "--resume", f"--out_dir={out}",
                  f"--data_dir={run_dir / 'data'}")
    _one_line_error(result, "cannot read checkpoint")
    assert _snapshot(out) == before


def test_an_empty_text_file_is_one_line(run_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(_run("eval_ppl.py", f"--ckpt={run_dir / 'run' / 'ckpt.pt'}", f"--text={empty}",
                         "--device=cpu"), "0 tokens")


def test_bad_datasets_are_named_and_nothing_is_written(tmp_path):
    (tmp_path / "empty_ds").mkdir()
    (tmp_path / "empty_ds" / "a.txt").write_text("")
    zipped = tmp_path / "short.zip"
    zipped.write_bytes((ROOT / "assets" / "tinyshakespeare.txt.gz").read_bytes()[:5000])
    cases = [(f"--dataset={tmp_path / 'empty_ds'}", ["no text", "empty"]),
             (f"--dataset={zipped}", ["corrupt or truncated .zip", str(zipped)])]
    for flag, phrases in cases:
        before = _snapshot(tmp_path)
        result = _run("train.py", *TINY, flag, f"--out_dir={tmp_path / 'out'}",
                      f"--data_dir={tmp_path / 'data'}")
        _one_line_error(result, *phrases)
        assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()
        assert not (tmp_path / "data").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_one_line(tmp_path):
    result = _run("train.py", *TINY[:-2], "--device=cuda", f"--out_dir={tmp_path / 'out'}",
                  f"--data_dir={tmp_path / 'data'}")
    _one_line_error(result, "CUDA is not available", "--device=cpu")
    assert not (tmp_path / "out").exists()


def test_a_second_run_never_overwrites_the_first_unless_asked(run_dir, tmp_path):
    out = tmp_path / "out"
    flags = [*TINY, f"--out_dir={out}", f"--data_dir={run_dir / 'data'}"]
    assert _run("train.py", *flags).returncode == 0
    before = _snapshot(out)
    _one_line_error(_run("train.py", *flags), "holds a run", "--resume", "--overwrite")
    assert _snapshot(out) == before
    assert _run("train.py", *flags, "--overwrite").returncode == 0
    log = (out / "log.jsonl").read_text().splitlines()
    assert len(log) == 1                       # the second run's record only: logs never mix


def test_unknown_flags_and_sections_are_one_line_and_debug_keeps_the_traceback(tmp_path):
    _one_line_error(_run("train.py", "--no_such_flag=1"), "unknown argument", "valid keys")
    _one_line_error(_run("bench.py", "--sections=nope", f"--out_dir={tmp_path}"), "unknown sections")
    _one_line_error(_run("sample.py", f"--ckpt={tmp_path / 'none.pt'}"), "no checkpoint at")
    debug = _run("train.py", "--no_such_flag=1", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_describes_every_flag_in_groups():
    text = help_text(TrainConfig, PRESETS)
    for group in ("model:", "routing:", "clustering:", "data:", "training:", "logging:"):
        assert f"\n{group}\n" in text
    described = [line for line in text.splitlines() if line.startswith("  --")]
    assert len(described) == len(TrainConfig.__dataclass_fields__)
    assert all(len(line.split(None, 1)) == 2 for line in described), "a flag without a description"
    printed = _run("sample.py", "--help")
    assert printed.returncode == 0 and "--prompt='\\n'" in printed.stdout


def test_checkpoints_from_before_the_renames_load():
    old = {"warmup_iters": 200, "lr_warmup": 50, "moe_impl": "fused", "moe": "clustered"}
    new = upgrade_config(old)
    assert new["burn_in"] == 200 and new["warmup_iters"] == 50 and new["moe_impl"] == "triton"
    assert "lr_warmup" not in new and TrainConfig(**new).burn_in == 200
    assert upgrade_config(new) == new                      # today's names pass through


def test_a_flag_written_with_a_space_names_the_equals_form():
    before = _snapshot(ROOT / "out")
    _one_line_error(_run("train.py", "--lr", "0.1"), "write --lr=0.1, not --lr 0.1")
    _one_line_error(_run("train.py", "--compile_mode=reduce-overhead"), "--compile --cuda_graph")
    _one_line_error(_run("train.py", "--compile", "true"), "write --compile=true")
    _one_line_error(_run("eval_ppl.py", "--text"), "--text needs a value", "--text=VALUE")
    assert _snapshot(ROOT / "out") == before


def test_binary_text_is_one_line(run_dir, tmp_path):
    ckpt = run_dir / "run" / "ckpt.pt"
    for name, raw, phrase in (("nul.txt", b"text\x00\x01\x02 more", "NUL bytes"),
                              ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8 text")):
        (tmp_path / name).write_bytes(raw)
        before = _snapshot(tmp_path, run_dir / "run")
        _one_line_error(_run("eval_ppl.py", f"--ckpt={ckpt}", f"--text={tmp_path / name}",
                             "--device=cpu"), phrase, name)
        assert _snapshot(tmp_path, run_dir / "run") == before


def test_a_split_too_short_for_block_size_is_refused_before_any_work(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("one line of text\n" * 40 + "the end\n")
    out = tmp_path / "out"
    result = _run("train.py", *TINY, f"--dataset={tmp_path / 'tiny'}", f"--out_dir={out}",
                  f"--data_dir={tmp_path / 'data'}")
    _one_line_error(result, "the val split", "fewer than block_size + 2 = 34", "--block_size")
    assert not out.exists()                     # no run files; only the prepared tokens


def test_resume_takes_the_checkpoints_config_and_refuses_a_contradiction(run_dir, tmp_path):
    out, data = tmp_path / "out", f"--data_dir={run_dir / 'data'}"
    assert _run("train.py", *TINY, "--n_layer=2", "--burn_in=1", f"--out_dir={out}", data).returncode == 0
    ckpt, before = (out / "ckpt.pt").read_bytes(), _snapshot(out)
    cases = ((["--n_layer=6", "--moe=dense"], ["--moe=dense", "moe=clustered"]),
             (["--n_layer=4"], ["--n_layer=4", "n_layer=2"]),            # the default, given
             (["--preset=small"], ["--preset=small", "preset=''"]),
             (["--batch_size=4"], ["--batch_size=4", "batch_size=2"]),
             (["--max_iters=2"], ["at iteration 2", "larger --max_iters"]))
    for (_, phrases), result in zip(cases, _run_all(*(["train.py", "--resume", f"--out_dir={out}",
                                                       *flags] for flags, _ in cases))):
        _one_line_error(result, *phrases)
    assert (out / "ckpt.pt").read_bytes() == ckpt and _snapshot(out) == before
    # No flag repeated: the checkpoint's 2 clustered layers, its data and device; max_iters changes.
    resumed = _run("train.py", "--resume", f"--out_dir={out}", "--max_iters=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "changed: max_iters 2 -> 4" in resumed.stdout and "2 layers" in resumed.stdout
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["iter"] == 4 and saved["config"]["n_layer"] == 2 and saved["config"]["burn_in"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["max_iters"] == 4 and config["resumed"][0][1:] == [
        "--resume", f"--out_dir={out}", "--max_iters=4"]
    scored = _run("eval_ppl.py", f"--ckpt={out / 'ckpt.pt'}", f"--text={ROOT / 'README.md'}",
                  "--device=cpu")
    assert scored.returncode == 0 and "ppl" in scored.stdout, scored.stderr[-2000:]


def _interrupted(args, out: Path, after: str, signum=signal.SIGINT):
    """train.py sent SIGINT (Ctrl-C) or `signum` once `after` appears in out -> the finished process."""
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / after).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


NOTICE = "stopping at the end of this step, to checkpoint it (again to stop at once)"
STOPPED = (r"interrupted at iteration (\d+); the checkpoint of iteration (\d+) is kept; "
           r"resume with: python train.py --resume --out_dir=(\S+)")


def test_ctrl_c_checkpoints_its_step_and_the_resumed_run_equals_an_unbroken_one(run_dir, tmp_path):
    """Ctrl-C inside an eval interval: the step under way ends and is checkpointed with the
    interval's sums, so no step is lost and the resumed run logs what the unbroken one does."""
    out, data = tmp_path / "cut", f"--data_dir={run_dir / 'data'}"
    schedule = [*TINY, "--eval_interval=4", "--burn_in=3", "--recluster_interval=3",
                "--lr_decay_iters=20", "--warmup_iters=2", data]
    cut = _interrupted([*schedule, "--max_iters=1000", f"--out_dir={out}"], out, "ckpt.pt")
    lines = _messages(cut.stderr)
    assert cut.returncode == 130 and "Traceback" not in cut.stderr, cut.stderr[-2000:]
    assert len(lines) == 2 and lines[0] == NOTICE, lines
    found = re.fullmatch(STOPPED, lines[1])
    assert found and found[3] == str(out), lines
    at, kept = int(found[1]), int(found[2])
    assert kept == at and torch.load(out / "ckpt.pt", weights_only=True)["iter"] == at
    assert not (out / "ckpt.tmp").exists()
    end = 4 * (at // 4 + 2)                         # two evaluations and reclusters further
    resumed = _run("train.py", "--resume", f"--out_dir={out}", f"--max_iters={end}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    train.train(parse_config(TrainConfig, [*schedule, f"--max_iters={end}",
                                           f"--out_dir={tmp_path / 'whole'}"]))
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("cut", "whole"))
    assert a["iter"] == b["iter"] == end and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timings = {"time", "tokens_per_sec", "mfu", "recluster_s"}
    logs = [[{k: v for k, v in json.loads(line).items() if k not in timings}
             for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("cut", "whole")]
    assert len(logs[1]) == end // 4 and logs[0] == logs[1]


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopAtStep() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert isinstance(stop.requested, Terminated)  # held, not raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes: here at the latest
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    # Off the main thread (train.train called from a worker thread) it installs nothing.
    entered = []
    worker = threading.Thread(target=lambda: entered.append(StopAtStep().__enter__()._previous))
    worker.start()
    worker.join()
    assert entered == [{}] and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_stops_like_ctrl_c(run_dir, tmp_path):
    """`kill` or `timeout` (SIGTERM): the same lines and checkpoint as Ctrl-C, status 143."""
    out = tmp_path / "term"
    cut = _interrupted([*TINY, "--max_iters=1000", f"--out_dir={out}", f"--data_dir={run_dir / 'data'}"],
                       out, "ckpt.pt", signal.SIGTERM)
    lines = _messages(cut.stderr)
    assert cut.returncode == 143 and "Traceback" not in cut.stderr, cut.stderr[-2000:]
    assert len(lines) == 2 and lines[0] == NOTICE, lines
    found = re.fullmatch(STOPPED, lines[1])
    assert found and found[1] == found[2], lines
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == int(found[2])
    assert not (out / "ckpt.tmp").exists()


def test_a_checkpoint_interval_between_evaluations_is_refused(tmp_path):
    _one_line_error(_run("train.py", *TINY, "--eval_interval=400", "--ckpt_interval=1000",
                         f"--out_dir={tmp_path / 'out'}"),
                    "ckpt_interval (1000) must be 0 or a multiple of eval_interval (400)")
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_before_its_first_checkpoint_blocks_nothing(run_dir, tmp_path):
    """Killed (SIGKILL: the OOM killer, a power cut) before any checkpoint, or stopped during
    its start-up: the folder holds no checkpoint and the same command starts afresh."""
    out, data = tmp_path / "early", f"--data_dir={run_dir / 'data'}"
    flags = [*TINY, f"--out_dir={out}", data]
    cut = _interrupted([*flags, "--max_iters=100000", "--eval_interval=100000"], out, "config.json",
                       signal.SIGKILL)
    assert cut.returncode == -signal.SIGKILL and not (out / "ckpt.pt").exists()
    assert re.fullmatch(r"interrupted before the first iteration; no checkpoint yet in "
                        + re.escape(str(out)) + ", nothing to resume: run the same command "
                        r"again to start afresh", Progress(str(out)).line())
    before = _snapshot(out)
    _one_line_error(_run("train.py", "--resume", f"--out_dir={out}"), "no checkpoint at",
                    "without --resume")
    assert _snapshot(out) == before
    again = _run("train.py", *flags)
    assert again.returncode == 0 and "stopped before its first checkpoint" in again.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 2


def test_every_entry_point_sets_the_thread_policy_before_torch_loads():
    """Each entry point, run as a script, with OMP_WAIT_POLICY unset: what it holds when
    torch is first imported (OpenMP reads it then, once)."""
    probe = ("import os, runpy, sys\n"
             "class Probe:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch' and 'seen' not in os.environ:\n"
             "            os.environ['seen'] = os.environ.get('OMP_WAIT_POLICY', 'unset')\n"
             "            print('policy when torch loads:', os.environ['seen'], file=sys.stderr)\n"
             "sys.meta_path.insert(0, Probe())\n"
             "sys.argv = [sys.argv[1], '--help']\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    entries = ("train.py", "sample.py", "eval_ppl.py", "eval_glue.py", "bench.py")
    unset = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for entry, result in zip(entries, _run_all(*(["-c", probe, entry] for entry in entries),
                                               env=unset)):
        assert result.returncode == 0 and "usage:" in result.stdout, (entry, result.stderr[-2000:])
        assert "policy when torch loads: PASSIVE" in result.stderr, (entry, result.stderr[-2000:])


def test_bfloat16_on_a_cpu_runs_bfloat16(run_dir, tmp_path):
    """--dtype=bfloat16 on a CPU is bf16 autocast for real: the summary says so, and the
    losses differ from the float32 run of the same flags (run_dir)."""
    out = tmp_path / "bf16"
    result = _run("train.py", *TINY, "--dtype=bfloat16", f"--out_dir={out}",
                  f"--data_dir={run_dir / 'data'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on cpu (bfloat16)" in result.stdout and "Disabling" not in result.stderr
    loss = lambda folder: json.loads((folder / "log.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert loss(out) != loss(run_dir / "run")


def test_a_bad_flag_is_named_even_where_out_holds_the_quick_run(tmp_path):
    """README's first command leaves out/ holding a run; a later typo must still be named."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"a run")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--n_embd=30", "--n_head=4",
                           f"--out_dir={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "divisible by n_head" in done.stderr, done.stderr
    assert (out / "ckpt.pt").read_bytes() == b"a run"


def _started(args, out: Path, after: str) -> subprocess.Popen:
    """train.py running, once `after` appears in out."""
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / after).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert process.poll() is None
    return process


def test_a_second_run_in_an_out_dir_in_use_is_refused_whatever_its_flags(run_dir, tmp_path):
    """A run still going, before its first checkpoint or after: a second train.py there (the
    same command, --overwrite, --resume) is one line and removes nothing; once the first is
    killed, however it dies, the folder is free again."""
    out, data = tmp_path / "busy", f"--data_dir={run_dir / 'data'}"
    flags = [*TINY, f"--out_dir={out}", data, "--max_iters=100000"]
    busy = f"{out} is in use by a training run still going (pid "
    first = _started([*flags, "--eval_interval=100000"], out, "config.json")  # no checkpoint yet
    try:
        for extra in ([], ["--overwrite"]):
            _one_line_error(_run("train.py", *flags, *extra), busy + f"{first.pid})")
            assert (out / "config.json").exists() and first.poll() is None
    finally:
        first.kill()
        first.wait()
    first = _started([*flags, "--eval_interval=5"], out, "ckpt.pt")  # the folder is free again
    try:
        _one_line_error(_run("train.py", "--resume", f"--out_dir={out}"), busy + f"{first.pid})")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    kept = torch.load(out / "ckpt.pt", weights_only=True)["iter"]
    again = _run("train.py", "--resume", f"--out_dir={out}", f"--max_iters={kept + 5}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == kept + 5
