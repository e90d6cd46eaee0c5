"""Stage 1, import: public corpora in their own formats -> our caption / mcq / conversation kinds.

    patho-r1 curate import --format quilt-1m quilt_1M_lookup.csv --images quilt_1m/ --out curated/01-import

Every row is converted by its format (`patho/formats.py`), its images are stored once under their content hash,
and the record is validated by the same models `patho-r1 data validate` uses.  A bad row stops the import with its
file, row and field; with `on_error: skip` it goes to `rejects.jsonl` with the reason and is counted, so nothing is
dropped silently.  Rows stream: memory does not grow with the corpus.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from patho_r1.curate.config import ImportStage, SourceSpec
from patho_r1.curate.store import IMAGE_DIR, UNKNOWN_EXTENSION, ImageStore, StageWriter
from patho_r1.data import parse_record
from patho_r1.errors import DataError
from patho_r1.formats import Converted, ImportOptions, get_format
from patho_r1.progress import RowProgress, count_lines


def _estimate_rows(spec: SourceSpec) -> int | None:
    """Rows a source holds, for the ETA (a line count for text tables, parquet metadata), or None."""
    path = Path(spec.path)
    try:
        if path.is_file() and path.suffix in (".csv", ".tsv", ".jsonl"):
            return max(count_lines(path) - (path.suffix != ".jsonl"), 0)
        if path.suffix == ".parquet" or path.is_dir():
            import pyarrow.parquet as pq

            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if files:
                return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except OSError:
        pass
    return None


class _Images:
    """Store each image once and check, the first time a hash is seen in a chunk, that it is an image."""

    def __init__(self, root: Path, link: bool = False):
        self.store = ImageStore(root / IMAGE_DIR, link=link)
        self.root = root
        self._checked: set[str] = set()  # one chunk's digests: bounded by the chunk size

    def add(self, source: bytes | Path, where: tuple[str, int], field: str) -> str:
        if isinstance(source, bytes):
            data = source
        else:
            with open(source, "rb") as fh:
                data = fh.read()
        rel, digest = self.store.put(data, None if isinstance(source, bytes) else source)
        if digest not in self._checked:
            try:
                # a file with a known image signature is taken as one (`patho-r1 data validate` opens every image
                # of a stage's files); others must open in PIL, whose header parsing was a third of the import
                if rel.endswith(f".{UNKNOWN_EXTENSION}"):
                    Image.open(io.BytesIO(data))
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                (self.root / rel).unlink(missing_ok=True)
                raise DataError(where[0], where[1], field, f"not a readable image ({type(exc).__name__})") from None
            self._checked.add(digest)
        return rel


def convert_chunk(fmt_name: str, opts: ImportOptions, license_: str | None, label: str, out: str, link: bool,
                  chunk: list[tuple[str, int, object]]) -> list[tuple]:
    """Convert, store and validate one chunk of raw rows: `("row", kind, row)` or `("reject", DataError)` each, in
    order.  Runs here or as a Ray task; the image store is safe for parallel writers."""
    fmt = get_format(fmt_name)
    base_dir = Path(out)
    images = _Images(base_dir, link)
    results: list[tuple] = []
    for file_label, row_no, raw in chunk:
        where = (file_label, row_no)
        try:
            converted: Converted = fmt.convert(raw, where, opts)
            refs = [images.add(src, where, f"images[{i}]") for i, src in enumerate(converted.images)]
            row = {**converted.record, "images": refs, "source": label}
            if license_:
                row["license"] = license_
            row = {k: v for k, v in row.items() if v is not None}
            parse_record(row, converted.kind, path=file_label, row=row_no, base_dir=base_dir, check_images=False)
        except DataError as exc:
            results.append(("reject", exc))
        else:
            results.append(("row", converted.kind, row))
    return results


def _chunks(rows, size: int):
    chunk = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _converted_chunks(engine: str, args: tuple, chunks):
    """Each chunk's results, in order: in this process, or as Ray tasks with a bounded number in flight."""
    if engine != "ray":
        for chunk in chunks:
            yield convert_chunk(*args, chunk)
        return
    import ray

    from patho_r1.curate.engine import ensure_ray

    ensure_ray()
    task = ray.remote(convert_chunk)
    shared = [ray.put(a) for a in args]
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = []
    for chunk in chunks:
        pending.append(task.remote(*shared, chunk))
        if len(pending) >= window:
            yield ray.get(pending.pop(0))
    for ref in pending:
        yield ray.get(ref)


def import_sources(stage: ImportStage, out: Path, writer: StageWriter, progress: RowProgress,
                   engine: str = "local", chunk_size: int = 2048) -> dict:
    """Import every source of `stage` into the (temporary) folder `out`; returns per-source counts."""
    per_source: dict[str, dict] = {}
    for spec in stage.sources:
        fmt = get_format(spec.format)
        opts = ImportOptions(images=Path(spec.images) if spec.images else None, columns=spec.columns,
                             kind=spec.kind)
        license_ = spec.license or fmt.license
        counts: Counter = Counter()
        args = (spec.format, opts, license_, spec.label, str(out), stage.images == "link")
        for results in _converted_chunks(engine, args, _chunks(fmt.rows(Path(spec.path), opts), chunk_size)):
            for result in results:
                if result[0] == "reject":
                    exc = result[1]
                    if stage.on_error == "raise":
                        raise exc
                    writer.reject(exc.path, exc.row, exc.field, exc.message, source=spec.label)
                    counts["rejected"] += 1
                else:
                    writer.row(result[1], result[2])
                    counts[result[1]] += 1
            progress.advance(len(results))
        per_source[spec.label] = {"format": spec.format, "path": spec.path, "license": license_, **counts}
    return per_source


def estimate_total(stage: ImportStage) -> int | None:
    totals = [_estimate_rows(s) for s in stage.sources]
    return None if any(t is None for t in totals) else sum(totals)
