"""Text -> GPT-2 tokens -> uint16 memmaps -> random training windows.

Owns: the offline GPT-2 BPE (tiktoken Encoding built from assets/gpt2.tiktoken), `prepare`
(by name: Tiny Shakespeare shipped in assets/, WikiText-103's articles from download.py, a
user's folders / .zips of .txt as corpus.py splits them, or a folder prepared earlier), the
prepared layout below, and batches.
Does not own: downloads (download.py), a user's text collections and their validation
splits (corpus.py), models, training, GLUE's task formats (glue.py).

Prepared layout, like nanoGPT: <data_dir>/<name>/{train,val[,test]}.bin (uint16 token ids,
documents joined by <|endoftext|>) plus meta.json (token counts, sources' sha256, the
val_split used). A second call finds meta.json and does nothing; meta.json is written
last, so a half-prepared folder never looks finished.
"""
import gzip
import hashlib
import json
import os
import signal
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

# How each named dataset holds out validation; val_split applies to text collections only.
NAMED_SPLITS = {"shakespeare": "tail", "wikitext103": "official"}
@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's r50k_base encoding, built from the shipped ranks file (no network)."""
    if hashlib.sha256(BPE_FILE.read_bytes()).hexdigest() != BPE_SHA256:
        raise RuntimeError(f"{BPE_FILE} is corrupt (sha256 mismatch); restore it from git")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             mergeable_ranks=load_tiktoken_bpe(str(BPE_FILE)),
                             special_tokens={"<|endoftext|>": EOT})


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
        # Ctrl-C is the parent's to report in one line: workers ignore it, pending chunks go.
        with ProcessPoolExecutor(workers, initializer=signal.signal,
                                 initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            try:
                parts = list(tqdm(pool.map(_encode_chunk, chunks), total=len(chunks), desc=desc))
            except KeyboardInterrupt:
                pool.shutdown(cancel_futures=True)
                raise
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
def prepare_shakespeare(data_dir) -> Path:
    """Tiny Shakespeare (shipped): 90/10 train/val split of the one text, like nanoGPT."""
    folder = Path(data_dir) / "shakespeare"
    if (folder / "meta.json").exists():
        return folder
    text = gzip.decompress(SHAKESPEARE_FILE.read_bytes()).decode("utf-8")
    cut = int(len(text) * 0.9)
    tokens = {"train": np.asarray(get_encoding().encode_ordinary(text[:cut]), np.uint16),
              "val": np.asarray(get_encoding().encode_ordinary(text[cut:]), np.uint16)}
    _write_split(folder, tokens, {"source": "tinyshakespeare", "val_split": "tail",
                                  "val_fraction": 0.1,
                                  "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return folder


def check_dataset(dataset: str, val_split: str = "auto", val_fraction: float | None = None) -> None:
    """Config-time check (no reading, no tokenizing): a ValueError naming what is wrong."""
    from corpus import DEFAULT_VAL_FRACTION, check_split, text_sources  # collections: corpus.py
    check_split(val_split, DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    if dataset not in NAMED_SPLITS and not is_prepared(dataset):
        try:
            text_sources([p.strip() for p in dataset.split(",") if p.strip()])
        except ValueError as error:
            raise ValueError(f"dataset={dataset!r}: {error}; expected 'shakespeare', 'wikitext103'"
                             f", or comma-separated folders/.zip files of .txt") from None


def prepare(dataset: str, data_dir, val_split: str = "auto", val_fraction: float | None = None) -> Path:
    """Dispatch by name: 'shakespeare', 'wikitext103', comma-separated folders/.zips of .txt,
    or a folder this function prepared earlier (meta.json, train.bin, val.bin), used as is:
    how prepared tokens travel to a machine that lacks the raw text.

    val_split / val_fraction (None: corpus.DEFAULT_VAL_FRACTION) apply to text collections
    only; Shakespeare keeps its 90/10 cut of the one text and WikiText-103 its official splits.
    """
    check_dataset(dataset, val_split, val_fraction)
    if is_prepared(dataset):
        return Path(dataset)
    if dataset == "shakespeare":
        return prepare_shakespeare(data_dir)
    if dataset == "wikitext103":
        return prepare_wikitext103(data_dir)
    return prepare_text_collection([p.strip() for p in dataset.split(",") if p.strip()],
                                   data_dir, val_split, val_fraction)


def prepare_text_collection(paths, data_dir, val_split: str = "auto",
                            val_fraction: float | None = None) -> Path:
    """A user's texts, held out as corpus.py splits them, tokenized into a prepared folder."""
    import corpus  # a user's own texts: loaded only for them
    fraction = corpus.DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    name, val_split, sources = corpus.collection(paths, val_split, fraction)
    folder = Path(data_dir) / name
    if (folder / "meta.json").exists():
        return folder
    train_texts, val_texts, meta = corpus.split_documents(sources, val_split, fraction)
    tokens = {"train": encode_documents(train_texts, desc="tokenize train"),
              "val": encode_documents(val_texts, desc="tokenize val")}
    _write_split(folder, tokens, meta)
    return folder


def prepare_wikitext103(data_dir, url: str | None = None, sha256: str | None = None) -> Path:
    """WikiText-103 raw, downloaded and checked by download.py (its published url and sha256
    unless given), tokenized split by split into <data_dir>/wikitext103."""
    import download  # fetched and checked: loaded only then
    folder = Path(data_dir) / "wikitext103"
    if (folder / "meta.json").exists():
        return folder
    url, sha256 = url or download.WIKITEXT103_URL, sha256 or download.WIKITEXT103_SHA256
    tokens = {split: encode_documents(articles, desc=f"tokenize {split}")
              for split, articles in download.wikitext103_splits(data_dir, url, sha256)}
    _write_split(folder, tokens, {"source": url, "sha256": sha256, "val_split": "official"})
    return folder


def is_prepared(path: str) -> bool:
    folder = Path(path)
    return all((folder / name).is_file() for name in ("meta.json", "train.bin", "val.bin"))


def read_meta(folder) -> dict:
    """A prepared folder's meta.json; its 'val_split' is 'tail', 'documents' or 'official'."""
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; prepare the dataset first")
    meta = json.loads(path.read_text())
    meta.setdefault("val_split", NAMED_SPLITS.get(Path(folder).name))  # prepared before it was kept
    return meta


def load_split(folder, split: str, block_size: int = 0) -> np.memmap:
    """A split's tokens; with block_size, one that cannot hold a window and its next token is
    refused here, before a run writes or trains anything."""
    path = Path(folder) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; prepare the dataset first")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if block_size and len(tokens) < block_size + 2:
        raise ValueError(f"the {split} split of {folder} holds {len(tokens)} tokens, fewer than "
                         f"block_size + 2 = {block_size + 2}: use more text or a smaller --block_size")
    return tokens


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
