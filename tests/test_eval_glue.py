"""eval_glue.py on CPU with tiny checkpoints: real SST-2 end to end, a pair task and STS-B
from fixture folders, padding invariance of last-token pooling against each sequence run
alone, a keyword task it must learn, determinism, and clear errors before any work.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_glue
import glue
import train
from eval_glue import GlueClassifier, GlueConfig, collate
from train import TrainConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
REAL_SST2 = Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2"
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=32", "--n_experts=4",
        "--n_clusters=2", "--rank=2", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--device=cpu", "--lr_warmup=2", "--lr=3e-3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{'clustered': path, 'dense': path}: a few iterations each on Tiny Shakespeare."""
    root = tmp_path_factory.mktemp("pretrain")
    paths = {}
    for moe, extra in [("clustered", ["--warmup_iters=2", "--recluster_interval=100"]),
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


@pytest.mark.skipif(not REAL_SST2.is_dir(), reason="real SST-2 not present")
def test_real_sst2_end_to_end(ckpts, tmp_path):
    out = tmp_path / "results.jsonl"
    records = eval_glue.finetune_and_evaluate(cfg_for(
        ckpts["clustered"], REAL_SST2, out, "--max_train_examples=64", "--epochs=1"))
    assert read_jsonl(out) == records and len(records) == 1
    record = records[0]
    assert record["task"] == "sst2" and record["split"] == "dev"
    assert 0 <= record["metrics"]["accuracy"] <= 1
    assert record["n_eval"] == 872 and record["n_train"] == 64
    assert record["moe"] == "clustered" and record["clustered"]
    assert record["max_len"] == 32  # capped at the checkpoint's block_size
    for key in ("ckpt", "seed", "epochs", "lr"):
        assert key in record


def test_pair_task_and_regression_via_all(ckpts, tmp_path, capsys):
    write_rte(tmp_path / "glue")
    write_stsb(tmp_path / "glue")
    cfg = cfg_for(ckpts["dense"], tmp_path / "glue", tmp_path / "r.jsonl", "--task=all",
                  "--epochs=2", "--batch_size=8", "--lr=1e-3")
    records = eval_glue.finetune_and_evaluate(cfg)
    printed = capsys.readouterr().out
    assert [(r["task"], r["split"]) for r in records] == [("stsb", "dev"), ("rte", "dev")]
    stsb, rte = records
    assert set(stsb["metrics"]) == {"pearson", "spearman"}
    assert all(-1 <= v <= 1 for v in stsb["metrics"].values())
    assert set(rte["metrics"]) == {"accuracy"} and rte["n_eval"] == 8 and rte["n_train"] == 24
    assert stsb["moe"] == "dense" and not stsb["clustered"]
    assert "| stsb | dev | pearson" in printed and "| rte | dev | accuracy" in printed
    assert "skipped for missing data: cola, sst2, mrpc, qqp, mnli, qnli, wnli" in printed
    # Same config, same numbers; the second run appends to the same log.
    assert eval_glue.finetune_and_evaluate(cfg) == records
    assert read_jsonl(tmp_path / "r.jsonl") == records + records


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
        "--batch_size=16", "--lr=2e-3", "--warmup=0.1"))
    assert records[0]["n_eval"] == 128
    assert records[0]["metrics"]["accuracy"] >= 0.85


def test_download_fetches_only_missing_tasks(ckpts, tmp_path, monkeypatch):
    calls = []

    def fake_fetch(task, data_dir, base_url=None):
        calls.append(task)
        write_rte(Path(data_dir))
    monkeypatch.setattr(glue, "fetch", fake_fetch)
    cfg = cfg_for(ckpts["dense"], tmp_path / "glue", tmp_path / "r.jsonl", "--task=rte",
                  "--download", "--epochs=1")
    assert [r["task"] for r in eval_glue.finetune_and_evaluate(cfg)] == ["rte"]
    assert eval_glue.prepare(cfg)["tasks"] == ["rte"] and calls == ["rte"]  # present: no refetch


def test_errors_before_any_work(ckpts, tmp_path):
    write_rte(tmp_path / "glue")
    out = tmp_path / "r.jsonl"

    def run(ckpt, *extra, data_dir=tmp_path / "glue"):
        eval_glue.finetune_and_evaluate(cfg_for(ckpt, data_dir, out, "--task=rte", *extra))
    with pytest.raises(ValueError, match="unknown GLUE task 'nope'; valid tasks: cola, sst2"):
        run(ckpts["dense"], "--task=nope")
    with pytest.raises(ValueError, match="warmup"):
        run(ckpts["dense"], "--warmup=1.5")
    with pytest.raises(FileNotFoundError, match=r"task=rte in .*empty.RTE.*--download.*--data_dir"):
        run(ckpts["dense"], data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no GLUE data for task=all.*--download"):
        run(ckpts["dense"], "--task=all", data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt not found"):
        run(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
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
