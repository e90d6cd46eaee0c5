"""Stage 2a, dedup: exact image duplicates and near-duplicate texts, by MinHash LSH with buckets sorted on disk.

    patho-r1 curate dedup curated/01-import --out curated/02-dedup

What counts as a duplicate depends on the kind:
- caption rows: the same image (sha256 of its bytes), or a near-duplicate caption (estimated Jaccard of word
  3-gram shingles >= `threshold`) whatever the image: one caption repeated over many images teaches nothing new;
- mcq and conversation rows: the same image *and* a near-duplicate text.  Questions such as "is this benign?"
  recur over thousands of images in PathVQA, and each of those rows is real data.

The algorithm, top to bottom:
1. one pass over the rows computes each row's MinHash signature (`curate/minhash.py`, datasketch's own given our
   shingle hash), its LSH band keys (salted with the image key for question kinds) and its image key; signatures
   go to a flat file read back by row; each (band key, row) pair, and each caption row's (image key, row), goes to
   one of several bucket files chosen by the key's top bits (`KeyBuckets`: an external sort's partition step);
2. per bucket, the keys are sorted: rows sharing a band key are candidates, kept when their signatures agree on at
   least `threshold` of the permutations; caption rows sharing an image key are exact duplicates.  A bucket holds
   about `PAIRS_PER_BUCKET` pairs whatever the corpus, so this memory does not grow with it, and the buckets are
   sorted in parallel on a process pool;
3. the duplicate pairs are joined into groups (connected components over the rows in a pair); each group keeps its
   first row;
4. a second pass copies the kept rows' lines (their image paths re-based as text, `store.ImageRebase`) and writes
   to `removed.jsonl` every removed row with the row it duplicates, the reason and the estimated similarity.

Memory holds a byte a row (whether its line may be re-based as text) and what grows with the duplicates found:
the verified pairs (16 bytes each) and the removed rows with their representatives; datasketch's `MinHashLSH` holds
about 1 KB a row.  The first pass, the one that parses every row, runs in batches on the chosen engine (in process, a
process pool, Ray Data).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

import numpy as np

from patho_r1.curate.config import DedupStage
from patho_r1.curate.engine import line_batches, map_batches, ordered_map
from patho_r1.curate.minhash import MinHashSpec, jaccard
from patho_r1.curate.rows import digest_key, image_key, row_text
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import (
    IMAGE_DIR,
    ImageRebase,
    StageWriter,
    encode_row,
    images_rewritable,
    offset_row,
    parse_lines,
    stage_files,
)
from patho_r1.curate.word_hash import changes
from patho_r1.errors import DataError

SAME_IMAGE, NEAR_TEXT = "same image", "near-duplicate text"
BATCH_ROWS = 4096  # rows parsed and signed at once (a worker's unit of work), and copied at once after
VERIFY_CHUNK = 1 << 16  # candidate pairs checked at once: bounds the signature copies to 32 MB at 64 permutations
PAIRS_PER_BUCKET = 1 << 19  # (key, row) pairs a bucket file is sized for: 8 MB, sorted in memory at once
MAX_BUCKETS = 256  # files open at once; past 256 x PAIRS_PER_BUCKET pairs (13M rows at 9 bands) buckets grow
PAIR = np.dtype([("key", "<u8"), ("row", "<u8")])
IMAGE_PAIR = np.uint64(1 << 63)  # set in `row` for an image-key pair: both kinds share the buckets
_STORE_DIGEST = slice(len(IMAGE_DIR) + 4, len(IMAGE_DIR) + 4 + 16)  # images/ab/<first 16 hex digits of the sha256>


@dataclass
class DedupFeatures:
    """One batch of JSONL lines -> signatures, band keys, image keys, and whether each line's image paths may be
    re-based as text (`store.images_rewritable`) (picklable, for pool and Ray Data workers)."""

    kind: str
    base: str
    minhash: MinHashSpec
    path: str  # the file the lines come from, for errors

    def __call__(self, lines: list[str]) -> dict[str, np.ndarray]:
        parsed = parse_lines(lines, self.path)
        rewritable = np.fromiter((images_rewritable(line, r) for line, r in zip(lines, parsed, strict=True)),
                                 dtype=bool, count=len(lines))
        base = Path(self.base)
        # a single store path's key is in its name (as `image_key` computes it, without the call per row)
        images = np.fromiter((digest_key(r["images"][0][_STORE_DIGEST])
                              if ok and len(r.get("images") or ()) == 1 else image_key(r, base)
                              for r, ok in zip(parsed, rewritable, strict=True)), dtype=np.uint64, count=len(lines))
        sigs, bands = self.minhash.sign([row_text(self.kind, r) for r in parsed],
                                        salt=None if self.kind == "caption" else images)
        return {"sig": sigs, "bands": bands, "image": images, "rewritable": rewritable}


class SignatureFile:
    """Signatures appended to a flat file, and read back by row with `pread` (`SignatureReader`), here or in a pool
    worker.  Not a memory map: verifying candidate pairs reads rows all over the file, and each page fault on a map
    brings in its neighbours (fault-around), so a map's resident size grew to the whole file (256 B a row) within
    one band."""

    def __init__(self, path: Path, num_perm: int):
        self.path, self.num_perm = path, num_perm
        self._out = path.open("wb")

    def append(self, sigs: np.ndarray) -> None:
        self._out.write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())

    def reader(self) -> SignatureReader:
        self._out.close()
        return SignatureReader(str(self.path), self.num_perm)


@dataclass
class SignatureReader:
    path: str
    num_perm: int

    def __getitem__(self, idx) -> np.ndarray:
        """Rows `idx` (an int, or an array of them) as uint32, in the order asked."""
        import os

        rows = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        size = 4 * self.num_perm
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = b"".join(os.pread(fd, size, int(i) * size) for i in rows)
        finally:
            os.close(fd)
        out = np.frombuffer(data, dtype=np.uint32).reshape(len(rows), self.num_perm)
        return out[0] if np.ndim(idx) == 0 else out


class KeyBuckets:
    """(key, row) pairs spread over bucket files by the keys' top bits, so that equal keys share a bucket and each
    bucket sorts in memory: an external sort's partition step.  Pairs are gathered and written `FLUSH_PAIRS` at a
    time, in row order, so each bucket's rows ascend (a run's first row is its smallest)."""

    FLUSH_PAIRS = 1 << 20

    def __init__(self, folder: Path, expected_pairs: int):
        import resource

        # at most a quarter of the open files allowed (macOS allows 256 by default)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        allowed = MAX_BUCKETS if soft == resource.RLIM_INFINITY else min(MAX_BUCKETS, max(soft // 4, 1))
        self.bits = min(max(0, int(np.ceil(np.log2(max(expected_pairs, 1) / PAIRS_PER_BUCKET)))),
                        int(np.log2(allowed)))
        self.paths = [folder / f"bucket-{i:03d}.bin" for i in range(1 << self.bits)]
        self._files = [p.open("wb") for p in self.paths]
        self._pending: list[np.ndarray] = []
        self._held = 0

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Pairs (keys[i, j], rows[i]) for every column j of `keys` (n, k), row by row."""
        pairs = np.empty(keys.shape, dtype=PAIR)
        pairs["key"], pairs["row"] = keys, rows[:, None]
        self._pending.append(pairs.ravel())
        self._held += pairs.size
        if self._held >= self.FLUSH_PAIRS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pairs = np.concatenate(self._pending)
        self._pending, self._held = [], 0
        # uint8 (at most 256 buckets): numpy's stable sort of bytes is a radix sort.  Stable: rows stay ascending.
        bucket = (pairs["key"] >> np.uint64(64 - self.bits) if self.bits else np.zeros(len(pairs))).astype(np.uint8)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(len(self._files) + 1))
        for i, fh in enumerate(self._files):
            if bounds[i + 1] > bounds[i]:
                fh.write(pairs[order[bounds[i]:bounds[i + 1]]].tobytes())

    def close(self) -> list[str]:
        self.flush()
        for fh in self._files:
            fh.close()
        return [str(p) for p in self.paths]


@dataclass
class BucketEdges:
    """The duplicate pairs in one bucket file (picklable: each pool worker reads its buckets and the signatures)."""

    signatures: SignatureReader
    threshold: float

    def __call__(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = np.fromfile(path, dtype=PAIR)
        is_image = (pairs["row"] & IMAGE_PAIR) != 0
        text, image = pairs[~is_image], pairs[is_image]
        return (text_edges(text["key"], text["row"].astype(np.int64), self.signatures, self.threshold),
                equal_key_edges(image["key"], (image["row"] & ~IMAGE_PAIR).astype(np.int64)))


def _run_pairs(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row, other row) of every other row in each run of equal keys (rows ascending within a key)."""
    order = np.argsort(keys, kind="stable")
    new = changes(keys[order])
    member = np.flatnonzero(~new)
    heads = np.flatnonzero(new)
    head_of = heads[np.searchsorted(heads, member, side="right") - 1]
    return rows[order[head_of]], rows[order[member]]


def equal_key_edges(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(k, 2) edges from each row to the first row with its key."""
    a, b = _run_pairs(keys, rows)
    return np.stack([a, b], axis=1)


def text_edges(keys: np.ndarray, rows: np.ndarray, sigs: np.ndarray | SignatureReader, threshold: float
               ) -> np.ndarray:
    """(k, 2) edges between LSH candidates (rows sharing a band key) whose signatures agree on at least `threshold`
    of the permutations, checked `VERIFY_CHUNK` pairs at a time."""
    a, b = _run_pairs(keys, rows)
    edges = [np.zeros((0, 2), dtype=np.int64)]
    for s in range(0, len(a), VERIFY_CHUNK):  # in chunks: two signature copies per candidate pair
        ca, cb = a[s:s + VERIFY_CHUNK], b[s:s + VERIFY_CHUNK]
        # each row read once, in file order: a run's head is in every one of its pairs
        unique_rows, where = np.unique(np.concatenate([ca, cb]), return_inverse=True)
        chunk_sigs = np.asarray(sigs[unique_rows])
        ok = jaccard(chunk_sigs[where[:len(ca)]], chunk_sigs[where[len(ca):]]) >= threshold
        edges.append(np.stack([ca[ok], cb[ok]], axis=1))
    return np.concatenate(edges)


def duplicate_groups(edges: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(removed rows, ascending; the representative of each): connected components over the rows in an edge, each
    group represented by its smallest row.  Memory in the edges, not in the corpus."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.concatenate([np.zeros((0, 2), dtype=np.int64), *edges])
    if not len(pairs):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nodes, index = np.unique(pairs, return_inverse=True)  # sorted: a smaller index is a smaller row
    index = index.reshape(pairs.shape)
    k = len(nodes)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (index[:, 0], index[:, 1])), shape=(k, k))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, k, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(k))
    representative = nodes[first[labels]]
    removed = representative != nodes
    return nodes[removed], representative[removed]


def find_duplicates(sigs: np.ndarray, bands: np.ndarray, images: np.ndarray, is_caption: np.ndarray,
                    threshold: float, *, near_text: bool = True, exact_images: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """In memory, for arrays that fit: (representative index of every row, whether it was linked by an image
    match).  The stage runs the same steps over bucket files."""
    n = len(images)
    rows = np.arange(n)
    image_edges = np.zeros((0, 2), dtype=np.int64)
    edges = []
    if exact_images:
        cap = np.flatnonzero(is_caption & (images != 0))
        image_edges = equal_key_edges(images[cap], cap)
        edges.append(image_edges)
    if near_text:
        edges.append(text_edges(bands.ravel(), np.repeat(rows, bands.shape[1]), sigs, threshold))
    removed, rep = duplicate_groups(edges)
    representative = rows.copy()
    representative[removed] = rep
    by_image = np.zeros(n, dtype=bool)
    by_image[image_edges[:, 1]] = True
    return representative, by_image


def run_dedup(stage: DedupStage, ctx: StageContext) -> dict:
    """The dedup stage's runner (`curate/stages.py`): the steps in this module's docstring."""
    files = stage_files(ctx.parent)
    minhash = stage.minhash()
    bands_n, rows_n = minhash.bands
    work = ctx.work / ".work"
    work.mkdir()
    sig_file = SignatureFile(work / "sig.bin", stage.num_perm)
    buckets = KeyBuckets(work, ctx.rows * (bands_n * stage.near_text + stage.exact_images))
    rewritable, rows_of = _sign(stage, ctx, files, minhash, sig_file, buckets)
    signatures = sig_file.reader()
    removed_rows, representative, by_image = _duplicates(signatures, buckets, stage.threshold, ctx.engine)
    copier = KeptCopier(ctx.writer, signatures, removed_rows, representative, by_image,
                        ImageRebase(ctx.parent, ctx.final))
    _copy_kept(copier, files, rows_of, rewritable)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return {"bands": bands_n, "rows_per_band": rows_n, "removed": dict(copier.removed),
            "kept": ctx.writer.kind_counts()}


def _sign(stage: DedupStage, ctx: StageContext, files: dict[str, Path], minhash: MinHashSpec,
          sig_file: SignatureFile, buckets: KeyBuckets) -> tuple[np.ndarray, dict[str, int]]:
    """The first pass, on the chosen engine: every row's signature to `sig_file`, its band keys and (caption rows)
    its image key to `buckets`; returns whether each row's line may be re-based as text, and the rows per kind."""
    n = ctx.rows
    rewritable = np.zeros(n, dtype=bool)
    rows_of: dict[str, int] = {}
    at = 0
    for kind, file in files.items():
        fn = DedupFeatures(kind, str(ctx.parent), minhash, str(file))
        first = at
        try:
            for batch in map_batches([file], fn, engine=ctx.engine, batch_size=BATCH_ROWS):
                m = len(batch["image"])
                rows = np.arange(at, at + m, dtype=np.uint64)
                sig_file.append(batch["sig"])
                if stage.near_text:
                    buckets.add(batch["bands"], rows)
                if stage.exact_images and kind == "caption":
                    has = batch["image"] != 0
                    buckets.add(batch["image"][has, None], rows[has] | IMAGE_PAIR)
                rewritable[at:at + m] = batch["rewritable"]
                at += m
                ctx.progress.advance(m)
        except DataError as exc:  # a broken line, located in its batch; batches come in order, so `at` starts it
            raise offset_row(exc, at - first) from None
        rows_of[kind] = at - first
    if at != n:
        raise RuntimeError(f"dedup read {at} rows but the parent manifest counts {n}")
    return rewritable, rows_of


def _duplicates(signatures: SignatureReader, buckets: KeyBuckets, threshold: float, engine: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed rows, ascending; the representative of each; the rows linked by an image match), from the buckets:
    in a pool where there is one (the first pass's engine), each bucket sorted and checked on its own."""
    find = BucketEdges(signatures, threshold)
    bucket_paths = buckets.close()
    found = list(ordered_map(find, bucket_paths) if engine == "processes" and len(bucket_paths) > 1
                 else map(find, bucket_paths))
    removed_rows, representative = duplicate_groups([e for pair in found for e in pair])
    by_image = np.unique(np.concatenate([np.zeros((0, 2), np.int64), *(image for _, image in found)])[:, 1])
    return removed_rows, representative, by_image


def _copy_kept(copier: KeptCopier, files: dict[str, Path], rows_of: dict[str, int], rewritable: np.ndarray) -> None:
    """The second pass, batch by batch, checking each kind holds the rows the first pass counted."""
    start = 0
    for kind, count in rows_of.items():
        lo = start
        for lines in line_batches([files[kind]], BATCH_ROWS):
            hi = lo + len(lines)
            if hi > start + count:
                raise RuntimeError(f"{files[kind]}: the second pass read more rows than the first, {count}")
            copier.copy(kind, lines, lo, rewritable[lo:hi])
            lo = hi
        if lo - start != count:
            raise RuntimeError(f"{files[kind]}: the second pass read {lo - start} rows, the first {count}")
        start = lo


class KeptCopier:
    """The second pass: copies the kept rows' lines; only the removed rows and those they duplicate are parsed, and
    each removed row goes to `removed.jsonl` with the id of the row it duplicates.  A representative's id is held
    from its row to the last row that names it."""

    def __init__(self, writer: StageWriter, signatures: SignatureReader, removed_rows: np.ndarray,
                 representative: np.ndarray, by_image: np.ndarray, rebase: ImageRebase):
        self.writer, self.signatures, self.rebase = writer, signatures, rebase
        self.removed_rows, self.representative, self.by_image = removed_rows, representative, by_image
        self.wanted = np.unique(representative)
        self.last_named = np.zeros(len(self.wanted), dtype=np.int64)
        np.maximum.at(self.last_named, np.searchsorted(self.wanted, representative), removed_rows)
        self.forget_order, self.forgotten = np.argsort(self.last_named, kind="stable"), 0
        self.ids: dict[int, str] = {}
        self.removed: Counter = Counter()

    def copy(self, kind: str, lines: list[str], lo: int, rewritable: np.ndarray) -> None:
        """One batch: `lines` are rows lo, lo + 1, ... of the stage's row numbering."""
        hi = lo + len(lines)
        first_gone, end_gone = np.searchsorted(self.removed_rows, [lo, hi])
        gone, reps = self.removed_rows[first_gone:end_gone], self.representative[first_gone:end_gone]
        keep = np.ones(hi - lo, dtype=bool)
        keep[gone - lo] = False
        self.writer.lines(kind, _kept_text(lines, keep, rewritable, self.rebase), int(keep.sum()))
        for i in self.wanted[np.searchsorted(self.wanted, lo):np.searchsorted(self.wanted, hi)]:
            self.ids[int(i)] = json.loads(lines[i - lo]).get("id")
        self._write_removed(kind, lines, lo, gone, reps)
        while self.forgotten < len(self.wanted) and self.last_named[self.forget_order[self.forgotten]] < hi:
            self.ids.pop(int(self.wanted[self.forget_order[self.forgotten]]), None)
            self.forgotten += 1

    def _write_removed(self, kind: str, lines: list[str], lo: int, gone: np.ndarray, reps: np.ndarray) -> None:
        similarity = jaccard(self.signatures[gone], self.signatures[reps]) if len(gone) else []
        gone_rows = json.loads(f"[{','.join(lines[i - lo] for i in gone)}]")
        entries = []
        for rep, sim, same_image, row in zip(reps, similarity, np.isin(gone, self.by_image), gone_rows, strict=True):
            reason = SAME_IMAGE if same_image else NEAR_TEXT
            self.removed[f"{kind}: {reason}"] += 1
            entries.append(encode_row({"id": row.get("id"), "kind": kind, "reason": reason,
                                       "duplicate_of": self.ids.get(int(rep)), "similarity": round(float(sim), 3),
                                       "source": row.get("source")}))
        if entries:  # one write a batch: a write a row cost 0.6 s at 1M rows
            self.writer.lines("removed", "".join(entries), len(entries))


def _kept_text(lines: list[str], keep: np.ndarray, rewritable: np.ndarray, rebase: ImageRebase) -> str:
    """The kept lines as the output holds them: re-based as text together where each may be, else row by row."""
    if rebase.textual and rewritable[keep].all():
        return rebase.lines("".join(compress(lines, keep)))
    return "".join(rebase.lines(line) if ok and rebase.textual else rebase.row(json.loads(line))
                   for line, ok in compress(zip(lines, rewritable, strict=True), keep))

