"""Text -> GPT-2 tokens -> uint16 memmaps, and the safe download/extract they rest on.

Owns: the offline GPT-2 BPE (tiktoken Encoding built from assets/gpt2.tiktoken), dataset
preparation (Tiny Shakespeare shipped in assets/, WikiText-103 raw downloaded and checked,
or any folder / .zip of .txt files a user points at), random training windows, and the
generic `download` / `safe_extract` helpers that glue.py reuses for GLUE.
Does not own: models, training, or GLUE's task formats (glue.py).

Prepared layout, like nanoGPT: <data_dir>/<name>/{train,val[,test]}.bin (uint16 token ids,
documents joined by <|endoftext|>) plus meta.json (token counts, source sha256). A second
call finds meta.json and does nothing; meta.json is written last, so a half-prepared
folder never looks finished.
"""
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

ASSETS = Path(__file__).resolve().parent / "assets"
BPE_FILE = ASSETS / "gpt2.tiktoken"
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SHAKESPEARE_FILE = ASSETS / "tinyshakespeare.txt.gz"
EOT = 50256  # <|endoftext|>, also the document separator in every .bin

# The author's mirror; the original S3 link is gone. Size and hash as published for the raw zip.
WIKITEXT103_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
WIKITEXT103_SHA256 = "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"
WIKITEXT103_SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's r50k_base encoding, built from the shipped ranks file (no network)."""
    if sha256_file(BPE_FILE) != BPE_SHA256:
        raise RuntimeError(f"{BPE_FILE} is corrupt (sha256 mismatch); restore it from git")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             mergeable_ranks=load_tiktoken_bpe(str(BPE_FILE)),
                             special_tokens={"<|endoftext|>": EOT})


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


def _encode_chunk(texts: list[str]) -> np.ndarray:
    enc = get_encoding()
    ids = []
    for text in texts:
        ids.extend(enc.encode_ordinary(text))
        ids.append(EOT)
    return np.asarray(ids, dtype=np.uint16)


def encode_documents(texts: list[str], workers: int = 0, desc: str = "tokenize") -> np.ndarray:
    """Each text -> its tokens + <|endoftext|>, concatenated; parallel over chunks of texts."""
    chunks = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1 or len(chunks) <= 1:
        parts = [_encode_chunk(c) for c in tqdm(chunks, desc=desc, disable=len(chunks) < 2)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(tqdm(pool.map(_encode_chunk, chunks), total=len(chunks), desc=desc))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _write_split(folder: Path, tokens: dict[str, np.ndarray], meta: dict) -> None:
    """Write each .bin via a temp name, and meta.json last: its presence means 'done'."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, ids in tokens.items():
        tmp = folder / f"{split}.bin.part"
        ids.astype(np.uint16).tofile(tmp)
        os.replace(tmp, folder / f"{split}.bin")
    meta = {**meta, "tokens": {split: int(len(ids)) for split, ids in tokens.items()}}
    tmp = folder / "meta.json.part"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


# A WikiText article starts at a level-1 heading line " = Title = " (sections use " = = ").
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $", re.M)


def wikitext_articles(text: str) -> list[str]:
    """Split raw WikiText into articles, so <|endoftext|> separates articles, not lines."""
    starts = [m.start() for m in _ARTICLE_HEADING.finditer(text)] or [0]
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b].strip()]


def prepare_shakespeare(data_dir) -> Path:
    """Tiny Shakespeare (shipped): 90/10 train/val split of the one text, like nanoGPT."""
    folder = Path(data_dir) / "shakespeare"
    if (folder / "meta.json").exists():
        return folder
    text = gzip.decompress(SHAKESPEARE_FILE.read_bytes()).decode("utf-8")
    cut = int(len(text) * 0.9)
    tokens = {"train": np.asarray(get_encoding().encode_ordinary(text[:cut]), np.uint16),
              "val": np.asarray(get_encoding().encode_ordinary(text[cut:]), np.uint16)}
    _write_split(folder, tokens, {"source": "tinyshakespeare",
                                  "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return folder


def prepare_wikitext103(data_dir, url: str = WIKITEXT103_URL,
                        sha256: str = WIKITEXT103_SHA256) -> Path:
    """Download (checked), extract, tokenize WikiText-103 raw into train/val/test .bin."""
    folder = Path(data_dir) / "wikitext103"
    if (folder / "meta.json").exists():
        return folder
    archive = download(url, Path(data_dir) / "downloads" / "wikitext-103-raw-v1.zip", sha256)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        files = {p.name: p for p in safe_extract(archive, tmp)}
        tokens = {}
        for split, name in WIKITEXT103_SPLITS.items():
            if name not in files:
                raise RuntimeError(f"{archive} has no {name}; is it the raw WikiText-103 zip?")
            text = files[name].read_text(encoding="utf-8")
            tokens[split] = encode_documents(wikitext_articles(text), desc=f"tokenize {split}")
    _write_split(folder, tokens, {"source": url, "sha256": sha256})
    return folder


def prepare_text_collection(path, data_dir, val_fraction: float = 0.1) -> Path:
    """A folder or .zip of .txt files: each file a document; whole files held out for val."""
    path = Path(path)
    folder = Path(data_dir) / ("text_" + path.stem)
    if (folder / "meta.json").exists():
        return folder
    if path.is_dir():
        docs = {p.relative_to(path).as_posix(): p.read_text(encoding="utf-8", errors="replace")
                for p in sorted(path.rglob("*.txt"))}
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            docs = {n: z.read(n).decode("utf-8", errors="replace")
                    for n in sorted(z.namelist()) if n.endswith(".txt") and "__MACOSX" not in n}
    else:
        raise FileNotFoundError(f"dataset path {path} is neither a folder nor a .zip of .txt files")
    names = [n for n in docs if docs[n].strip()]
    if len(names) < 2:
        raise ValueError(f"{path} needs at least 2 non-empty .txt files (whole files are held "
                         f"out for validation); found {len(names)}")
    # A fixed, name-seeded shuffle decides which whole documents are held out.
    order = np.random.default_rng(0).permutation(len(names))
    n_val = max(1, round(len(names) * val_fraction))
    val_names = sorted(names[i] for i in order[:n_val])
    train_names = sorted(names[i] for i in order[n_val:])
    tokens = {"train": encode_documents([docs[n] for n in train_names], desc="tokenize train"),
              "val": encode_documents([docs[n] for n in val_names], desc="tokenize val")}
    _write_split(folder, tokens, {"source": str(path), "sha256": sha256_file(path) if
                                  path.is_file() else None, "val_documents": val_names})
    return folder


def prepare(dataset: str, data_dir) -> Path:
    """Dispatch by name: 'shakespeare', 'wikitext103', or a path to a folder/.zip of .txt."""
    if dataset == "shakespeare":
        return prepare_shakespeare(data_dir)
    if dataset == "wikitext103":
        return prepare_wikitext103(data_dir)
    if Path(dataset).exists():
        return prepare_text_collection(dataset, data_dir)
    raise ValueError(f"dataset={dataset!r}: expected 'shakespeare', 'wikitext103', or an "
                     f"existing folder/.zip of .txt files")


def load_split(folder, split: str) -> np.memmap:
    path = Path(folder) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; prepare the dataset first")
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, device,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1]; pinned + async on CUDA."""
    if len(tokens) <= block_size + 1:
        raise ValueError(f"split has {len(tokens)} tokens, fewer than block_size+2 = {block_size + 2}")
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
    batch = torch.from_numpy(windows)  # (B, T+1)
    x, y = batch[:, :-1], batch[:, 1:]
    if torch.device(device).type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous(), y.contiguous()
