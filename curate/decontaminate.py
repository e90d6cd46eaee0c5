"""Stage 2b, decontaminate: remove every training row whose image or text appears in an evaluation set.

    patho-r1 curate decontaminate curated/02-dedup --against PathMMU_TEST.tsv PathVQA_TEST.tsv --out curated/03-decon

A training row goes when any of these holds for any benchmark item:
- **same image bytes**: equal sha256;
- **same picture, re-encoded** (`perceptual`): 63-bit difference hashes (dHash: 9x8 grey thumbnail, one bit per
  horizontal gradient) at most `max_hamming` bits apart, found through equal chunks (pigeonhole) rather than by
  comparing every pair.  Benchmarks such as VLMEvalKit's TSVs re-encode the images their sources published,
  so byte hashes alone miss most of the overlap with PubMed-derived training corpora;
- **near-duplicate text**: estimated Jaccard of word-shingle MinHash >= `threshold`, compared only for texts of at
  least `min_words` words (a generic question matches every other).

Benchmarks are small (thousands of items) and held in memory; the training rows stream.  `removed.jsonl` lists
each removed row with the benchmark file and item it matched, and the manifest counts them per benchmark and
reason: what was removed, and why, is part of the dataset's record.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from patho_r1.curate.config import DecontaminateStage
from patho_r1.curate.engine import map_batches
from patho_r1.curate.minhash import MinHashSpec, jaccard, n_words
from patho_r1.curate.rows import image_digest, image_paths, row_text
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import iter_jsonl, read_stage_manifest, relative_images, stage_files

SAME_BYTES, SAME_PICTURE, NEAR_TEXT = "benchmark image (same bytes)", "benchmark image (re-encoded)", \
    "benchmark text"


def dhash(data: bytes | Path) -> int:
    """64-bit difference hash of an image (robust to re-encoding and rescaling)."""
    img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    img.draft("L", (64, 64))  # JPEG: decode at 1/8 scale, which is all a 9x8 thumbnail needs
    pixels = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0] >> np.uint64(1))  # 63 bits: fits numpy int64 and JSON


@dataclass
class Benchmark:
    """Everything compared against, from all `against` files: digests, dHashes, texts and their signatures."""

    sha: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 -> (file, item id)
    dhash: dict[int, tuple[str, str]] = field(default_factory=dict)
    # dHash chunks -> dHashes holding them: within `max_hamming` bits, one of max_hamming + 1 chunks is equal
    chunks: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    max_hamming: int = 0
    texts: list[tuple[str, str]] = field(default_factory=list)  # (file, item id) per text
    sigs: np.ndarray | None = None
    keys: np.ndarray | None = None  # (bands, n) sorted band keys
    order: np.ndarray | None = None  # (bands, n) text index of each sorted key


def _benchmark_items(path: Path):
    """(item id, text, images as bytes or paths) of a benchmark: a VLMEvalKit TSV, or a curated folder."""
    if path.is_dir() and read_stage_manifest(path) is not None:
        for kind, file in stage_files(path).items():
            for row in iter_jsonl(file):
                yield row.get("id"), row_text(kind, row), image_paths(row, path)
        return
    from patho_r1.formats import ImportOptions, get_format

    fmt, opts = get_format("vlmeval-tsv"), ImportOptions()
    for label, row_no, raw in fmt.rows(path, opts):
        converted = fmt.convert(raw, (label, row_no), opts)
        converted.check_files((label, row_no))
        yield converted.record["id"], row_text("mcq", converted.record), converted.images


def load_benchmarks(stage: DecontaminateStage) -> Benchmark:
    import hashlib

    bench = Benchmark(max_hamming=stage.max_hamming)
    texts = []
    for file in stage.against:
        for item_id, text, images in _benchmark_items(Path(file)):
            for image in images:
                data = image if isinstance(image, bytes) else Path(image).read_bytes()
                bench.sha.setdefault(hashlib.sha256(data).hexdigest(), (file, item_id))
                if stage.perceptual:
                    h = dhash(data)
                    if h not in bench.dhash:
                        bench.dhash[h] = (file, item_id)
                        for c in _chunks(h, stage.max_hamming + 1):
                            bench.chunks.setdefault(c, []).append(h)
            if n_words(text) >= stage.min_words:
                texts.append(text)
                bench.texts.append((file, item_id))
    bench.sigs, keys = stage.minhash().sign(texts)
    keys = keys.T  # (bands, n)
    bench.order = np.argsort(keys, axis=1, kind="stable")
    bench.keys = np.take_along_axis(keys, bench.order, axis=1)
    return bench


@dataclass
class ContaminationFeatures:
    """One batch of rows -> signatures, band keys and (when perceptual) dHashes of each row's images."""

    kind: str
    base: str
    minhash: MinHashSpec
    min_words: int
    perceptual: bool

    def __call__(self, lines: list[str]) -> dict[str, np.ndarray]:
        parsed = [json.loads(line) for line in lines]
        texts = [row_text(self.kind, r) for r in parsed]
        sigs, bands = self.minhash.sign(texts)
        long_enough = np.array([n_words(t) >= self.min_words for t in texts], dtype=bool)
        hashes = np.zeros((len(parsed), 4), dtype=np.int64)  # up to 4 images per row are compared by picture
        if self.perceptual:
            for i, row in enumerate(parsed):
                for j, path in enumerate(image_paths(row, Path(self.base))[:4]):
                    hashes[i, j] = dhash(path)
        return {"sig": sigs, "bands": bands, "long": long_enough, "dhash": hashes}


def _chunks(h: int, n: int) -> list[tuple[int, int]]:
    width = -(-63 // n)
    return [(i, (h >> (i * width)) & ((1 << width) - 1)) for i in range(n)]


def picture_match(bench: Benchmark, h: int) -> tuple[str, str] | None:
    """The benchmark item whose dHash is within `max_hamming` bits of `h`, or None."""
    if h in bench.dhash:
        return bench.dhash[h]
    for c in _chunks(h, bench.max_hamming + 1):
        for other in bench.chunks.get(c, ()):
            if (h ^ other).bit_count() <= bench.max_hamming:
                return bench.dhash[other]
    return None


def _text_match(bench: Benchmark, sig: np.ndarray, keys: np.ndarray, threshold: float) -> tuple[int, float] | None:
    """The first benchmark text this row's signature matches, with the estimated similarity."""
    if bench.keys is None or bench.keys.shape[1] == 0:
        return None
    for band, key in enumerate(keys):
        lo = np.searchsorted(bench.keys[band], key, side="left")
        hi = np.searchsorted(bench.keys[band], key, side="right")
        for idx in bench.order[band, lo:hi]:
            sim = float(jaccard(sig, bench.sigs[idx]))
            if sim >= threshold:
                return int(idx), sim
    return None


def run_decontaminate(stage: DecontaminateStage, ctx: StageContext) -> dict:
    parent, writer = ctx.parent, ctx.writer
    bench = load_benchmarks(stage)
    removed: Counter = Counter()
    for kind, file in stage_files(parent).items():
        fn = ContaminationFeatures(kind, str(parent), stage.minhash(), stage.min_words, stage.perceptual)
        rows = iter_jsonl(file)
        for batch in map_batches([file], fn, engine=ctx.engine, batch_size=1024):
            for i in range(len(batch["long"])):
                row = next(rows)
                hit = _match(stage, bench, parent, row, batch, i)
                if hit is None:
                    writer.row(kind, relative_images(row, parent, ctx.final))
                else:
                    reason, (bench_file, bench_id), sim = hit
                    removed[f"{Path(bench_file).name}: {reason}"] += 1
                    writer.removed({"id": row.get("id"), "kind": kind, "reason": reason, "benchmark": bench_file,
                                    "benchmark_id": bench_id, "similarity": round(sim, 3),
                                    "source": row.get("source")})
            ctx.progress.advance(len(batch["long"]))
    return {"benchmark_images": len(bench.sha), "benchmark_texts": len(bench.texts), "removed": dict(removed),
            "kept": writer.kind_counts()}


def _match(stage: DecontaminateStage, bench: Benchmark, parent: Path, row: dict, batch: dict, i: int
           ) -> tuple[str, tuple[str, str], float] | None:
    """(reason, (benchmark file, item id), similarity) of the first benchmark item row `i` of `batch` matches: by
    its image bytes, then its picture, then its text; or None."""
    for ref in row.get("images") or []:
        if isinstance(ref, str) and (m := bench.sha.get(image_digest(ref, parent))):
            return SAME_BYTES, m, 1.0
    for h in batch["dhash"][i]:
        if h and (m := picture_match(bench, int(h))):
            return SAME_PICTURE, m, 1.0
    if batch["long"][i]:
        found = _text_match(bench, batch["sig"][i], batch["bands"][i], stage.threshold)
        if found:
            return NEAR_TEXT, bench.texts[found[0]], found[1]
    return None
