"""data.py: tokenizer ids, preparation, batches, and the download path over loopback HTTP."""
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import corpus
import data
import download

ARTICLES = " = Alpha = \n \n Alpha is a letter .\n = = History = = \n It is old .\n" \
           " = Beta = \n \n Beta follows \"alpha\" .\n"


def test_gpt2_ids():
    enc = data.get_encoding()
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257
    assert enc.decode(enc.encode("Tiny Shakespeare, 1,115,394 bytes")) == "Tiny Shakespeare, 1,115,394 bytes"


def test_shakespeare_prepares_once(tmp_path):
    folder = data.prepare("shakespeare", tmp_path)
    meta = data.read_meta(folder)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 338025  # PROVENANCE.md
    assert meta["val_split"] == "tail"
    train = data.load_split(folder, "train")
    assert train.dtype == np.uint16 and len(train) == meta["tokens"]["train"]
    stamp = (folder / "train.bin").stat().st_mtime_ns
    data.prepare("shakespeare", tmp_path)
    assert (folder / "train.bin").stat().st_mtime_ns == stamp


def test_get_batch_windows_are_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 4, 16, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y - x, torch.ones_like(x))
    with pytest.raises(ValueError, match="fewer than block_size"):
        data.get_batch(tokens[:10], 1, 16, "cpu", torch.Generator())


def _wikitext_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-103-raw/wiki.{split}.raw", ARTICLES)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wikitext103_download_prepare_and_reuse(serve_dir, tmp_path):
    served, base = serve_dir
    sha = _wikitext_zip(served / "wt.zip")
    folder = data.prepare_wikitext103(tmp_path / "d", url=f"{base}/wt.zip", sha256=sha)
    meta = json.loads((folder / "meta.json").read_text())
    enc = data.get_encoding()
    expected = []
    for article in download.wikitext_articles(ARTICLES):
        expected += enc.encode_ordinary(article) + [data.EOT]
    assert len(download.wikitext_articles(ARTICLES)) == 2                # section heading kept inside
    for split in ("train", "val", "test"):
        assert data.load_split(folder, split).tolist() == expected
    assert meta["sha256"] == sha and meta["tokens"]["val"] == len(expected)
    (served / "wt.zip").unlink()                                     # second run: no network
    assert data.prepare_wikitext103(tmp_path / "d", url=f"{base}/wt.zip", sha256=sha) == folder


def test_checksum_mismatch_leaves_nothing(serve_dir, tmp_path):
    served, base = serve_dir
    _wikitext_zip(served / "wt.zip")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        data.prepare_wikitext103(tmp_path / "d", url=f"{base}/wt.zip", sha256="0" * 64)
    assert not list((tmp_path / "d" / "downloads").iterdir())
    assert not (tmp_path / "d" / "wikitext103" / "meta.json").exists()


def test_safe_extract_refuses_escaping_members(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.txt", "x")
    with pytest.raises(RuntimeError, match="unsafe path"):
        download.safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def _doc(i: int, n_lines: int = 30) -> str:
    """A document of unique lines of varied length (a line never repeats across documents)."""
    return "".join(f"doc {i} line {j}: " + "word " * ((7 * j + i) % 11) + "\n"
                   for j in range(n_lines))


def _books(folder, n_docs, n_lines=30):
    folder.mkdir(parents=True)
    for i in range(n_docs):
        (folder / f"book{i:03d}.txt").write_text(_doc(i, n_lines))
    return folder


def _zip(path, docs: dict[str, str]):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in docs.items():
            z.writestr(name, text)
    return path


def _decoded(folder, split) -> list[str]:
    """The documents of a prepared split, decoded (the final <|endoftext|> ends the last)."""
    text = data.get_encoding().decode(data.load_split(folder, split).tolist())
    assert text.endswith("<|endoftext|>")
    return text.split("<|endoftext|>")[:-1]


def _assert_no_val_line_in_train(folder):
    train_lines = {line for doc in _decoded(folder, "train") for line in doc.splitlines()}
    val_lines = [line for doc in _decoded(folder, "val") for line in doc.splitlines()
                 if line.strip()]
    assert val_lines and not any(line in train_lines for line in val_lines)


def test_tail_cut_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        lines = ["x" * int(n) for n in rng.integers(0, 30, rng.integers(1, 12))]
        text = "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")
        fraction = float(rng.uniform(0.05, 0.5))
        target = round(len(text) * (1 - fraction))
        starts = [i + 1 for i, ch in enumerate(text) if ch == "\n"] + [len(text)]
        expected = min((s for s in starts if s > 0), key=lambda s: (abs(s - target), -s))
        assert corpus.tail_cut(text, fraction) == min(expected, len(text)), (text, fraction)
    assert corpus.tail_cut("one line, no newline", 0.1) == len("one line, no newline")


def test_tail_holds_out_the_end_of_every_document(tmp_path):
    src = _books(tmp_path / "books", 5)
    folder = data.prepare(str(src), tmp_path / "d")                     # 5 documents: auto -> tail
    meta = data.read_meta(folder)
    assert folder.name == "text_books_tail" and meta["val_split"] == "tail"
    assert meta["val_fraction"] == 0.1 and meta["documents_without_tail"] == []
    train, val = _decoded(folder, "train"), _decoded(folder, "val")
    assert len(train) == len(val) == 5
    for i in range(5):
        text = _doc(i)
        assert train[i] + val[i] == text and train[i].endswith("\n")  # cut at a line start
        assert abs(len(val[i]) / len(text) - 0.1) < 0.05                # ~val_fraction of each
    _assert_no_val_line_in_train(folder)


def test_tail_needs_a_line_to_cut(tmp_path):
    src = tmp_path / "short"
    src.mkdir()
    (src / "a.txt").write_text("one line only")
    (src / "b.txt").write_text(_doc(1))
    folder = data.prepare(str(src), tmp_path / "d", val_split="tail")
    assert data.read_meta(folder)["documents_without_tail"] == ["short/a.txt"]
    assert "one line only" in _decoded(folder, "train")
    (src / "b.txt").write_text("also one line")
    with pytest.raises(ValueError, match="holds out nothing"):
        data.prepare(str(src), tmp_path / "e", val_split="tail")


def test_documents_holds_out_whole_files(tmp_path):
    src = _books(tmp_path / "books", 10)
    folder = data.prepare(str(src), tmp_path / "d", val_split="documents")
    meta = data.read_meta(folder)
    assert folder.name == "text_books_documents" and meta["val_split"] == "documents"
    assert len(meta["val_documents"]) == 1
    held = meta["val_documents"][0]
    assert held.startswith("books/book")                              # prefixed by source stem
    assert _decoded(folder, "val") == [(src / held.removeprefix("books/")).read_text()]
    assert sorted(_decoded(folder, "train")) == sorted(
        _doc(i) for i in range(10) if f"books/book{i:03d}.txt" != held)
    _assert_no_val_line_in_train(folder)


@pytest.mark.parametrize("n_docs, expected", [(corpus.AUTO_DOCUMENTS_MIN - 1, "tail"),
                                              (corpus.AUTO_DOCUMENTS_MIN, "documents")])
def test_auto_picks_by_document_count(tmp_path, n_docs, expected):
    src = _books(tmp_path / "books", n_docs, n_lines=3)
    folder = data.prepare(str(src), tmp_path / "d")
    assert data.read_meta(folder)["val_split"] == expected
    assert folder.name == f"text_books_{expected}"
    _assert_no_val_line_in_train(folder)


def test_switching_split_never_reuses_a_folder(tmp_path):
    src = _books(tmp_path / "books", 4)
    tail = data.prepare(str(src), tmp_path / "d", val_split="tail")
    docs = data.prepare(str(src), tmp_path / "d", val_split="documents")
    other = data.prepare(str(src), tmp_path / "d", val_split="tail", val_fraction=0.2)
    assert len({tail, docs, other}) == 3
    splits = [data.read_meta(f)["val_split"] for f in (tail, docs, other)]
    assert splits == ["tail", "documents", "tail"]
    assert data.read_meta(other)["val_fraction"] == 0.2
    stamp = (tail / "meta.json").stat().st_mtime_ns
    assert data.prepare(str(src), tmp_path / "d") == tail        # auto resolves to tail: reused
    assert (tail / "meta.json").stat().st_mtime_ns == stamp


def test_several_zips_comma_list_equals_folder_of_zips(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _zip(shards / "wiki-01.zip", {f"{i:08d}.txt": _doc(i) for i in range(3)})
    _zip(shards / "wiki-00.zip", {f"{i:08d}.txt": _doc(10 + i) for i in range(3)} |
         {"__MACOSX/._x.txt": "junk", "README": "not a document"})
    listed = data.prepare(f"{shards / 'wiki-01.zip'}, {shards / 'wiki-00.zip'}", tmp_path / "a")
    whole = data.prepare(str(shards), tmp_path / "b")
    assert listed.name == whole.name == "text_wiki-00+wiki-01_tail"
    for split in ("train", "val"):
        assert np.array_equal(data.load_split(listed, split), data.load_split(whole, split))
    assert len(_decoded(whole, "val")) == 6                           # every document of both
    docs = data.prepare(str(shards), tmp_path / "b", val_split="documents")
    held = data.read_meta(docs)["val_documents"]
    assert len(held) == 1 and held[0].split("/")[0] in ("wiki-00", "wiki-01")
    assert data.read_meta(docs)["sources"] == [str(shards / f"wiki-0{i}.zip") for i in (0, 1)]


def test_folder_name_stays_short_for_many_sources():
    sources = [Path(f"/corpus/enwiki-{i:02d}.zip") for i in range(40)]
    name = corpus.text_folder_name(sources, "documents", 0.1)
    assert len(name) < 64 and name.startswith("text_enwiki-00+39more-")
    assert name.endswith("_documents")
    other = sources[:39] + [Path("/corpus/other.zip")]
    assert name != corpus.text_folder_name(other, "documents", 0.1)
    assert corpus.text_folder_name(sources[:2], "tail", 0.05) == "text_enwiki-00+enwiki-01_tail0.05"


def test_check_dataset_errors(tmp_path):
    books = _books(tmp_path / "books", 2)
    shard = _zip(tmp_path / "shard.zip", {"a.txt": _doc(0)})
    for ok in ("shakespeare", "wikitext103", str(books), f"{books},{shard}"):
        data.check_dataset(ok)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    mixed = _books(tmp_path / "mixed", 1)
    _zip(mixed / "more.zip", {"b.txt": _doc(1)})
    _zip(tmp_path / "books.zip", {"c.txt": _doc(2)})
    for dataset, message in [("no-such-corpus", "does not exist"),
                             (f"{books},{tmp_path / 'gone.zip'}", "gone.zip' does not exist"),
                             (str(tmp_path / "empty"), "no .txt or .zip"),
                             (str(tmp_path / "notes.md"), "neither a folder nor a .zip"),
                             (str(mixed), "both .txt and .zip"),
                             (f"{books},{tmp_path / 'books.zip'}", "share a name"),
                             (" , ", "no dataset path")]:
        with pytest.raises(ValueError, match=message):
            data.check_dataset(dataset)
    with pytest.raises(ValueError, match="val_split='whole'"):
        data.check_dataset("shakespeare", val_split="whole")
    with pytest.raises(ValueError, match="val_fraction=1"):
        data.check_dataset(str(books), val_fraction=1.0)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected 'shakespeare'"):
        data.prepare("no-such-corpus", tmp_path)


def test_prepared_folder_is_used_as_is(tmp_path):
    folder = data.prepare("shakespeare", tmp_path / "data")
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    data.check_dataset(str(moved))
    assert data.prepare(str(moved), tmp_path / "other") == moved
    assert not (tmp_path / "other").exists()                # nothing re-prepared
