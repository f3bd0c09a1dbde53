"""Tests for glue.py: metrics against hand-computed cases, each task's real tsv layout, the
real SST-2 files when present, fetch() over a loopback server, and encode_pair truncation.

Fixture rows imitate the release (same headers, column counts, label spellings) and carry
the awkward parts of real data: bare and unbalanced '"', a lone '\\r' and a U+2028 inside a
sentence, '\\r\\n' endings, malformed QQP rows. Expected metric values come from the
arithmetic in the comments, not from another library.
"""
import dataclasses
import math
import zipfile
from pathlib import Path

import pytest

import data
import download
import glue
from glue import Example

REAL_SST2 = Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2"


def tsv(*rows):
    return ["\t".join(row) for row in rows]


MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
                     "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + "label2 label3 label4 label5 gold_label".split()


def mnli_row(index, premise, hypothesis, gold, n_labels):
    return (str(index), "31193", f"{index}n", "government", "( ( x ) )", "( y )", "(ROOT x)",
            "(ROOT y)", premise, hypothesis) + (gold,) * n_labels + (gold,)


# task -> split -> (file lines, expected examples)
LAYOUTS = {
    "cola": {"train": (
        tsv(("gj04", "1", "", 'Our friends won\'t buy this "analysis".'),
            ("clc95", "0", "*", '"They drank the pub.'),
            ("bc01", "1", "", "The sailors rode the breeze clear of the rocks.")),
        [Example('Our friends won\'t buy this "analysis".', None, 1),
         Example('"They drank the pub.', None, 0),
         Example("The sailors rode the breeze clear of the rocks.", None, 1)])},
    "sst2": {"dev": (
        tsv(("sentence", "label"),
            ("it 's a charming and often affecting journey . ", "1"),
            ('" unflinchingly\rbleak and\u2028desperate ', "0"),
            ('the "best" film of the year . ', "1")),
        [Example("it 's a charming and often affecting journey . ", None, 1),
         Example('" unflinchingly\rbleak and\u2028desperate ', None, 0),
         Example('the "best" film of the year . ', None, 1)])},
    "mrpc": {"train": (
        tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            ("1", "702876", "702977", 'Amrozi called the witness "the liar" .', "He called him a liar ."),
            ("0", "2108705", "2108831", '"Yucaipa owned Dominick \'s .', "Yucaipa sold it .")),
        [Example('Amrozi called the witness "the liar" .', "He called him a liar .", 1),
         Example('"Yucaipa owned Dominick \'s .', "Yucaipa sold it .", 0)])},
    "stsb": {"dev": (
        tsv(("index", "genre", "filename", "year", "old_index", "source1", "source2",
             "sentence1", "sentence2", "score"),
            ("0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
             'A man with a "hard hat" is dancing.', "A man wearing a hard hat is dancing.",
             "5.000"),
            ("1", "main-news", "headlines", "2015", "0001", "none", "none",
             '"Obama signs bill', "Senate passes bill", "0.800")),
        [Example('A man with a "hard hat" is dancing.', "A man wearing a hard hat is dancing.", 5.0),
         Example('"Obama signs bill', "Senate passes bill", 0.8)])},
    "qqp": {"dev": (
        tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            ("201359", "303345", "303346", 'Why are "African-Americans" so beautiful?',
             "Why are hispanics so beautiful?", "0"),
            ("263843", "69383", "380476", "I want to pursue PhD in Computer Science",
             '"How do I get a PhD?', "1")),
        [Example('Why are "African-Americans" so beautiful?', "Why are hispanics so beautiful?", 0),
         Example("I want to pursue PhD in Computer Science", '"How do I get a PhD?', 1)])},
    "mnli": {
        "train": (
            tsv(MNLI_TRAIN_HEADER,
                mnli_row(0, 'He said, "go."', "He spoke.", "entailment", 1),
                mnli_row(1, "It rained.", '"It was dry.', "contradiction", 1)),
            [Example('He said, "go."', "He spoke.", 1),
             Example("It rained.", '"It was dry.', 0)]),
        "dev_matched": (
            tsv(MNLI_DEV_HEADER, mnli_row(0, "The cat sat.", 'A "cat" exists.', "neutral", 5)),
            [Example("The cat sat.", 'A "cat" exists.', 2)]),
        "dev_mismatched": (
            tsv(MNLI_DEV_HEADER, mnli_row(0, "Prices rose.", "Prices fell.", "contradiction", 5),
                mnli_row(1, '"Yes," she said.', "She agreed.", "entailment", 5)),
            [Example("Prices rose.", "Prices fell.", 0),
             Example('"Yes," she said.', "She agreed.", 1)])},
    "qnli": {"dev": (
        tsv(("index", "question", "sentence", "label"),
            ("0", 'What is "Notre Dame"?', "It is a university.", "entailment"),
            ("1", "Where is it?", '"Nowhere in particular.', "not_entailment")),
        [Example('What is "Notre Dame"?', "It is a university.", 0),
         Example("Where is it?", '"Nowhere in particular.', 1)])},
    "rte": {"train": (
        tsv(("index", "sentence1", "sentence2", "label"),
            ("0", 'No "Weapons of Mass Destruction" Found.', "Weapons Found.", "not_entailment"),
            ("1", "A place of sorrow.", "A place.", "entailment")),
        [Example('No "Weapons of Mass Destruction" Found.', "Weapons Found.", 1),
         Example("A place of sorrow.", "A place.", 0)])},
    "wnli": {"dev": (
        tsv(("index", "sentence1", "sentence2", "label"),
            ("0", 'The drain is clogged with hair. It has to be "cleaned".',
             "The hair has to be cleaned.", "0"),
            ("1", "Jane knocked on Susan's door.", '"Susan answered.', "1")),
        [Example('The drain is clogged with hair. It has to be "cleaned".',
                 "The hair has to be cleaned.", 0),
         Example("Jane knocked on Susan's door.", '"Susan answered.', 1)])},
}
CASES = [(task, split) for task, splits in LAYOUTS.items() for split in splits]


def write_task(root, task, split, lines, newline="\n"):
    folder = root / glue.TASKS[task].folder
    folder.mkdir(parents=True, exist_ok=True)
    # newline="" writes the given line endings untouched on every platform.
    with open(folder / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
        f.write(newline.join(lines) + newline)
    return folder


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def with_sha256(monkeypatch, task, path):
    spec = dataclasses.replace(glue.TASKS[task], sha256=download.sha256_file(path))
    monkeypatch.setitem(glue.TASKS, task, spec)


# ---- metrics --------------------------------------------------------------------------------

# y = [1,0,1,1,0], p = [1,1,1,0,0]: tp = 2 (idx 0, 2), fp = 1 (idx 1), fn = 1 (idx 3), tn = 1.
Y_TRUE, Y_PRED = [1, 0, 1, 1, 0], [1, 1, 1, 0, 0]


def test_accuracy_f1_mcc_hand_computed():
    assert glue.accuracy(Y_TRUE, Y_PRED) == pytest.approx(3 / 5)
    # F1 = 2tp / (2tp + fp + fn) = 4 / 6
    assert glue.f1_binary(Y_TRUE, Y_PRED) == pytest.approx(2 / 3)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert glue.matthews_corrcoef(Y_TRUE, Y_PRED) == pytest.approx(1 / 6)
    assert glue.matthews_corrcoef(Y_TRUE, Y_TRUE) == pytest.approx(1.0)
    assert glue.matthews_corrcoef(Y_TRUE, [1 - y for y in Y_TRUE]) == pytest.approx(-1.0)


def test_undefined_metrics_are_zero():
    assert glue.matthews_corrcoef(Y_TRUE, [1] * 5) == 0.0  # constant prediction
    assert glue.matthews_corrcoef([0] * 5, Y_PRED) == 0.0  # single-class truth
    assert glue.f1_binary(Y_TRUE, [0] * 5) == 0.0  # no true positives
    assert glue.pearson([1, 2, 3], [4, 4, 4]) == 0.0


def test_pearson_hand_computed():
    # dx = [-1.5,-.5,.5,1.5], dy = [-3,-1,0,4]: sum dx*dy = 11, sum dx^2 = 5, sum dy^2 = 26
    assert glue.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))


def test_spearman_average_ranks_for_ties():
    # sorted: 1,2,3,3,3 -> the three 3s span ranks 3,4,5 and share 4
    assert glue.average_ranks([3, 1, 3, 3, 2]).tolist() == [4, 1, 4, 4, 2]
    # ranks x = [1,2.5,2.5,4], y = [1,3,2,4]; dx = [-1.5,0,0,1.5], dy = [-1.5,.5,-.5,1.5]:
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert glue.spearman([10, 20, 20, 30], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    # monotone but not linear: spearman is exactly 1, pearson is not
    assert glue.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert glue.pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99


def test_compute_metrics_uses_each_tasks_official_set():
    expected_names = {"cola": {"mcc"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"},
                      "stsb": {"pearson", "spearman"}}
    for task in glue.TASKS:
        names = set(glue.compute_metrics(task, [0, 1], [0, 1]))
        assert names == expected_names.get(task, {"accuracy"}), task
    assert glue.compute_metrics("mrpc", Y_PRED, Y_TRUE) == pytest.approx(
        {"accuracy": 3 / 5, "f1": 2 / 3})
    assert glue.compute_metrics("cola", Y_PRED, Y_TRUE) == pytest.approx({"mcc": 1 / 6})
    assert glue.compute_metrics("stsb", [1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(
        {"pearson": 11 / math.sqrt(130), "spearman": 1.0})
    with pytest.raises(ValueError, match="equal"):
        glue.accuracy([0, 1], [0])


# ---- task table and parsing -------------------------------------------------------------------

def test_task_table():
    assert list(glue.TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert glue.TASKS["stsb"].n_labels == 1 and glue.TASKS["mnli"].n_labels == 3
    assert glue.TASKS["mnli"].eval_splits == ("dev_matched", "dev_mismatched")
    assert glue.get_task("SST-2") is glue.TASKS["sst2"]
    for spec in glue.TASKS.values():
        assert len(spec.label_names) == len(spec.labels)
        assert spec.sha256 is None or len(spec.sha256) == 64


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("task,split", CASES)
def test_parses_real_layout(tmp_path, task, split, newline):
    lines, expected = LAYOUTS[task][split]
    write_task(tmp_path, task, split, lines, newline)
    assert glue.load_examples(task, split, tmp_path) == expected


def test_qqp_malformed_rows_are_skipped_and_counted(tmp_path):
    lines, expected = LAYOUTS["qqp"]["dev"]
    broken = [lines[0], lines[1], "1\t2\t3\tquestion without a pair\t0",
              "4\t5\t6\ta\tb\t1\tstray column", lines[2]]
    write_task(tmp_path, "qqp", "dev", broken)
    with pytest.warns(UserWarning, match=r"skipped 2 malformed rows .*lines \[3, 4\]"):
        assert glue.load_examples("qqp", "dev", tmp_path) == expected


def test_unknown_label_is_an_error(tmp_path):
    write_task(tmp_path, "rte", "dev", tsv(("index", "sentence1", "sentence2", "label"),
                                           ("0", "a", "b", "neutral")))
    with pytest.raises(ValueError, match=r"dev.tsv:2: label 'neutral'"):
        glue.load_examples("rte", "dev", tmp_path)
    write_task(tmp_path, "stsb", "dev", LAYOUTS["stsb"]["dev"][0] + ["\t".join(["x"] * 10)])
    with pytest.raises(ValueError, match=r"dev.tsv:4: label 'x' is not a number"):
        glue.load_examples("stsb", "dev", tmp_path)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"):
        glue.load_examples("squad", "dev", tmp_path)
    with pytest.raises(ValueError, match="dev_matched"):
        glue.load_examples("mnli", "dev", tmp_path)
    with pytest.raises(FileNotFoundError) as missing:
        glue.load_examples("cola", "train", tmp_path)
    message = str(missing.value)
    assert str(tmp_path / "CoLA" / "train.tsv") in message
    assert "--download" in message and "--data_dir" in message


def test_task_dir_accepts_root_or_task_folder(tmp_path):
    lines, expected = LAYOUTS["sst2"]["dev"]
    folder = write_task(tmp_path, "sst2", "dev", lines)
    assert glue.task_dir("sst2", tmp_path) == folder
    assert glue.task_dir("sst2", folder) == folder
    assert glue.load_examples("sst2", "dev", folder) == expected
    # the SST-2 folder is not CoLA's folder: asking for CoLA there looks in SST-2/CoLA
    assert glue.task_dir("cola", folder) == folder / "CoLA"


@pytest.mark.skipif(not REAL_SST2.is_dir(), reason=f"real SST-2 not at {REAL_SST2}")
def test_real_sst2():
    train = glue.load_examples("sst2", "train", REAL_SST2)
    dev = glue.load_examples("sst2", "dev", REAL_SST2.parent)
    assert (len(train), len(dev)) == (67_349, 872)
    assert {ex.label for ex in train} == {0, 1} and {ex.label for ex in dev} == {0, 1}
    assert all(ex.text_a.strip() and ex.text_b is None for ex in train + dev)


# ---- fetch over a loopback server (serve_dir lives in conftest.py) -------------------------

SST2_ZIP = {"SST-2/train.tsv": "\n".join(LAYOUTS["sst2"]["dev"][0]) + "\n",
            "SST-2/dev.tsv": "\n".join(LAYOUTS["sst2"]["dev"][0]) + "\n",
            "SST-2/test.tsv": "index\tsentence\n0\tunlabelled .\n"}


def test_fetch_downloads_checks_and_extracts(serve_dir, tmp_path, monkeypatch):
    served, base_url = serve_dir
    with_sha256(monkeypatch, "sst2", make_zip(served / "SST-2.zip", SST2_ZIP))
    root = tmp_path / "glue"
    own_train = write_task(root, "sst2", "train", tsv(("sentence", "label"), ("mine . ", "1")))
    folder = glue.fetch("sst2", root, base_url=base_url)
    assert folder == root / "SST-2" and (folder / "test.tsv").is_file()
    assert glue.load_examples("sst2", "dev", root) == LAYOUTS["sst2"]["dev"][1]
    # a file the user already had is kept, not overwritten by the zip's copy
    assert glue.load_examples("sst2", "train", own_train) == [Example("mine . ", None, 1)]
    assert sorted(p.name for p in root.iterdir()) == ["SST-2", "downloads"]  # no temp left
    assert list((root / "downloads").iterdir()) == []
    (served / "SST-2.zip").unlink()  # a second fetch must not touch the network
    assert glue.fetch("sst2", root, base_url=base_url) == folder


def test_fetch_wrong_sha256_keeps_nothing(serve_dir, tmp_path):
    served, base_url = serve_dir
    make_zip(served / "SST-2.zip", SST2_ZIP)  # not the real zip, so the real sha256 fails
    root = tmp_path / "glue"
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        glue.fetch("sst2", root, base_url=base_url)
    assert list((root / "downloads").iterdir()) == []  # neither SST-2.zip nor a .part
    assert not (root / "SST-2").exists()


def test_fetch_refuses_escaping_zip_member(serve_dir, tmp_path, monkeypatch):
    served, base_url = serve_dir
    lines = "\n".join(LAYOUTS["rte"]["train"][0]) + "\n"
    members = {"RTE/train.tsv": lines, "RTE/dev.tsv": lines, "../evil.txt": "gotcha"}
    with_sha256(monkeypatch, "rte", make_zip(served / "RTE.zip", members))
    root = tmp_path / "glue"
    with pytest.raises(RuntimeError, match="unsafe path"):
        glue.fetch("rte", root, base_url=base_url)
    assert list(tmp_path.rglob("evil.txt")) == []
    assert not (root / "RTE").exists()


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
MRPC_ROWS = ["1\t10\t11\tA \"quoted\" one .\tA quoted one .", "0\t20\t21\tTwo .\tDeux .",
             "1\t30\t31\tThree .\tTrois .", "0\t40\t41\tFour .\tVier ."]


def serve_mrpc(served, monkeypatch, rows, dev_ids):
    # The SentEval file starts with a BOM; '\r\n' endings as in Windows-made files.
    (served / "msr_paraphrase_train.txt").write_bytes(
        ("\ufeff" + "\r\n".join([MRPC_HEADER] + rows) + "\r\n").encode())
    (served / "mrpc_dev_ids.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in dev_ids))
    with_sha256(monkeypatch, "mrpc", served / "msr_paraphrase_train.txt")
    monkeypatch.setattr(glue, "MRPC_DEV_IDS_SHA256", download.sha256_file(served / "mrpc_dev_ids.tsv"))


def test_fetch_mrpc_splits_senteval_file_by_dev_ids(serve_dir, tmp_path, monkeypatch):
    served, base_url = serve_dir
    serve_mrpc(served, monkeypatch, MRPC_ROWS, [(20, 21), (40, 41)])
    root = tmp_path / "glue"
    assert glue.fetch("mrpc", root, base_url=base_url) == root / "MRPC"
    assert glue.load_examples("mrpc", "dev", root) == [Example("Two .", "Deux .", 0),
                                                       Example("Four .", "Vier .", 0)]
    assert glue.load_examples("mrpc", "train", root) == [
        Example('A "quoted" one .', "A quoted one .", 1), Example("Three .", "Trois .", 1)]
    assert (root / "MRPC" / "dev.tsv").read_text().splitlines()[0] == MRPC_HEADER


def test_fetch_mrpc_refuses_a_file_missing_dev_pairs(serve_dir, tmp_path, monkeypatch):
    served, base_url = serve_dir
    serve_mrpc(served, monkeypatch, MRPC_ROWS, [(20, 21), (50, 51)])
    with pytest.raises(RuntimeError, match="1 of the 2 MRPC dev pairs"):
        glue.fetch("mrpc", tmp_path / "glue", base_url=base_url)
    assert not (tmp_path / "glue" / "MRPC").exists()


# ---- encode_pair -----------------------------------------------------------------------------

def test_encode_pair_truncation():
    enc = data.get_encoding()
    long_a, long_b = " ".join(["alpha"] * 50), " ".join(["beta"] * 30)
    full_a, full_b = enc.encode_ordinary(long_a), enc.encode_ordinary(long_b)
    assert (len(full_a), len(full_b)) == (50, 30)
    # both long: budget 20 split 10 / 10 around the separator
    ids = glue.encode_pair(enc, long_a, long_b, 21)
    assert ids == full_a[:10] + [data.EOT] + full_b[:10]
    # a short side stays whole; the long side takes what is left
    assert glue.encode_pair(enc, long_a, "beta beta", 16) == full_a[:13] + [data.EOT] + full_b[:2]
    assert glue.encode_pair(enc, "alpha", long_b, 16) == full_a[:1] + [data.EOT] + full_b[:14]
    # fits: nothing cut; single sentence: no separator
    assert glue.encode_pair(enc, "alpha", "beta", 100) == full_a[:1] + [data.EOT] + full_b[:1]
    assert glue.encode_pair(enc, long_a, None, 7) == full_a[:7]
    with pytest.raises(ValueError, match="max_len"):
        glue.encode_pair(enc, "a", "b", 1)


@pytest.mark.parametrize("len_a,len_b", [(0, 0), (3, 40), (40, 3), (25, 26), (60, 60)])
def test_encode_pair_keeps_separator_and_bound(len_a, len_b):
    enc = data.get_encoding()
    text_a, text_b = " ".join(["alpha"] * len_a), " ".join(["beta"] * len_b)
    full_a, full_b = enc.encode_ordinary(text_a), enc.encode_ordinary(text_b)
    for max_len in range(2, 130):
        ids = glue.encode_pair(enc, text_a, text_b, max_len)
        assert len(ids) == min(max_len, len_a + len_b + 1)
        assert ids.count(data.EOT) == 1
        cut = ids.index(data.EOT)
        assert ids[:cut] == full_a[:cut] and ids[cut + 1:] == full_b[:len(ids) - cut - 1]
        # longest first: neither side loses tokens while the other still exceeds it
        kept_a, kept_b = cut, len(ids) - cut - 1
        assert kept_a == len_a or kept_a >= min(kept_b, len_b)
        assert kept_b == len_b or kept_b >= min(kept_a, len_a) - 1
