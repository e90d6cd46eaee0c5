"""Stage 1, import: public corpora in their own formats -> our caption / mcq / conversation kinds.

    patho-r1 curate import --format quilt-1m quilt_1M_lookup.csv --images quilt_1m/ --out curated/01-import

Every row is converted by its format (`patho/formats.py`), its images are stored once under their content hash,
and the record is validated by the same models `patho-r1 data validate` uses.  A bad row stops the import with its
file, row and field; with `on_error: skip` it goes to `rejects.jsonl` with the reason and is counted, so nothing is
dropped silently.  Rows stream: memory does not grow with the corpus.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from patho_r1.curate.config import ImportStage, SourceSpec
from patho_r1.curate.engine import ordered_map
from patho_r1.curate.store import IMAGE_DIR, UNKNOWN_EXTENSION, ImageStore, StageWriter, encode_row, read_file
from patho_r1.data import parse_record
from patho_r1.errors import DataError
from patho_r1.formats import Converted, ImageFile, ImportOptions, get_format
from patho_r1.progress import RowProgress, count_lines

CHUNK_ROWS = 2048  # raw rows converted at once (a pool worker's unit of work)


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


@dataclass
class ConvertedChunk:
    """One chunk of raw rows, converted: each kind's rows as their JSONL lines, joined (encoded where they were
    converted, so a pool's workers do that work too), and the rows not taken, in order."""

    size: int
    lines: dict[str, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    rejects: list[DataError] = field(default_factory=list)


class ChunkConverter:
    """Convert, store, validate and encode chunks of one source's raw rows.  Runs here, in each worker of a process
    pool (sent once, so its image store's folder cache stays warm), or in Ray tasks; the image store is safe for
    parallel writers."""

    def __init__(self, fmt_name: str, opts: ImportOptions, license_: str | None, label: str, out: str, link: bool):
        self.fmt_name, self.opts, self.license, self.label = fmt_name, opts, license_, label
        self.base_dir = Path(out)
        self.store = ImageStore(self.base_dir / IMAGE_DIR, link=link)

    def __call__(self, chunk: list[tuple[str, int, object]]) -> ConvertedChunk:
        fmt = get_format(self.fmt_name)
        checked: set[str] = set()  # this chunk's digests already checked: bounded by the chunk size
        lines: dict[str, list[str]] = defaultdict(list)
        out = ConvertedChunk(len(chunk))
        for file_label, row_no, raw in chunk:
            where = (file_label, row_no)
            try:
                converted: Converted = fmt.convert(raw, where, self.opts)
                refs = [self._store(src, where, f"images[{i}]", checked) for i, src in enumerate(converted.images)]
                row = {**converted.record, "images": refs, "source": self.label}
                if self.license:
                    row["license"] = self.license
                row = {k: v for k, v in row.items() if v is not None}
                parse_record(row, converted.kind, path=file_label, row=row_no, base_dir=self.base_dir,
                             check_images=False)
            except DataError as exc:
                out.rejects.append(exc)
            else:
                lines[converted.kind].append(encode_row(row))
        out.lines = {kind: "".join(rows) for kind, rows in lines.items()}
        out.counts.update({kind: len(rows) for kind, rows in lines.items()})
        return out

    def _store(self, source: bytes | Path, where: tuple[str, int], field: str, checked: set[str]) -> str:
        """Store an image once, and check the first time its hash is seen in a chunk that it is an image."""
        if isinstance(source, bytes):
            data = source
        else:
            try:  # no stat first: a file that is not there fails here
                data = read_file(source)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                if isinstance(source, ImageFile):
                    raise source.missing(where) from None
                raise DataError(where[0], where[1], field, f"image not found: {source}") from None
        rel, digest = self.store.put(data, None if isinstance(source, bytes) else source)
        if digest not in checked:
            try:
                # a file with a known image signature is taken as one (`patho-r1 data validate` opens every image
                # of a stage's files); others must open in PIL, whose header parsing was a third of the import
                if rel.endswith(f".{UNKNOWN_EXTENSION}"):
                    Image.open(io.BytesIO(data))
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                (self.base_dir / rel).unlink(missing_ok=True)
                raise DataError(where[0], where[1], field, f"not a readable image ({type(exc).__name__})") from None
            checked.add(digest)
        return rel


def _chunks(rows, size: int):
    chunk = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _convert_on_ray(convert: ChunkConverter, chunk: list) -> ConvertedChunk:
    return convert(chunk)


def _converted_chunks(engine: str, convert: ChunkConverter, chunks):
    """Each chunk's results, in order: in this process, in a process pool, or as Ray tasks with a bounded number
    in flight."""
    if engine == "processes":
        yield from ordered_map(convert, chunks)
        return
    if engine != "ray":
        yield from map(convert, chunks)
        return
    import ray

    from patho_r1.curate.engine import ensure_ray

    ensure_ray()
    task = ray.remote(_convert_on_ray)
    shared = ray.put(convert)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = []
    for chunk in chunks:
        pending.append(task.remote(shared, chunk))
        if len(pending) >= window:
            yield ray.get(pending.pop(0))
    for ref in pending:
        yield ray.get(ref)


def import_sources(stage: ImportStage, out: Path, writer: StageWriter, progress: RowProgress,
                   engine: str = "local") -> dict:
    """Import every source of `stage` into the (temporary) folder `out`; returns per-source counts."""
    per_source: dict[str, dict] = {}
    for spec in stage.sources:
        fmt = get_format(spec.format)
        opts = ImportOptions(images=Path(spec.images) if spec.images else None, columns=spec.columns,
                             kind=spec.kind)
        license_ = spec.license or fmt.license
        counts: Counter = Counter()
        convert = ChunkConverter(spec.format, opts, license_, spec.label, str(out), stage.images == "link")
        for done in _converted_chunks(engine, convert, _chunks(fmt.rows(Path(spec.path), opts), CHUNK_ROWS)):
            if done.rejects and stage.on_error == "raise":
                raise done.rejects[0]
            for exc in done.rejects:
                writer.reject(exc.path, exc.row, exc.field, exc.message, source=spec.label)
            for kind, text in done.lines.items():
                writer.lines(kind, text, done.counts[kind])
            counts.update(done.counts)
            if done.rejects:
                counts["rejected"] += len(done.rejects)
            progress.advance(done.size)
        per_source[spec.label] = {"format": spec.format, "path": spec.path, "license": license_, **counts}
    return per_source


def estimate_total(stage: ImportStage) -> int | None:
    totals = [_estimate_rows(s) for s in stage.sources]
    return None if any(t is None for t in totals) else sum(totals)
