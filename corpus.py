"""A user's own texts as a dataset: folders and .zip files of .txt files, one document each,
held out in-domain for validation.

Owns: finding the documents (`text_sources`: folders, zips, a folder of zips; corrupt or
empty ones named as such), the validation split of a collection (`tail`: the last
val_fraction of every document, cut at a line start; `documents`: whole documents, a fixed
seeded choice; `auto`: documents from AUTO_DOCUMENTS_MIN files up, else tails; checked by
`check_split`), the prepared folder's name (`collection`) and the train and validation texts
(`split_documents`), which data.py tokenizes and writes.
Does not own: the tokenizer, the prepared layout or batches (data.py), downloads (download.py).
"""
import hashlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from download import sha256_file

# From 100 documents up, whole held-out documents sample the collection fairly; below that
# (14 Gutenberg books) a few whole books make val another domain, so tails are held out.
AUTO_DOCUMENTS_MIN = 100
VAL_SPLITS = ("auto", "tail", "documents")
DEFAULT_VAL_FRACTION = 0.1


def check_split(val_split: str, val_fraction: float) -> None:
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split={val_split!r}: expected one of {'|'.join(VAL_SPLITS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: expected 0 < val_fraction < 1")



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


def collection(paths, val_split: str = "auto", val_fraction: float = DEFAULT_VAL_FRACTION):
    """Folders / .zips of .txt (see text_sources): every file one document, all one collection.
    -> (the prepared folder's name, the resolved val_split, the sources), without reading
    a document: 'auto' is 'documents' from AUTO_DOCUMENTS_MIN files of nonzero size up, else
    'tail'. The name records the resolved split (text_folder_name), so no switch reuses another."""
    check_split(val_split, val_fraction)
    sources = text_sources(paths)
    if val_split == "auto":
        n_files = sum(size > 0 for s in sources for size in _document_sizes(s))
        val_split = "documents" if n_files >= AUTO_DOCUMENTS_MIN else "tail"
    return text_folder_name(sources, val_split, val_fraction), val_split, sources


def split_documents(sources: list[Path], val_split: str, val_fraction: float = DEFAULT_VAL_FRACTION):
    """A collection's documents -> (train texts, val texts, meta for meta.json).

    val_split 'tail' holds out the last val_fraction of every document, cut at a line start
    (a document too short to cut stays whole in train); 'documents' holds out whole documents
    (fixed seeded shuffle, round(n * val_fraction), at least 1).
    """
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
    return train_texts, val_texts, meta
