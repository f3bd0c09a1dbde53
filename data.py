"""Text -> GPT-2 tokens -> uint16 memmaps, and the safe download/extract they rest on.

Owns: the offline GPT-2 BPE (tiktoken Encoding built from assets/gpt2.tiktoken), dataset
preparation (Tiny Shakespeare shipped in assets/, WikiText-103 through download.py, or any
folders / .zips of .txt files a user points at, with in-domain validation: the tail of every
document, or whole documents when there are many), and random training windows.
Does not own: downloads (download.py), models, training, GLUE's task formats (glue.py).

Prepared layout, like nanoGPT: <data_dir>/<name>/{train,val[,test]}.bin (uint16 token ids,
documents joined by <|endoftext|>) plus meta.json (token counts, sources' sha256, the
val_split used). A second call finds meta.json and does nothing; meta.json is written
last, so a half-prepared folder never looks finished.
"""
import gzip
import hashlib
import json
import os
import re
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

# How each named dataset holds out validation; val_split applies to text collections only.
NAMED_SPLITS = {"shakespeare": "tail", "wikitext103": "official"}
VAL_SPLITS = ("auto", "tail", "documents")
DEFAULT_VAL_FRACTION = 0.1
# From 100 documents up, whole held-out documents sample the collection fairly; below that
# (14 Gutenberg books) a few whole books make val another domain, so tails are held out.
AUTO_DOCUMENTS_MIN = 100


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


def text_sources(paths) -> list[Path]:
    """The sources a collection is made of, sorted by stem (unique: it prefixes names).

    Each path is a folder of .txt files (searched recursively), a .zip of .txt files, or a
    folder holding .zip files and no .txt at all, which stands for all its top-level zips.
    """
    sources = []
    for path in map(Path, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if not path.exists():
            raise ValueError(f"dataset path {str(path)!r} does not exist")
        if path.is_dir():
            zips = sorted(path.glob("*.zip"))
            has_txt = next(path.rglob("*.txt"), None) is not None
            if zips and has_txt:
                raise ValueError(f"{path} holds both .txt and .zip files; list the zips "
                                 f"comma-separated or move them out")
            if not zips and not has_txt:
                raise ValueError(f"{path} holds no .txt or .zip files")
            sources += zips or [path]
        elif zipfile.is_zipfile(path):
            sources.append(path)
        elif path.suffix == ".zip":
            raise ValueError(f"{path} is a corrupt or truncated .zip (no readable directory "
                             f"of its members); download or copy it again")
        else:
            raise ValueError(f"dataset path {path} is neither a folder nor a .zip of .txt files")
    stems = sorted(s.stem for s in sources)
    if not sources:
        raise ValueError("no dataset path given")
    if len(set(stems)) < len(stems):
        raise ValueError(f"two sources share a name (names prefix documents): {stems}")
    return sorted(sources, key=lambda s: s.stem)


def check_dataset(dataset: str, val_split: str = "auto",
                  val_fraction: float = DEFAULT_VAL_FRACTION) -> None:
    """Config-time check (no reading, no tokenizing): a ValueError naming what is wrong."""
    _check_split(val_split, val_fraction)
    if dataset not in NAMED_SPLITS and not is_prepared(dataset):
        try:
            text_sources([p.strip() for p in dataset.split(",") if p.strip()])
        except ValueError as error:
            raise ValueError(f"dataset={dataset!r}: {error}; expected 'shakespeare', 'wikitext103'"
                             f", or comma-separated folders/.zip files of .txt") from None


def _check_split(val_split: str, val_fraction: float) -> None:
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split={val_split!r}: expected one of {'|'.join(VAL_SPLITS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: expected 0 < val_fraction < 1")


def _is_document(name: str) -> bool:
    return name.endswith(".txt") and "__MACOSX" not in name


def _document_sizes(source: Path) -> list[int]:
    """Byte size of each .txt document in a source, from metadata alone (no reading)."""
    if source.is_dir():
        return [p.stat().st_size for p in source.rglob("*.txt")]
    with zipfile.ZipFile(source) as z:
        return [i.file_size for i in z.infolist() if not i.is_dir() and _is_document(i.filename)]


def _read_documents(source: Path) -> dict[str, str]:
    """name -> text, names prefixed by the source's stem so several sources never collide."""
    if source.is_dir():
        return {f"{source.stem}/{p.relative_to(source).as_posix()}":
                p.read_text(encoding="utf-8", errors="replace")
                for p in sorted(source.rglob("*.txt"))}
    try:
        with zipfile.ZipFile(source) as z:
            return {f"{source.stem}/{n}": z.read(n).decode("utf-8", errors="replace")
                    for n in sorted(z.namelist()) if _is_document(n)}
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(f"{source} is a corrupt or truncated .zip ({error})") from None


def tail_cut(text: str, val_fraction: float) -> int:
    """Where a document's held-out tail starts: the line start nearest (1 - val_fraction) of
    the way in, never 0; len(text) (nothing held out) when the end is nearer than any line."""
    target = round(len(text) * (1 - val_fraction))
    newline = text.find("\n", max(target - 1, 0))
    after = len(text) if newline < 0 else newline + 1
    before = text.rfind("\n", 0, target) + 1                        # 0: no line starts before
    return before if 0 < before and target - before < after - target else min(after, len(text))


def text_folder_name(sources: list[Path], val_split: str, val_fraction: float) -> str:
    """text_<stems joined by +>_<split>[<fraction> when not the default]; many stems -> hash."""
    safe = [re.sub(r"[^\w.-]", "-", s.stem) for s in sources]
    stems = "+".join(safe)
    if len(stems) > 48:                    # e.g. 100 shards: first name, count and a hash
        digest = hashlib.sha256(stems.encode()).hexdigest()[:8]
        stems = f"{safe[0][:24]}+{len(safe) - 1}more-{digest}"
    fraction = "" if val_fraction == DEFAULT_VAL_FRACTION else f"{val_fraction:g}"
    return f"text_{stems}_{val_split}{fraction}"


def prepare_text_collection(paths, data_dir, val_split: str = "auto",
                            val_fraction: float = DEFAULT_VAL_FRACTION) -> Path:
    """Folders / .zips of .txt (see text_sources): every file one document, all one collection.

    val_split: 'tail' holds out the last val_fraction of every document, cut at a line start
    (a document too short to cut stays whole in train); 'documents' holds out whole documents
    (fixed seeded shuffle, round(n * val_fraction), at least 1); 'auto' is 'documents' from
    AUTO_DOCUMENTS_MIN files of nonzero size up, else 'tail'. meta.json records the resolved
    split, and the folder is named after it (text_folder_name), so no switch reuses another.
    """
    _check_split(val_split, val_fraction)
    sources = text_sources(paths)
    if val_split == "auto":
        n_files = sum(size > 0 for s in sources for size in _document_sizes(s))
        val_split = "documents" if n_files >= AUTO_DOCUMENTS_MIN else "tail"
    folder = Path(data_dir) / text_folder_name(sources, val_split, val_fraction)
    if (folder / "meta.json").exists():
        return folder
    docs = {}
    for source in tqdm(sources, desc="read", disable=len(sources) < 2):
        docs.update(_read_documents(source))
    names = [n for n in docs if docs[n].strip()]
    if not names:
        raise ValueError(f"{', '.join(str(s) for s in sources)}: no text in its {len(docs)} "
                         f".txt file{'s' * (len(docs) != 1)} (all empty)")
    meta = {"sources": [str(s) for s in sources], "val_split": val_split,
            "val_fraction": val_fraction, "documents": len(names),
            "sha256": [sha256_file(s) if s.is_file() else None for s in sources]}
    if val_split == "documents":
        if len(names) < 2:
            raise ValueError(f"{', '.join(meta['sources'])}: val_split=documents needs at "
                             f"least 2 non-empty .txt files; found {len(names)}")
        order = np.random.default_rng(0).permutation(len(names))    # fixed: same split every run
        n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
        val_names = sorted(names[i] for i in order[:n_val])
        train_texts = [docs[n] for n in sorted(names[i] for i in order[n_val:])]
        val_texts = [docs[n] for n in val_names]
        meta["val_documents"] = val_names
    else:
        cuts = {n: tail_cut(docs[n], val_fraction) for n in names}
        cuts = {n: c if docs[n][c:].strip() else len(docs[n]) for n, c in cuts.items()}
        train_texts = [docs[n][:cuts[n]] for n in names]
        val_texts = [docs[n][cuts[n]:] for n in names if cuts[n] < len(docs[n])]
        if not val_texts:
            raise ValueError(f"{', '.join(meta['sources'])}: no document has a line start "
                             f"near its last {val_fraction:g}, so val_split=tail holds out "
                             f"nothing; use val_split=documents or longer texts")
        meta["documents_without_tail"] = [n for n in names if cuts[n] == len(docs[n])]
    tokens = {"train": encode_documents(train_texts, desc="tokenize train"),
              "val": encode_documents(val_texts, desc="tokenize val")}
    _write_split(folder, tokens, meta)
    return folder


def prepare(dataset: str, data_dir, val_split: str = "auto",
            val_fraction: float = DEFAULT_VAL_FRACTION) -> Path:
    """Dispatch by name: 'shakespeare', 'wikitext103', comma-separated folders/.zips of .txt,
    or a folder this function prepared earlier (meta.json, train.bin, val.bin), used as is:
    how prepared tokens travel to a machine that lacks the raw text.

    val_split / val_fraction apply to text collections only (see prepare_text_collection);
    Shakespeare keeps its 90/10 cut of the one text and WikiText-103 its official splits.
    """
    check_dataset(dataset, val_split, val_fraction)
    if is_prepared(dataset):
        return Path(dataset)
    if dataset == "shakespeare":
        return prepare_shakespeare(data_dir)
    if dataset == "wikitext103":  # fetched and checked: download.py, loaded only then
        from download import prepare_wikitext103
        return prepare_wikitext103(data_dir)
    return prepare_text_collection([p.strip() for p in dataset.split(",") if p.strip()],
                                   data_dir, val_split, val_fraction)


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
