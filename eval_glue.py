"""Fine-tune a pretrained checkpoint on GLUE over several seeds; report metrics and GLUE scores.

Owns: GlueConfig and its `--field=value` CLI, which tasks to run (one, a list, all, or all
staged on disk), the classifier (the pretrained GPT plus a linear head on the last real
token), padding and batching of encoded examples, the fine-tuning loop (AdamW, linear warmup
then linear decay, clipping, bf16 autocast on CUDA, the MoE aux loss kept on), evaluation on
the task's eval splits, GLUE's task score and their average, and the results: one JSON line
per task, split and seed in `out`, summary lines (mean and sample std over seeds), and a
markdown table at the end.
Does not own: task formats, pair encoding, metrics, downloads (glue.py); the network
(model.py); reading checkpoints (train.py). It never reclusters: a clustered checkpoint is
fine-tuned with the clusters it was saved with (cluster.py is not imported).
Usage: python eval_glue.py --ckpt=out/ckpt.pt --task=sst2 (or cola,stsb; all --download; staged)
"""
# cli first: it sets the CPU thread policy, which OpenMP reads once, as torch loads.
from cli import UsageError, check_rules, parse_config, resolve_device, run
from checkpoint import load_model
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import glue


@dataclass
class GlueConfig:
    ckpt: str = "out/ckpt.pt"       # a train.py checkpoint
    task: str = "sst2"              # a GLUE task (glue.TASKS), a,b,c, 'all', or 'staged'
    data_dir: str = "data/glue"     # GLUE root holding SST-2/, CoLA/, ... or one task's folder
    download: bool = False          # fetch missing task data with glue.fetch (sha256-checked)
    out: str = "glue_results.jsonl" # one JSON line per run, then a summary per task
    seed: int = 1337                # the runs use seed, seed+1, ..., seed+seeds-1
    seeds: int = 3                  # fine-tuning runs per task, each from the checkpoint
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = "auto"             # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    epochs: int = 3                 # passes over each task's training set
    lr: float = 1e-4                # above BERT's 2e-5..5e-5: our checkpoints are small
    batch_size: int = 32            # training examples per step
    eval_batch_size: int = 64       # dev examples per forward
    max_len: int = 128              # tokens per example, capped at the checkpoint's block_size
    weight_decay: float = 0.01      # AdamW's, on matrices only
    warmup: float = 0.1             # fraction of the steps spent in linear warmup
    grad_clip: float = 1.0          # 0 = off
    max_train_examples: int = 0     # 0 = all; else a seeded random subset (quick runs)

    def validate(self):
        requested_tasks(self.task)  # an unknown task's error lists the valid ones
        rules = [
            (self.seeds >= 1, "seeds must be >= 1"),
            (self.epochs >= 1 and self.lr > 0, "need epochs >= 1 and lr > 0"),
            (min(self.batch_size, self.eval_batch_size) >= 1, "batch sizes must be >= 1"),
            (self.max_len >= 2, "max_len must be >= 2 (a pair needs its separator)"),
            (min(self.weight_decay, self.grad_clip) >= 0, "weight_decay, grad_clip must be >= 0"),
            (0 <= self.warmup < 1, "warmup is a fraction of the steps, in [0, 1)"),
            (self.max_train_examples >= 0, "max_train_examples must be >= 0 (0 = all)"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
        ]
        check_rules(rules, "glue")
        return self


class GlueClassifier(nn.Module):
    """The pretrained GPT + a linear head on the hidden state of each sequence's last real token.

    Pooling: attention is causal, so only the last token has seen the whole input (for a pair,
    both sentences); any earlier position is blind to what follows it. GPT-1 and GPT-2
    classify from the last token for this reason. Mean pooling over real tokens would also
    work, but it averages in states that saw only a prefix. Right padding is free: pad
    positions come after every real token, so they change no real token's state.
    """

    def __init__(self, gpt, n_labels: int):
        super().__init__()
        self.gpt, self.head = gpt, nn.Linear(gpt.cfg.n_embd, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)  # small, like the GPT's own init
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, lengths):
        """idx (B, T) right-padded, lengths (B,) -> (logits (B, n_labels) float32, aux loss)."""
        hidden, aux = self.gpt.hidden_states(idx)                                   # (B, T, C)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]   # (B, C)
        return self.head(last).float(), aux


def encode(examples, max_len: int) -> list[list[int]]:
    # An empty sentence encodes to no ids, but pooling needs one position: give it <|endoftext|>.
    enc = data.get_encoding()
    return [glue.encode_pair(enc, ex.text_a, ex.text_b, max_len) or [data.EOT] for ex in examples]


def collate(seqs: list[list[int]], pad_id: int = data.EOT):
    """Right-pad to the longest sequence -> (idx (B, T) long, lengths (B,) long).

    The pad id is never read: causal attention keeps pads out of real tokens' view and the
    head reads position length-1. With capacity_factor > 0, though, pads would compete with
    real tokens for expert slots; our checkpoints default to dropless routing (0).
    """
    lengths = torch.tensor([len(seq) for seq in seqs])
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        idx[row, :len(seq)] = torch.tensor(seq)
    return idx, lengths


def build_batches(seqs, labels, batch_size: int, generator=None):
    """-> [(idx, lengths, labels)] in order, or shuffled by `generator` (a new order per call);
    labels are class ids (long) or STS-B scores (float32), as torch.tensor infers."""
    order = list(range(len(seqs))) if generator is None else \
        torch.randperm(len(seqs), generator=generator).tolist()
    chunks = (order[start:start + batch_size] for start in range(0, len(order), batch_size))
    return [(*collate([seqs[i] for i in chunk]), torch.tensor([labels[i] for i in chunk]))
            for chunk in chunks]


def task_loss(logits, labels, regression: bool):
    return F.mse_loss(logits.squeeze(-1), labels) if regression else F.cross_entropy(logits, labels)


def lr_factor(step: int, n_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at n_steps (BERT/GPT-1 fine-tuning)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (n_steps - step) / max(1, n_steps - warmup_steps)


def make_optimizer(model, cfg: GlueConfig, device: str):
    # Decay matrices only; biases and LayerNorm gains stay free, as in train.py.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.startswith("cuda"))


def requested_tasks(task: str) -> list[str]:
    """'all' and 'staged' -> every task (staged filters later, by what is on disk)."""
    if task in ("all", "staged"):
        return list(glue.TASKS)
    return list(dict.fromkeys(glue.get_task(name.strip()).name for name in task.split(",")))


def missing_splits(task: str, data_dir) -> list[str]:
    folder = glue.task_dir(task, data_dir)
    return [split for split in glue.get_task(task).splits
            if not (folder / f"{split}.tsv").is_file()]


def select_tasks(cfg: GlueConfig) -> tuple[list[str], dict[str, str]]:
    """-> (tasks to run, {skipped task: why}). 'staged' takes the tasks with every split on
    disk and never downloads; of the rest it notes only those staged in part (say dev alone),
    as a task with no file at all was simply not staged."""
    tasks, skipped = [], {}
    for task in requested_tasks(cfg.task):
        if missing_splits(task, cfg.data_dir) and cfg.download and cfg.task != "staged":
            glue.fetch(task, cfg.data_dir)
        missing = missing_splits(task, cfg.data_dir)
        if not missing:
            tasks.append(task)
        elif cfg.task != "staged" or len(missing) < len(glue.get_task(task).splits):
            files = ", ".join(f"{split}.tsv" for split in missing)
            skipped[task] = f"no {files} in {glue.task_dir(task, cfg.data_dir)}"
    return tasks, skipped


def load_pretrained(path: Path):
    """-> (GPT on CPU, checkpoint dict); a clear error for any checkpoint we cannot use."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train one with train.py "
                                f"or pass --ckpt=PATH")
    try:
        return load_model(path, "cpu")
    except (KeyError, TypeError) as error:  # no 'model'/'config', or fields train.py lacks
        raise RuntimeError(f"cannot use checkpoint {path}: {error!r}; is it from this "
                           f"project's train.py?") from None
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise  # train.load_model's own 'cannot read checkpoint' is clear already
        detail = (str(error).splitlines()[1:2] or [""])[0].strip()
        raise RuntimeError(f"checkpoint of another shape: the weights in {path} do not fit "
                           f"its own config ({detail})") from None


def prepare(cfg: GlueConfig) -> dict:
    """Every check that can fail, before any fine-tuning: device, checkpoint, data.
    The checkpoint is read first, so a bad one fails before a long download, not after."""
    cfg.validate()
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    gpt, ckpt = load_pretrained(Path(cfg.ckpt))
    tasks, skipped = select_tasks(cfg)
    if not tasks:  # the one task asked for is missing, or every one of several is
        requested = requested_tasks(cfg.task)
        where = cfg.data_dir if len(requested) > 1 else glue.task_dir(requested[0], cfg.data_dir)
        raise FileNotFoundError(
            f"no GLUE data for task={cfg.task} in {where} (need train.tsv and the dev split "
            f"files); run with --download to fetch it, or pass --data_dir pointing at a GLUE "
            f"folder (one holding SST-2/, RTE/, ...) or at the task's own folder")
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16")
    return {"gpt": gpt, "ckpt": ckpt, "device": device, "autocast": autocast, "tasks": tasks,
            "skipped": skipped}


@torch.no_grad()
def predict(model, batches, regression: bool, device, autocast, desc: str) -> np.ndarray:
    """Regression output for STS-B, argmax class id otherwise."""
    model.eval()
    preds = []
    for idx, lengths, _ in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
        with autocast:
            logits, _ = model(idx.to(device), lengths.to(device))
        preds.append(logits[:, 0] if regression else logits.argmax(-1))
    model.train()
    return torch.cat(preds).cpu().numpy()


def finetune(model, seqs, labels, cfg: GlueConfig, regression: bool, device, autocast,
             generator, desc: str) -> None:
    """Train in place: `epochs` of freshly shuffled batches, linear warmup then decay."""
    optimizer = make_optimizer(model, cfg, device)
    n_steps = cfg.epochs * math.ceil(len(seqs) / cfg.batch_size)
    warmup_steps = int(cfg.warmup * n_steps)
    model.train()
    bar, step = tqdm(total=n_steps, desc=desc, dynamic_ncols=True), 0
    for epoch in range(cfg.epochs):
        for idx, lengths, targets in build_batches(seqs, labels, cfg.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, n_steps, warmup_steps)
            with autocast:
                logits, aux = model(idx.to(device), lengths.to(device))
            # The aux loss stays on, as in pretraining: the task loss alone lets the routers
            # drift onto a few experts. Pads are routed and counted too, a small bias we accept.
            loss = task_loss(logits, targets.to(device), regression) + aux.float()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if step % 20 == 0 or step == n_steps:  # .item() syncs the GPU: only now and then
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"{desc}: non-finite loss {value} at step {step}")
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
    bar.close()


def run_task(task: str, cfg: GlueConfig, plan: dict, seed: int) -> list[dict]:
    """Fine-tune a fresh copy of the pretrained GPT on `task`; one record per eval split."""
    spec, gpt, device, autocast = glue.get_task(task), plan["gpt"], plan["device"], plan["autocast"]
    regression, max_len = spec.n_labels == 1, min(cfg.max_len, gpt.cfg.block_size)
    # Seed per run, so a result does not depend on which tasks or seeds ran before it.
    # The seed also draws the --max_train_examples subset: a run's randomness is all its own.
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_examples = glue.load_examples(task, "train", cfg.data_dir)
    if 0 < cfg.max_train_examples < len(train_examples):
        keep = torch.randperm(len(train_examples), generator=generator)[:cfg.max_train_examples]
        train_examples = [train_examples[i] for i in sorted(keep.tolist())]
    model = GlueClassifier(copy.deepcopy(gpt), spec.n_labels).to(device)
    finetune(model, encode(train_examples, max_len), [ex.label for ex in train_examples],
             cfg, regression, device, autocast, generator, f"{task} fine-tune (seed {seed})")
    records = []
    clustered = any(layer.compressed for layer in gpt.moe_layers())
    for split in spec.eval_splits:
        examples = glue.load_examples(task, split, cfg.data_dir)
        labels = [ex.label for ex in examples]
        batches = build_batches(encode(examples, max_len), labels, cfg.eval_batch_size)
        preds = predict(model, batches, regression, device, autocast, f"{task} {split}")
        records.append({
            "task": task, "split": split, "metrics": glue.compute_metrics(task, preds, labels),
            "n_train": len(train_examples), "n_eval": len(examples), "ckpt": str(cfg.ckpt),
            "moe": plan["ckpt"]["config"].get("moe"), "clustered": clustered, "seed": seed,
            "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "max_len": max_len})
    return records


def glue_score(task: str, metrics: dict[str, dict[str, float]]) -> float:
    """GLUE's score for one task from {eval split: its metrics}: the plain mean of the task's
    metrics over its eval splits. So CoLA: MCC; SST-2, QNLI, RTE, WNLI: accuracy; MRPC, QQP:
    (F1 + accuracy) / 2; STS-B: (Pearson + Spearman) / 2; MNLI: (matched + mismatched
    accuracy) / 2. The leaderboard takes MNLI so: its 80.5 for BERT-large follows from that
    row's numbers only with MNLI-m and MNLI-mm as one task at their mean."""
    spec = glue.get_task(task)
    if set(metrics) != set(spec.eval_splits) or any(
            set(metrics[split]) != set(spec.metrics) for split in spec.eval_splits):
        raise ValueError(f"{spec.name} is scored from {spec.metrics} on each of "
                         f"{spec.eval_splits}; got {metrics}")
    return float(np.mean([[metrics[split][name] for name in spec.metrics]
                          for split in spec.eval_splits]))


def mean_std(values) -> dict:
    """Mean and sample std (ddof=1) over seeds; std is None for a single seed."""
    values = np.asarray(values, dtype=np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std}


def summarize_task(records: list[dict]) -> dict:
    """One task's records (every split, every seed) -> its summary line: each split's metrics
    as mean/std over seeds, and GLUE's task score per seed ('values', in seed order)."""
    task, seeds = records[0]["task"], list(dict.fromkeys(rec["seed"] for rec in records))
    spec = glue.get_task(task)
    metrics = {split: {name: mean_std([rec["metrics"][name] for rec in records
                                       if rec["split"] == split]) for name in spec.metrics}
               for split in spec.eval_splits}
    scores = [glue_score(task, {rec["split"]: rec["metrics"] for rec in records
                                if rec["seed"] == seed}) for seed in seeds]
    context = {key: value for key, value in records[0].items()
               if key not in ("split", "metrics", "seed", "n_eval")}
    n_eval = {rec["split"]: rec["n_eval"] for rec in records}
    return {"summary": True, **context, "seeds": seeds, "n_eval": n_eval, "metrics": metrics,
            "score": {**mean_std(scores), "values": scores}}


def summarize_average(summaries: list[dict]) -> dict:
    """The GLUE average over the tasks run: per seed the mean of the task scores, then the
    mean/std of those averages over seeds (not a mean of the tasks' own stds)."""
    per_seed = np.mean([summary["score"]["values"] for summary in summaries], axis=0)
    context = {key: summaries[0][key] for key in ("seeds", "ckpt", "moe", "clustered")}
    return {"summary": True, "task": "average", "tasks": [s["task"] for s in summaries],
            **context, "score": {**mean_std(per_seed), "values": per_seed.tolist()}}


def format_stat(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± " + ("n/a" if stat["std"] is None else f"{stat['std']:.4f}")


def format_table(summaries: list[dict], average: dict) -> str:
    seeds = f"{len(average['seeds'])} seed" + "s" * (len(average["seeds"]) > 1)
    lines = [f"| task | GLUE score | metrics (mean ± sample std over {seeds}) | n_train "
             f"| n_eval |", "| --- | --- | --- | --- | --- |"]
    for summary in summaries:
        named = len(summary["metrics"]) > 1  # name the split only where there are several
        metrics = "; ".join(f"{split + ' ' if named else ''}{name} {format_stat(stat)}"
                            for split, by_name in summary["metrics"].items()
                            for name, stat in by_name.items())
        n_eval = "/".join(str(n) for n in summary["n_eval"].values())
        lines.append(f"| {summary['task']} | {format_stat(summary['score'])} | {metrics} "
                     f"| {summary['n_train']} | {n_eval} |")
    lines.append(f"| average | {format_stat(average['score'])} | "
                 f"over {', '.join(average['tasks'])} | | |")
    return "\n".join(lines)


def append_jsonl(path, lines: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def finetune_and_evaluate(cfg: GlueConfig, plan: dict | None = None) -> list[dict]:
    """Fine-tune a fresh copy of the checkpoint per task and seed; append each record to
    cfg.out as it is made, then each task's summary and the average. Returns what it wrote."""
    plan = prepare(cfg) if plan is None else plan
    skipped = ", ".join(f"{task} ({why})" for task, why in plan["skipped"].items())
    if skipped:
        print(f"skipping for missing data (--task=NAME --download fetches it): {skipped}")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    written, summaries = [], []
    for task in plan["tasks"]:
        records = []
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            seed_records = run_task(task, cfg, plan, seed)
            append_jsonl(cfg.out, seed_records)  # at once: a late failure keeps finished runs
            records += seed_records
        summaries.append(summarize_task(records))
        append_jsonl(cfg.out, summaries[-1:])
        written += records + summaries[-1:]
    average = summarize_average(summaries)
    append_jsonl(cfg.out, [average])
    print(format_table(summaries, average))
    print("GLUE score: a task's metrics averaged (MRPC, QQP: F1 and accuracy; STS-B: Pearson "
          "and Spearman; MNLI: matched and mismatched); average: of the task scores per seed.")
    if skipped:
        print(f"skipped for missing data: {skipped}")
    return written + [average]


def main(argv: list[str]) -> list[dict]:
    cfg = parse_config(GlueConfig, argv)
    try:
        plan = prepare(cfg)
    except (OSError, RuntimeError) as error:  # files and downloads: the user's to fix
        raise UsageError(str(error)) from None
    return finetune_and_evaluate(cfg, plan)


if __name__ == "__main__":
    run(main, sys.argv[1:])
