"""data.py: tokenizer ids, preparation, batches, and the download path over loopback HTTP."""
import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch

import data

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
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 338025  # PROVENANCE.md
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
    for article in data.wikitext_articles(ARTICLES):
        expected += enc.encode_ordinary(article) + [data.EOT]
    assert len(data.wikitext_articles(ARTICLES)) == 2                # section heading kept inside
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
        data.safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_text_collection_holds_out_whole_files(tmp_path):
    src = tmp_path / "books"
    src.mkdir()
    for i in range(10):
        (src / f"book{i}.txt").write_text(f"Book number {i}. " * 20)
    folder = data.prepare(str(src), tmp_path / "d")
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta["val_documents"]) == 1
    held = meta["val_documents"][0]
    enc = data.get_encoding()
    val = data.load_split(folder, "val").tolist()
    assert val == enc.encode_ordinary((src / held).read_text()) + [data.EOT]
    assert meta["tokens"]["train"] == sum(len(enc.encode_ordinary((src / f"book{i}.txt").read_text())) + 1
                                          for i in range(10) if f"book{i}.txt" != held)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected 'shakespeare'"):
        data.prepare("no-such-corpus", tmp_path)
