"""Stage 2a, dedup: exact image duplicates and near-duplicate texts, by MinHash LSH with buckets sorted on disk.

    patho-r1 curate dedup curated/01-import --out curated/02-dedup

What counts as a duplicate depends on the kind:
- caption rows: the same image (sha256 of its bytes), or a near-duplicate caption (estimated Jaccard of word
  3-gram shingles >= `threshold`) whatever the image: one caption repeated over many images teaches nothing new;
- mcq and conversation rows: the same image *and* a near-duplicate text.  Questions such as "is this benign?"
  recur over thousands of images in PathVQA, and each of those rows is real data.

The algorithm, top to bottom:
1. one pass over the rows computes each row's MinHash signature (`curate/minhash.py`, datasketch's own given our
   shingle hash),
   its LSH band keys (salted with the image key for question kinds) and its image key; signatures go to a flat
   file read back by row, band keys to a memory-mapped file whose pages are dropped as they are used, so memory
   grows only by the few per-row numbers (about 90 bytes a row, against datasketch's 1 KB);
2. per band, the keys are sorted; rows sharing a key are candidates, kept when their signatures agree on at least
   `threshold` of the permutations; equal image keys among caption rows are exact duplicates;
3. the duplicate pairs are joined into groups (connected components); each group keeps its first row;
4. a second pass writes the kept rows and, to `removed.jsonl`, every removed row with the row it duplicates, the
   reason and the estimated similarity.

The first pass, the one that parses every row, runs in batches on the chosen engine (in process, a process pool,
Ray Data); it also writes each row as the output will hold it, so the second pass copies lines.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

import numpy as np

from patho_r1.curate.config import DedupStage
from patho_r1.curate.engine import map_batches
from patho_r1.curate.minhash import MinHashSpec, jaccard
from patho_r1.curate.rows import image_key, row_text
from patho_r1.curate.store import StageWriter, relative_images_line, stage_files
from patho_r1.curate.word_hash import changes
from patho_r1.progress import RowProgress

SAME_IMAGE, NEAR_TEXT = "same image", "near-duplicate text"
BATCH_ROWS = 4096  # rows parsed and signed at once (a worker's unit of work), and copied at once after
VERIFY_CHUNK = 1 << 16  # candidate pairs checked at once: bounds the signature copies to 32 MB at 64 permutations


@dataclass
class DedupFeatures:
    """One batch of JSONL lines -> signatures, band keys, image keys, and the rows as the output will hold them
    (their image paths seen from `final`), so that the second pass copies lines instead of parsing every row again
    (picklable, for pool and Ray Data workers)."""

    kind: str
    base: str
    final: str
    minhash: MinHashSpec

    def __call__(self, lines: list[str]) -> dict[str, np.ndarray]:
        parsed = json.loads(f"[{','.join(lines)}]")  # one call for the batch: a fifth faster than one per line
        base, final = Path(self.base), Path(self.final)
        images = np.array([image_key(r, base) for r in parsed], dtype=np.uint64)
        sigs, bands = self.minhash.sign([row_text(self.kind, r) for r in parsed],
                                        salt=None if self.kind == "caption" else images)
        out = np.array([relative_images_line(line, r, base, final) for line, r in zip(lines, parsed, strict=True)],
                       dtype=object)
        return {"sig": sigs, "bands": bands, "image": images, "line": out}


def _components(n: int, edges: list[np.ndarray]) -> np.ndarray:
    """The smallest row index of each row's duplicate group (a row alone is its own)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not edges:
        return np.arange(n)
    pairs = np.concatenate(edges)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in sorted order) of each run's head, and of the members that follow a head."""
    new = changes(sorted_keys)
    member = np.flatnonzero(~new)
    heads = np.flatnonzero(new)
    head_of = heads[np.searchsorted(heads, member, side="right") - 1]
    return head_of, member


def release_pages(*arrays) -> None:
    """Write back and drop the resident pages of memory-mapped arrays: they are file-backed, so dropping them loses
    nothing, and the stage's resident memory stays flat instead of growing with the files."""
    import mmap

    for array in arrays:
        handle = getattr(array, "_mmap", None) or getattr(getattr(array, "base", None), "_mmap", None)
        if isinstance(array, np.memmap):
            array.flush()
        if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED)


class SignatureFile:
    """Signatures appended to a flat file and read back by row with `pread`.  Not a memory map: verifying candidate
    pairs reads rows all over the file, and each page fault on a map brings in its neighbours (fault-around), so a
    map's resident size grew to the whole file (256 B a row) within one band."""

    def __init__(self, path: Path, num_perm: int):
        self.path, self.num_perm, self.row_bytes = path, num_perm, 4 * num_perm
        self._out = path.open("wb")
        self._fd: int | None = None

    def append(self, sigs: np.ndarray) -> None:
        self._out.write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())

    def __getitem__(self, idx) -> np.ndarray:
        """Rows `idx` (an int, or an array of them) as uint32, in the order asked."""
        import os

        if self._fd is None:
            self._out.close()
            self._fd = os.open(self.path, os.O_RDONLY)
        rows = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        data = b"".join(os.pread(self._fd, self.row_bytes, int(i) * self.row_bytes) for i in rows)
        out = np.frombuffer(data, dtype=np.uint32).reshape(len(rows), self.num_perm)
        return out[0] if np.ndim(idx) == 0 else out

    def close(self) -> None:
        import os

        self._out.close()
        if self._fd is not None:
            os.close(self._fd)
        self.path.unlink(missing_ok=True)


def find_duplicates(sigs: np.ndarray | SignatureFile, bands: np.ndarray, images: np.ndarray, is_caption: np.ndarray,
                    threshold: float, *, near_text: bool = True, exact_images: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(representative index of every row, whether it was linked by an image match).  `bands` may be a memmap,
    `sigs` a `SignatureFile`; candidate pairs are checked `VERIFY_CHUNK` at a time."""
    n = len(images)
    edges: list[np.ndarray] = []
    by_image = np.zeros(n, dtype=bool)
    if exact_images:
        cap = np.flatnonzero(is_caption & (images != 0))
        order = cap[np.argsort(images[cap], kind="stable")]
        head, member = _runs(images[order])
        if len(member):
            edges.append(np.stack([order[head], order[member]], axis=1))
            by_image[order[member]] = True
    if near_text:
        for band in range(bands.shape[1]):
            keys = np.asarray(bands[:, band])
            order = np.argsort(keys, kind="stable")
            head, member = _runs(keys[order])
            a, b = order[head], order[member]
            for s in range(0, len(a), VERIFY_CHUNK):  # in chunks: two signature copies per candidate pair
                ca, cb = a[s:s + VERIFY_CHUNK], b[s:s + VERIFY_CHUNK]
                # each row read once, in file order: a run's head is in every one of its pairs
                rows, where = np.unique(np.concatenate([ca, cb]), return_inverse=True)
                chunk_sigs = np.asarray(sigs[rows])
                ok = jaccard(chunk_sigs[where[:len(ca)]], chunk_sigs[where[len(ca):]]) >= threshold
                if ok.any():
                    edges.append(np.stack([ca[ok], cb[ok]], axis=1))
            release_pages(bands)
    return _components(n, edges), by_image


def _similarities(sigs: np.ndarray | SignatureFile, representative: np.ndarray) -> np.ndarray:
    """(n,) float32: each removed row's estimated Jaccard similarity to its representative (0 for kept rows)."""
    out = np.zeros(len(representative), dtype=np.float32)
    removed = np.flatnonzero(representative != np.arange(len(representative)))
    for s in range(0, len(removed), VERIFY_CHUNK):
        rows = removed[s:s + VERIFY_CHUNK]
        out[rows] = jaccard(np.asarray(sigs[rows]), np.asarray(sigs[representative[rows]]))
    return out


def run_dedup(stage: DedupStage, parent: Path, out: Path, final: Path, writer: StageWriter,
              progress: RowProgress, engine: str, n: int) -> dict:
    files = stage_files(parent)
    minhash = stage.minhash()
    bands_n, rows_n = minhash.bands
    work = out / ".work"
    work.mkdir()
    sigs = SignatureFile(work / "sig.bin", stage.num_perm)
    bands = np.lib.format.open_memmap(work / "bands.npy", "w+", np.uint64, (max(n, 1), bands_n))
    images = np.zeros(n, dtype=np.uint64)
    is_caption = np.zeros(n, dtype=bool)
    rows_of: dict[str, int] = {}
    at = 0
    with (work / "rows.jsonl").open("w", encoding="utf-8") as rewritten:
        for kind, file in files.items():
            fn = DedupFeatures(kind, str(parent), str(final), minhash)
            first = at
            for batch in map_batches([file], fn, engine=engine, batch_size=BATCH_ROWS):
                m = len(batch["image"])
                sigs.append(batch["sig"])
                bands[at:at + m], images[at:at + m] = batch["bands"], batch["image"]
                is_caption[at:at + m] = kind == "caption"
                rewritten.write("".join(batch["line"]))
                at += m
                progress.advance(m)
                if at % (1 << 18) < m:  # every ~256k rows
                    release_pages(bands)
            rows_of[kind] = at - first
    if at != n:
        raise RuntimeError(f"dedup read {at} rows but the parent manifest counts {n}")
    representative, by_image = find_duplicates(sigs, bands[:n], images, is_caption, stage.threshold,
                                               near_text=stage.near_text, exact_images=stage.exact_images)
    similarity = _similarities(sigs, representative)
    sigs.close()
    del bands
    # The second pass copies the kept rows' lines; only the removed rows and those they duplicate are parsed.
    keep = representative == np.arange(n)
    wanted = np.zeros(n, dtype=bool)
    wanted[representative[~keep]] = True
    ids: dict[int, str] = {}
    removed: Counter = Counter()
    with (work / "rows.jsonl").open(encoding="utf-8") as rewritten:
        start = 0
        for kind, count in rows_of.items():
            for lo in range(start, start + count, BATCH_ROWS):
                hi = min(lo + BATCH_ROWS, start + count)
                lines = [rewritten.readline() for _ in range(hi - lo)]
                writer.lines(kind, "".join(compress(lines, keep[lo:hi])), int(keep[lo:hi].sum()))
                for i in np.flatnonzero(wanted[lo:hi] | ~keep[lo:hi]) + lo:
                    row = json.loads(lines[i - lo])
                    if wanted[i]:
                        ids[int(i)] = row.get("id")
                    if not keep[i]:
                        reason = SAME_IMAGE if by_image[i] else NEAR_TEXT
                        removed[f"{kind}: {reason}"] += 1
                        writer.removed({"id": row.get("id"), "kind": kind, "reason": reason,
                                        "duplicate_of": ids.get(int(representative[i])),
                                        "similarity": round(float(similarity[i]), 3), "source": row.get("source")})
            start += count
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return {"bands": bands_n, "rows_per_band": rows_n, "removed": dict(removed), "kept": writer.kind_counts()}
