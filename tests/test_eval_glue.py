"""eval_glue.py on CPU with tiny checkpoints: real SST-2 end to end, a pair task and STS-B
from fixture folders over several seeds (summaries against numpy over the per-seed records),
GLUE's task score against a leaderboard row, which tasks 'staged' and a list select, padding
invariance of last-token pooling against each sequence run alone, a keyword task it must
learn, determinism, and clear errors before any work.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_glue
import glue
import train
from eval_glue import GlueClassifier, GlueConfig, collate
from train import TrainConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
REAL_SST2 = Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2"
TINY = ["--sample_tokens=0", "--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=32", "--n_experts=4",
        "--n_clusters=2", "--rank=2", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--device=cpu", "--warmup_iters=2", "--lr=3e-3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{'clustered': path, 'dense': path}: a few iterations each on Tiny Shakespeare."""
    root = tmp_path_factory.mktemp("pretrain")
    paths = {}
    for moe, extra in [("clustered", ["--burn_in=2", "--recluster_interval=100"]),
                       ("dense", [])]:
        train.train(parse_config(TrainConfig, TINY + [
            f"--moe={moe}", "--max_iters=6", "--eval_interval=6", f"--data_dir={root / 'data'}",
            f"--out_dir={root / moe}", *extra]))
        paths[moe] = root / moe / "ckpt.pt"
    keys = torch.load(paths["clustered"], weights_only=True)["model"].keys()
    assert any(k.endswith("bank.base1") for k in keys)  # past warmup: really clustered
    return paths


def cfg_for(ckpt, data_dir, out, *extra):
    return parse_config(GlueConfig, [f"--ckpt={ckpt}", f"--data_dir={data_dir}", f"--out={out}",
                                     "--device=cpu", *extra])


def write_tsv(folder: Path, split: str, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(map(str, row)) for row in rows]
    (folder / f"{split}.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


WORDS = "the a movie film plot actor scene story was is very quite rather and but it".split()


def write_rte(root, n_train=24, n_dev=8):
    rng = random.Random(0)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [(i, " ".join(rng.choices(WORDS, k=6)), " ".join(rng.choices(WORDS, k=3)),
                 rng.choice(glue.NLI2)) for i in range(n)]
        write_tsv(root / "RTE", split, ("index", "sentence1", "sentence2", "label"), rows)


def write_stsb(root, n_train=24, n_dev=8):
    rng = random.Random(1)
    header = ("index genre filename year old_index source1 source2 sentence1 sentence2 "
              "score").split()
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [(i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none",
                 " ".join(rng.choices(WORDS, k=5)), " ".join(rng.choices(WORDS, k=5)),
                 f"{rng.uniform(0, 5):.3f}") for i in range(n)]
        write_tsv(root / "STS-B", split, header, rows)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def split_lines(lines):
    """-> (per-seed records, task summaries, the average line)."""
    records = [line for line in lines if not line.get("summary")]
    summaries = [line for line in lines if line.get("summary") and line["task"] != "average"]
    (average,) = [line for line in lines if line.get("task") == "average"]
    return records, summaries, average


@pytest.mark.skipif(not REAL_SST2.is_dir(), reason="real SST-2 not present")
def test_real_sst2_end_to_end(ckpts, tmp_path):
    out = tmp_path / "results.jsonl"
    lines = eval_glue.finetune_and_evaluate(cfg_for(
        ckpts["clustered"], REAL_SST2, out, "--max_train_examples=64", "--epochs=1",
        "--seeds=1"))
    assert read_jsonl(out) == lines
    records, (summary,), average = split_lines(lines)
    assert len(records) == 1
    record = records[0]
    assert record["task"] == "sst2" and record["split"] == "dev"
    assert 0 <= record["metrics"]["accuracy"] <= 1
    assert record["n_eval"] == 872 and record["n_train"] == 64
    assert record["moe"] == "clustered" and record["clustered"]
    assert record["max_len"] == 32  # capped at the checkpoint's block_size
    for key in ("ckpt", "seed", "epochs", "lr"):
        assert key in record
    accuracy = record["metrics"]["accuracy"]  # one seed: the mean is the value, no std
    assert summary["metrics"] == {"dev": {"accuracy": {"mean": accuracy, "std": None}}}
    assert summary["score"] == average["score"] == {"mean": accuracy, "std": None,
                                                    "values": [accuracy]}
    assert summary["moe"] == average["moe"] == "clustered" and summary["seeds"] == [1337]


def test_seeds_pair_task_and_regression_via_all(ckpts, tmp_path, capsys):
    write_rte(tmp_path / "glue")
    write_stsb(tmp_path / "glue")
    cfg = cfg_for(ckpts["dense"], tmp_path / "glue", tmp_path / "r.jsonl", "--task=all",
                  "--epochs=2", "--batch_size=8", "--lr=1e-3", "--seed=5")  # seeds=3 default
    lines = eval_glue.finetune_and_evaluate(cfg)
    printed = capsys.readouterr().out
    records, summaries, average = split_lines(lines)
    assert [(r["task"], r["split"], r["seed"]) for r in records] == \
        [("stsb", "dev", seed) for seed in (5, 6, 7)] + [("rte", "dev", seed) for seed in (5, 6, 7)]
    stsb, rte = records[0], records[3]
    assert set(stsb["metrics"]) == {"pearson", "spearman"}
    assert all(-1 <= v <= 1 for r in records[:3] for v in r["metrics"].values())
    assert set(rte["metrics"]) == {"accuracy"} and rte["n_eval"] == 8 and rte["n_train"] == 24
    assert stsb["moe"] == "dense" and not stsb["clustered"]
    assert len({r["metrics"]["pearson"] for r in records[:3]}) == 3  # the seeds really differ
    # Each summary against numpy over its task's per-seed records, and the score by hand.
    by_task = {"stsb": records[:3], "rte": records[3:]}
    scores = {"stsb": [(r["metrics"]["pearson"] + r["metrics"]["spearman"]) / 2
                       for r in by_task["stsb"]],
              "rte": [r["metrics"]["accuracy"] for r in by_task["rte"]]}
    assert [s["task"] for s in summaries] == ["stsb", "rte"]
    for summary in summaries:
        task_records = by_task[summary["task"]]
        assert summary["seeds"] == [5, 6, 7] and summary["n_eval"] == {"dev": 8}
        for name, stat in summary["metrics"]["dev"].items():
            values = [r["metrics"][name] for r in task_records]
            assert stat["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert stat["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert summary["score"]["values"] == pytest.approx(scores[summary["task"]], abs=1e-12)
        assert summary["score"]["std"] == pytest.approx(np.std(scores[summary["task"]], ddof=1))
    # The average: per seed the mean over tasks of the task scores, then mean/std over seeds.
    per_seed = (np.array(scores["stsb"]) + np.array(scores["rte"])) / 2
    assert average["tasks"] == ["stsb", "rte"] and average["seeds"] == [5, 6, 7]
    assert average["score"]["values"] == pytest.approx(per_seed, abs=1e-12)
    assert average["score"]["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert average["score"]["std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert average["score"]["mean"] == pytest.approx(
        np.mean([s["score"]["mean"] for s in summaries]), abs=1e-12)
    mean, std = average["score"]["mean"], average["score"]["std"]
    assert f"| average | {mean:.4f} ± {std:.4f} | over stsb, rte |" in printed
    assert "| stsb | " in printed and "pearson " in printed and "| rte | " in printed
    assert "skipped for missing data: cola (no train.tsv, dev.tsv in" in printed
    assert read_jsonl(tmp_path / "r.jsonl") == lines
    # A run of one seed alone gives that seed's record: each run starts from the checkpoint.
    alone = eval_glue.finetune_and_evaluate(cfg_for(
        ckpts["dense"], tmp_path / "glue", tmp_path / "r.jsonl", "--task=rte", "--epochs=2",
        "--batch_size=8", "--lr=1e-3", "--seed=6", "--seeds=1"))
    assert alone[0] == records[4]
    # Same config, same numbers; the run appends to the same log.
    assert eval_glue.finetune_and_evaluate(cfg) == lines
    assert read_jsonl(tmp_path / "r.jsonl") == lines + alone + lines


def test_glue_score():
    score = eval_glue.glue_score
    assert score("cola", {"dev": {"mcc": 0.3}}) == 0.3
    assert score("mrpc", {"dev": {"accuracy": 0.8, "f1": 0.9}}) == pytest.approx(0.85)
    assert score("stsb", {"dev": {"pearson": 0.5, "spearman": 0.7}}) == pytest.approx(0.6)
    assert score("mnli", {"dev_matched": {"accuracy": 0.7},
                          "dev_mismatched": {"accuracy": 0.8}}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="mnli is scored from .*dev_mismatched"):
        score("mnli", {"dev_matched": {"accuracy": 0.7}})
    with pytest.raises(ValueError, match="mrpc is scored from"):
        score("mrpc", {"dev": {"accuracy": 0.8}})
    # The GLUE leaderboard's BERT-large row (test sets): its score 80.5 is the mean of these.
    row = {"cola": {"mcc": 60.5}, "sst2": {"accuracy": 94.9},
           "mrpc": {"f1": 89.3, "accuracy": 85.4}, "stsb": {"pearson": 87.6, "spearman": 86.5},
           "qqp": {"f1": 72.1, "accuracy": 89.3}, "qnli": {"accuracy": 92.7},
           "rte": {"accuracy": 70.1}, "wnli": {"accuracy": 65.1}}
    tasks = [score(task, {"dev": metrics}) for task, metrics in row.items()]
    tasks.append(score("mnli", {"dev_matched": {"accuracy": 86.7},
                                "dev_mismatched": {"accuracy": 85.9}}))
    assert round(float(np.mean(tasks)), 1) == 80.5


def test_staged_and_listed_tasks(ckpts, tmp_path, monkeypatch, capsys):
    root = tmp_path / "glue"
    write_rte(root)
    write_stsb(root, n_train=8, n_dev=4)
    write_tsv(root / "QNLI", "dev", ("index", "question", "sentence", "label"),
              [(0, "why", "because", "entailment")])
    write_tsv(root / "MNLI", "train", ("a",), [])  # all but dev_mismatched.tsv
    write_tsv(root / "MNLI", "dev_matched", ("a",), [])
    (root / "CoLA").mkdir()  # a folder with no split file is not staged
    monkeypatch.setattr(glue, "fetch", lambda *args: pytest.fail("staged must not download"))
    out = tmp_path / "r.jsonl"
    plan = eval_glue.prepare(cfg_for(ckpts["dense"], root, out, "--task=staged", "--download"))
    assert plan["tasks"] == ["stsb", "rte"]  # GLUE's order
    assert plan["skipped"] == {"mnli": f"no dev_mismatched.tsv in {root / 'MNLI'}",
                               "qnli": f"no train.tsv in {root / 'QNLI'}"}
    lines = eval_glue.finetune_and_evaluate(cfg_for(
        ckpts["dense"], root, out, "--task=staged", "--seeds=2", "--epochs=1"), plan)
    records, summaries, average = split_lines(lines)
    assert len(records) == 4 and average["tasks"] == ["stsb", "rte"]
    assert f"qnli (no train.tsv in {root / 'QNLI'})" in capsys.readouterr().out
    # A list keeps its order, drops repeats, accepts the release's names; staged looks nowhere
    # else: a task folder as data_dir stages that one task.
    listed = cfg_for(ckpts["dense"], root, out, "--task=rte, STS-B,rte,qnli")
    assert eval_glue.prepare(listed)["tasks"] == ["rte", "stsb"]
    assert eval_glue.requested_tasks("rte, STS-B,rte") == ["rte", "stsb"]
    alone = cfg_for(ckpts["dense"], root / "RTE", out, "--task=staged")
    assert eval_glue.prepare(alone)["tasks"] == ["rte"]


@pytest.mark.parametrize("moe", ["clustered", "dense"])
def test_last_token_pooling_is_padding_invariant(ckpts, moe):
    gpt, _ = train.load_model(ckpts[moe])
    torch.manual_seed(0)
    model = GlueClassifier(gpt, 3).eval()
    short, long = [11, 22, 33, 44, 55], list(range(100, 112))
    idx, lengths = collate([short, long])
    assert idx.shape == (2, 12) and lengths.tolist() == [5, 12]
    assert idx[0, :5].tolist() == short
    with torch.no_grad():
        batched, _ = model(idx, lengths)
        alone_short, _ = model(torch.tensor([short]), torch.tensor([5]))
        alone_long, _ = model(torch.tensor([long]), torch.tensor([12]))
        # What the padded row's final (pad) position would give: must not be what we read.
        at_pad = model.head(model.gpt.hidden_states(idx)[0][0, -1])
    torch.testing.assert_close(batched[0], alone_short[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], alone_long[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], at_pad, atol=1e-4)


def test_learns_a_keyword_task(ckpts, tmp_path):
    """Label = which of 'good' / 'bad' the sentence holds: far above chance after fine-tuning."""
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randrange(2)
            words = rng.choices(WORDS, k=rng.randint(3, 8))
            words.insert(rng.randint(0, len(words)), ("bad", "good")[label])
            out.append((" ".join(words), label))
        return out
    for split, n in (("train", 256), ("dev", 128)):
        write_tsv(tmp_path / "SST-2", split, ("sentence", "label"), rows(n))
    records = eval_glue.finetune_and_evaluate(cfg_for(
        ckpts["clustered"], tmp_path / "SST-2", tmp_path / "r.jsonl", "--epochs=4",
        "--batch_size=16", "--lr=2e-3", "--warmup=0.1", "--seeds=1"))
    assert records[0]["n_eval"] == 128
    assert records[0]["metrics"]["accuracy"] >= 0.85


def test_download_fetches_only_missing_tasks(ckpts, tmp_path, monkeypatch):
    calls = []

    def fake_fetch(task, data_dir, base_url=None):
        calls.append(task)
        write_rte(Path(data_dir))
    monkeypatch.setattr(glue, "fetch", fake_fetch)
    cfg = cfg_for(ckpts["dense"], tmp_path / "glue", tmp_path / "r.jsonl", "--task=rte",
                  "--download", "--epochs=1", "--seeds=1")
    assert [r["task"] for r in eval_glue.finetune_and_evaluate(cfg)] == ["rte", "rte", "average"]
    assert eval_glue.prepare(cfg)["tasks"] == ["rte"] and calls == ["rte"]  # present: no refetch


def test_errors_before_any_work(ckpts, tmp_path):
    write_rte(tmp_path / "glue")
    out = tmp_path / "r.jsonl"

    def run(ckpt, *extra, data_dir=tmp_path / "glue"):
        eval_glue.finetune_and_evaluate(cfg_for(ckpt, data_dir, out, "--task=rte", *extra))
    with pytest.raises(ValueError, match="unknown GLUE task 'nope'; valid tasks: cola, sst2"):
        run(ckpts["dense"], "--task=nope")
    with pytest.raises(ValueError, match="unknown GLUE task 'nope'"):
        run(ckpts["dense"], "--task=rte,nope")
    with pytest.raises(ValueError, match="warmup"):
        run(ckpts["dense"], "--warmup=1.5")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        run(ckpts["dense"], "--seeds=0")
    with pytest.raises(FileNotFoundError, match=r"task=rte in .*empty.RTE.*--download.*--data_dir"):
        run(ckpts["dense"], data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no GLUE data for task=all.*--download"):
        run(ckpts["dense"], "--task=all", data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"task=staged in .*empty \(need train"):
        run(ckpts["dense"], "--task=staged", data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt not found"):
        run(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        run(corrupt)
    ckpt = torch.load(ckpts["clustered"], weights_only=True)
    ckpt["config"]["n_embd"] = 64  # the weights stay n_embd=32
    reshaped = tmp_path / "reshaped.pt"
    torch.save(ckpt, reshaped)
    with pytest.raises(RuntimeError, match=r"another shape: .*reshaped\.pt.*size mismatch"):
        run(reshaped)
    assert not out.exists()
    result = subprocess.run([sys.executable, "eval_glue.py", "--bad=1"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "valid keys: ckpt, task, data_dir" in result.stderr


def test_grid_glue_scores_run_as_subprocesses_and_resume(ckpts, tmp_path):
    """bench_quality.glue_scores: eval_glue.py per run (fine-tuning seed = training seed), the
    task score read back from its glue.jsonl; a run already scored is not fine-tuned again."""
    import shutil
    from benchmarks.quality import glue_scores
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpts["clustered"], run / "ckpt.pt")
    tc = TrainConfig(out_dir=str(run), seed=3, device="cpu")
    glue = {"task": "sst2", "data_dir": REAL_SST2, "epochs": 1, "max_train_examples": 32}
    (score,) = glue_scores([tc], glue, parallel=2)
    summary = next(r for r in read_jsonl(run / "glue.jsonl") if r.get("summary") and r["task"] == "sst2")
    assert score == summary["score"]["mean"] and 0 <= score <= 1 and summary["seeds"] == [3]
    stamp = (run / "glue.jsonl").stat().st_mtime_ns
    assert glue_scores([tc], glue) == [score]
    assert (run / "glue.jsonl").stat().st_mtime_ns == stamp
