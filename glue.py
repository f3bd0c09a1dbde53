"""GLUE: the nine tasks, their raw tsv files -> examples, their official metrics, and fetching.

Owns: one TaskSpec per task (folder, tsv columns, labels, metrics, eval splits, source url and
sha256), parsing the release's tsv files into (text_a, text_b, label) examples, GPT-2 encoding
of a sentence pair, the official metrics in plain numpy, and `fetch`, which downloads a task's
data through download.download (temp file + sha256) and download.safe_extract.
Does not own: the model, fine-tuning, or the CLI (eval_glue.py), nor generic downloading (download.py).

Layout: `data_dir` is either a GLUE root holding <Folder>/ (SST-2/, CoLA/, ...) or one task's
folder itself, named as in the release. Each split is <Folder>/<split>.tsv.

MRPC: GLUE never hosted it (licensing). Like the official download script and HF `datasets`,
`fetch('mrpc')` rebuilds it from the SentEval copy of msr_paraphrase_train.txt plus GLUE's list
of dev ids; both files are checked against published sha256s. The SentEval text is tokenized,
so it differs slightly from the .msi-based MRPC; to use that one, place MRPC/ by hand.
"""
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

import data
import download

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
# MRPC's dev split is the train pairs whose (#1 ID, #2 ID) is listed here.
MRPC_DEV_IDS_URL = GLUE_URL + "mrpc_dev_ids.tsv"
MRPC_DEV_IDS_SHA256 = "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7"


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's text and label sit in its tsv, and how the task is scored.

    Column indexes are 0-based; negative ones count from the end (MNLI's train and dev files
    have different column counts but both end with the gold label).
    """
    name: str
    folder: str
    labels: tuple[str, ...]       # label values as written in the tsv; position = class id
    label_names: tuple[str, ...]  # human-readable names, same order; () for regression
    metrics: tuple[str, ...]
    text_a: int
    text_b: int | None
    label: int
    url: str
    sha256: str | None
    n_columns: int | None = None  # set only for headerless files (CoLA); else the header's count
    eval_splits: tuple[str, ...] = ("dev",)

    @property
    def n_labels(self) -> int:
        """Output width of the head: number of classes, or 1 for regression (STS-B)."""
        return len(self.labels) or 1

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",) + self.eval_splits


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int | float


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
MNLI3 = ("contradiction", "entailment", "neutral")

# sha256s are the `download_checksums` recorded by HF datasets for these exact urls
# (huggingface/datasets, datasets/glue/dataset_infos.json).
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("cola", "CoLA", BINARY, ("unacceptable", "acceptable"), ("mcc",),
             text_a=3, text_b=None, label=1, n_columns=4, url=GLUE_URL + "CoLA.zip",
             sha256="f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"),
    TaskSpec("sst2", "SST-2", BINARY, ("negative", "positive"), ("accuracy",),
             text_a=0, text_b=None, label=1, url=GLUE_URL + "SST-2.zip",
             sha256="d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"),
    TaskSpec("mrpc", "MRPC", BINARY, ("not_equivalent", "equivalent"), ("accuracy", "f1"),
             text_a=3, text_b=4, label=0,
             url="https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
             sha256="60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89"),
    TaskSpec("stsb", "STS-B", (), (), ("pearson", "spearman"),
             text_a=7, text_b=8, label=-1, url=GLUE_URL + "STS-B.zip",
             sha256="e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85"),
    TaskSpec("qqp", "QQP", BINARY, ("not_duplicate", "duplicate"), ("accuracy", "f1"),
             text_a=3, text_b=4, label=5, url=GLUE_URL + "QQP-clean.zip",
             sha256="40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0"),
    TaskSpec("mnli", "MNLI", MNLI3, MNLI3, ("accuracy",),
             text_a=8, text_b=9, label=-1, eval_splits=("dev_matched", "dev_mismatched"),
             url=GLUE_URL + "MNLI.zip",
             sha256="e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633"),
    TaskSpec("qnli", "QNLI", NLI2, NLI2, ("accuracy",),
             text_a=1, text_b=2, label=-1, url=GLUE_URL + "QNLIv2.zip",
             sha256="e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5"),
    TaskSpec("rte", "RTE", NLI2, NLI2, ("accuracy",),
             text_a=1, text_b=2, label=-1, url=GLUE_URL + "RTE.zip",
             sha256="6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee"),
    TaskSpec("wnli", "WNLI", BINARY, ("not_entailment", "entailment"), ("accuracy",),
             text_a=1, text_b=2, label=-1, url=GLUE_URL + "WNLI.zip",
             sha256="ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46"),
]}


def get_task(task: str) -> TaskSpec:
    """'sst2', 'SST-2' and 'sst-2' all name the same task."""
    key = task.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


def task_dir(task: str, data_dir) -> Path:
    """The task's folder: <data_dir>/<Folder>, or data_dir itself when it is that folder.

    The folder must carry the release's name (case aside), so that pointing at SST-2/ while
    asking for CoLA fails loudly instead of parsing one task's files as another's.
    """
    spec, data_dir = get_task(task), Path(data_dir)
    if not (data_dir / spec.folder).is_dir() and data_dir.name.lower() == spec.folder.lower():
        return data_dir
    return data_dir / spec.folder


def _lines(path):
    """(line number, text) of each non-blank line, without its '\\n' or '\\r\\n'.

    newline='\\n' splits on '\\n' only: sentences may hold a lone '\\r' or U+2028, which
    universal newlines or str.splitlines would treat as row ends. utf-8-sig drops a BOM
    (SentEval's MRPC file starts with one).
    """
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n").removesuffix("\r")
            if line:
                yield number, line


def load_examples(task: str, split: str, data_dir) -> list[Example]:
    """Parse <Folder>/<split>.tsv into examples; labels become class ids (or floats for STS-B).

    Fields are split on tabs with no quote handling: GLUE sentences contain bare '"'.
    Rows with a column count other than the header's (QQP has a few) are skipped, and the
    number skipped is reported with a warning. An unknown label value is an error.
    """
    spec = get_task(task)
    if split not in spec.splits:
        raise ValueError(f"split {split!r} is not one of {spec.name}'s splits: {spec.splits}")
    folder = task_dir(spec.name, data_dir)
    path = folder / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (looked for {spec.name}'s {split} split in {folder}); run with "
            f"--download to fetch it, or pass --data_dir pointing at an existing GLUE folder "
            f"(one holding {spec.folder}/) or at the {spec.folder} folder itself")
    rows = _lines(path)
    n_columns = spec.n_columns
    if n_columns is None:
        _, header = next(rows, (0, ""))
        n_columns = len(header.split("\t"))
    class_id = {value: i for i, value in enumerate(spec.labels)}
    examples, skipped = [], []
    for number, line in rows:
        cols = line.split("\t")
        if len(cols) != n_columns:
            skipped.append(number)
            continue
        raw = cols[spec.label]
        try:
            label = class_id[raw] if spec.labels else float(raw)
        except (KeyError, ValueError):
            raise ValueError(f"{path}:{number}: label {raw!r} is not "
                             f"{spec.labels or 'a number'}") from None
        text_b = None if spec.text_b is None else cols[spec.text_b]
        examples.append(Example(cols[spec.text_a], text_b, label))
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} malformed rows (not {n_columns} "
                      f"tab-separated columns), first at lines {skipped[:5]}")
    return examples


def _source_url(url: str, base_url: str | None) -> str:
    return url if base_url is None else base_url.rstrip("/") + "/" + url.rsplit("/", 1)[1]


def _write_lines(path: Path, lines: list[str]) -> None:
    """Temp name + rename: a split file that exists is a complete one."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def _fetch_mrpc(spec: TaskSpec, folder: Path, downloads: Path, base_url: str | None) -> None:
    """Split SentEval's MRPC train file into GLUE's train.tsv / dev.tsv by the dev id list."""
    train_txt = download.download(_source_url(spec.url, base_url),
                              downloads / "msr_paraphrase_train.txt", spec.sha256)
    ids_tsv = download.download(_source_url(MRPC_DEV_IDS_URL, base_url),
                            downloads / "mrpc_dev_ids.tsv", MRPC_DEV_IDS_SHA256)
    dev_ids = {tuple(line.split("\t")[:2]) for _, line in _lines(ids_tsv)}
    (_, header), *rows = _lines(train_txt)
    is_dev = [tuple(line.split("\t")[1:3]) in dev_ids for _, line in rows]
    if sum(is_dev) != len(dev_ids):
        raise RuntimeError(f"{train_txt} holds {sum(is_dev)} of the {len(dev_ids)} MRPC dev "
                           f"pairs; is it SentEval's msr_paraphrase_train.txt?")
    folder.mkdir(parents=True, exist_ok=True)
    for split, keep in (("dev", True), ("train", False)):
        _write_lines(folder / f"{split}.tsv",
                     [header] + [line for (_, line), dev in zip(rows, is_dev) if dev == keep])
    train_txt.unlink()
    ids_tsv.unlink()


def fetch(task: str, data_dir, base_url: str | None = None) -> Path:
    """Make sure the task's split files exist under data_dir; download them if not.

    Zips go through download.download (progress bar, sha256, temp name) into <root>/downloads/,
    are extracted with download.safe_extract into a temporary folder next to the task folder, and
    each file is moved into place with a rename, so an interrupted fetch never leaves a
    truncated split behind. The zip is deleted once installed (MNLI's is 300 MB).
    `base_url` replaces the host and path of every source url (tests use a loopback server).
    Returns the task folder.
    """
    spec = get_task(task)
    folder = task_dir(spec.name, data_dir)
    if all((folder / f"{split}.tsv").is_file() for split in spec.splits):
        return folder
    downloads = folder.parent / "downloads"
    if spec.name == "mrpc":
        _fetch_mrpc(spec, folder, downloads, base_url)
        return folder
    archive = download.download(_source_url(spec.url, base_url),
                            downloads / spec.url.rsplit("/", 1)[1], spec.sha256,
                            desc=f"GLUE {spec.folder}")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".extract-") as tmp:
        download.safe_extract(archive, tmp)
        extracted = Path(tmp) / spec.folder
        missing = [s for s in spec.splits if not (extracted / f"{s}.tsv").is_file()]
        if missing:
            raise RuntimeError(f"{archive} has no {spec.folder}/{{{','.join(missing)}}}.tsv; "
                               f"is it the GLUE {spec.folder} zip?")
        for source in sorted(p for p in extracted.rglob("*") if p.is_file()):
            dest = folder / source.relative_to(extracted)
            if not dest.exists():  # never overwrite a file the user already has
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, dest)
    archive.unlink()
    return folder


def encode_pair(enc, text_a: str, text_b: str | None, max_len: int) -> list[int]:
    """GPT-2 ids of text_a, then <|endoftext|> as separator, then text_b; at most max_len ids.

    Truncation is longest-first, cutting tokens off the end of a side: the shorter side stays
    whole if it fits in half the budget, otherwise both get half (text_a the odd token). This
    keeps both sentences represented, where cutting only text_b could erase the hypothesis.
    A pair always keeps its separator, so a classifier can tell where text_b starts.
    """
    ids_a = enc.encode_ordinary(text_a)
    if text_b is None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        return ids_a[:max_len]
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 for a pair (separator + text), got {max_len}")
    ids_b = enc.encode_ordinary(text_b)
    budget = max_len - 1
    if len(ids_a) + len(ids_b) > budget:
        # text_b keeps all of itself if short, else all that a short text_a leaves, else half.
        keep_b = min(len(ids_b), max(budget // 2, budget - len(ids_a)))
        ids_a, ids_b = ids_a[:budget - keep_b], ids_b[:keep_b]
    return ids_a + [data.EOT] + ids_b


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equal, non-empty lengths; got {y_true.size} and {y_pred.size}")
    return y_true, y_pred


def _confusion(y_true, y_pred) -> tuple[float, float, float, float]:
    """(tp, tn, fp, fn) with 1 as the positive class, as floats so products cannot overflow."""
    truth, guess = (a == 1 for a in _pair(y_true, y_pred))
    return (float(np.sum(truth & guess)), float(np.sum(~truth & ~guess)),
            float(np.sum(~truth & guess)), float(np.sum(truth & ~guess)))


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def f1_binary(y_true, y_pred) -> float:
    """F1 of class 1; 0 when there are no true positives (precision or recall undefined/0)."""
    tp, _, fp, fn = _confusion(y_true, y_pred)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(y_true, y_pred) -> float:
    """Binary MCC; 0 when undefined (a constant prediction or a single-class truth)."""
    tp, tn, fp, fn = _confusion(y_true, y_pred)
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(x, y) -> float:
    """Pearson r; 0 when either side is constant (undefined), like MCC above."""
    x, y = (a.astype(np.float64) for a in _pair(x, y))
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / denominator) if denominator else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]  # each tie run covers sorted positions [start, end)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def spearman(x, y) -> float:
    x, y = _pair(x, y)
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"mcc": matthews_corrcoef, "accuracy": accuracy, "f1": f1_binary,
           "pearson": pearson, "spearman": spearman}


def compute_metrics(task: str, preds, labels) -> dict[str, float]:
    """The task's official metrics: class ids for classification, scores for STS-B."""
    return {name: METRICS[name](labels, preds) for name in get_task(task).metrics}
