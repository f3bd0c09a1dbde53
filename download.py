"""Checked downloads: what the project fetches for its users, and how.

Owns: `download` (through a temporary name, checked against a recorded sha256 before the
rename, so an interrupted or corrupt download leaves nothing that looks finished),
`safe_extract` (refuses zip members that are absolute or escape the target folder), and the
dataset fetched this way, WikiText-103 raw (`wikitext103_splits`: its articles, split by
split; GLUE's tasks are glue.py's), and `sha256_file`.
Does not own: tokenizing and the prepared layout (data.py).
"""
import hashlib
import os
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm


# The author's mirror; the original S3 link is gone. Size and hash as published for the raw zip.
WIKITEXT103_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
WIKITEXT103_SHA256 = "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"
WIKITEXT103_SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}

def sha256_file(path, chunk=1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest, sha256: str | None, desc: str | None = None) -> Path:
    """Fetch url to dest through a temp file; check sha256 before the rename.

    An interrupted or corrupt download leaves nothing at dest. An existing dest with the
    right hash is reused. sha256=None skips the check (only for sources with no published hash).
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise RuntimeError(f"checksum mismatch for {url}: got {digest.hexdigest()}, "
                               f"expected {sha256}; nothing was kept")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def safe_extract(zip_path, target) -> list[Path]:
    """Extract a zip, refusing members that are absolute or escape `target`."""
    target = Path(target).resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            resolved = (target / name).resolve()
            if Path(name).is_absolute() or name.startswith(("/", "\\")) or \
                    (resolved != target and target not in resolved.parents):
                raise RuntimeError(f"refusing unsafe path in {zip_path}: {name!r}")
        archive.extractall(target)
        return [target / n for n in archive.namelist() if not n.endswith("/")]


_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $", re.M)


def wikitext_articles(text: str) -> list[str]:
    """Split raw WikiText into articles, so <|endoftext|> separates articles, not lines."""
    starts = [m.start() for m in _ARTICLE_HEADING.finditer(text)] or [0]
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b].strip()]


def wikitext103_splits(data_dir, url: str = WIKITEXT103_URL, sha256: str = WIKITEXT103_SHA256):
    """Download (checked) and extract WikiText-103 raw -> yields (split, its articles), one
    split at a time, so only one split's text is in memory."""
    archive = download(url, Path(data_dir) / "downloads" / "wikitext-103-raw-v1.zip", sha256)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        files = {p.name: p for p in safe_extract(archive, tmp)}
        for split, name in WIKITEXT103_SPLITS.items():
            if name not in files:
                raise RuntimeError(f"{archive} has no {name}; is it the raw WikiText-103 zip?")
            yield split, wikitext_articles(files[name].read_text(encoding="utf-8"))
