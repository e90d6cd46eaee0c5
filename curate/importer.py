"""Stage 1, import: public corpora in their own formats -> our caption / mcq / conversation kinds.

    patho-r1 curate import --format quilt-1m quilt_1M_lookup.csv --images quilt_1m/ --out curated/01-import

Every row is converted by its format (`patho/formats.py`), its images are stored once under their content hash,
and the record is validated by the same models `patho-r1 data validate` uses.  A bad row stops the import with its
file, row and field; with `on_error: skip` it goes to `rejects.jsonl` with the reason and is counted, so nothing is
dropped silently.  Bad means, besides what the format and the record models refuse: an image file that resolves
outside its source's image folder (unless `allow_outside_images`), an image that is not whole or has more than
`Image.MAX_IMAGE_PIXELS` pixels, a text field over `MAX_TEXT_CHARS` characters, and an id an earlier row has (the
later row is the bad one).  A source with no rows at all is an error.  Rows stream: memory grows by 24 bytes a row
(the ids seen), not with the rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from patho_r1.curate.config import ImportStage, SourceSpec
from patho_r1.curate.engine import ordered_map
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import IMAGE_DIR, ImageStore, StageWriter, encode_row, image_problem, read_image_file
from patho_r1.data import MAX_TEXT_CHARS, parse_record
from patho_r1.errors import DataError
from patho_r1.formats import Converted, ImageFile, ImportOptions, check_inside_root, get_format, real_folder
from patho_r1.progress import RowProgress, count_lines

CHUNK_ROWS = 2048  # raw rows converted at once (a pool worker's unit of work)

# Why a text field may hold MAX_TEXT_CHARS characters and no more, for `--help` and each reject.
TEXT_LIMIT_WHY = ("about 25k tokens: longer is a broken export (a whole article or file in one cell), not a caption, "
                  "question or answer, and training would see only its first max_length tokens")


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
    converted, so a pool's workers do that work too); for each row taken, in order, its kind, file, row and a
    16-byte hash of its id (for the duplicate check, which only the caller can make); and the rows not taken."""

    size: int
    lines: dict[str, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    kinds: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    id_keys: bytes = b""
    rejects: list[DataError] = field(default_factory=list)


_NO_ID = bytes(16)  # the key of a row without an id (a plugin format's): never registered, so never a duplicate


def id_key(row_id: str | None) -> bytes:
    """A 128-bit hash of an id: equal in every process (Python's own `hash` of a str is not)."""
    return _NO_ID if row_id is None else hashlib.blake2b(row_id.encode(), digest_size=16).digest()


def long_text(fields: dict | list, name: str = "") -> tuple[str, int] | None:
    """The first text in a record's fields (nested in options or messages, too) longer than MAX_TEXT_CHARS: its
    field path (`caption`, `options.B`, `messages[1].content`) and length, or None.  A loop over the fields, not a
    call per value: it runs once per row."""
    for key, value in fields.items() if isinstance(fields, dict) else enumerate(fields):
        if isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS:
                return _field_path(fields, name, key), len(value)
        elif isinstance(value, dict | list) and (hit := long_text(value, _field_path(fields, name, key))):
            return hit
    return None


def _field_path(fields: dict | list, name: str, key: object) -> str:
    return f"{name}[{key}]" if isinstance(fields, list) else f"{name}.{key}" if name else str(key)


class ChunkConverter:
    """Convert, check, store, validate and encode chunks of one source's raw rows.  Runs here, in each worker of a
    process pool (sent once, so its image store's folder cache stays warm), or in Ray tasks; the image store is safe
    for parallel writers."""

    def __init__(self, fmt_name: str, opts: ImportOptions, license_: str | None, label: str, out: str, link: bool):
        self.fmt_name, self.opts, self.license, self.label = fmt_name, opts, license_, label
        self.base_dir = Path(out)
        self.store = ImageStore(self.base_dir / IMAGE_DIR, link=link)
        self.max_pixels = Image.MAX_IMAGE_PIXELS  # read here, so a caller's setting reaches the pool's workers

    def __call__(self, chunk: list[tuple[str, int, object]]) -> ConvertedChunk:
        fmt = get_format(self.fmt_name)
        checked: set[str] = set()  # this chunk's digests already checked: bounded by the chunk size
        lines: dict[str, list[str]] = defaultdict(list)
        out = ConvertedChunk(len(chunk))
        keys = []
        for file_label, row_no, raw in chunk:
            where = (file_label, row_no)
            try:
                converted: Converted = fmt.convert(raw, where, self.opts)
                if too_long := long_text(converted.record):  # before its images are stored
                    raise DataError(file_label, row_no, too_long[0], f"{too_long[1]:,} characters, over the "
                                    f"{MAX_TEXT_CHARS:,} one text field may hold ({TEXT_LIMIT_WHY})")
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
                out.kinds.append(converted.kind)
                out.files.append(file_label)
                out.rows.append(row_no)
                keys.append(id_key(None if row.get("id") is None else str(row["id"])))
        out.lines = {kind: "".join(rows) for kind, rows in lines.items()}
        out.counts.update({kind: len(rows) for kind, rows in lines.items()})
        out.id_keys = b"".join(keys)
        return out

    def _store(self, source: bytes | str | Path, where: tuple[str, int], field: str, checked: set[str]) -> str:
        """Store an image once, after checking (the first time its hash is seen in a chunk) that it is a whole one;
        an image file also must be inside its source's image folder."""
        if isinstance(source, bytes):
            data, name = source, field
        else:
            image = source if isinstance(source, ImageFile) else self._image_file(source, where, field)
            data, name = self._read(image, where), image.field
        digest = hashlib.sha256(data).hexdigest()
        if digest not in checked:
            if problem := image_problem(data, self.max_pixels):
                raise DataError(where[0], where[1], name, f"not a usable image: {problem}")
            checked.add(digest)
        return self.store.put(data, None if isinstance(source, bytes) else source, digest)[0]

    def _image_file(self, path: str | Path, where: tuple[str, int], field: str) -> ImageFile:
        """A plain path from a format registered elsewhere, kept to its image folder: `--images`, else the folder of
        the file that named it."""
        root = str(self.opts.images) if self.opts.images else str(Path(where[0]).parent)
        return ImageFile(str(path), field, real_folder(root))

    def _read(self, image: ImageFile, where: tuple[str, int]) -> bytes:
        guard = None if self.opts.allow_outside_images else (lambda real: check_inside_root(image, where, real))
        try:  # no stat first: a file that is not there fails here
            return read_image_file(image, guard)
        except (FileNotFoundError, NotADirectoryError):
            raise image.missing(where) from None
        except OSError as exc:  # a folder, FIFO or device where an image belongs; no permission; a symlink loop
            raise DataError(where[0], where[1], image.field, f"image not readable: {image} "
                            f"({exc.strerror or type(exc).__name__})") from None


class SeenIds:
    """The ids imported so far, and where each was first seen, in 24 bytes a row: a 128-bit hash of the id and its
    place (file number and row), in sorted runs merged as they grow (as a log-structured merge tree does).  A
    million rows hold 24 MB, where a dict of id strings held about 120; a chunk is checked with numpy, and only one
    that holds a repeat is taken apart row by row."""

    _ROW_BITS = 40

    def __init__(self):
        self.files: list[str] = []
        self._file_no: dict[str, int] = {}
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (first key half sorted, second, place)

    def admit(self, chunk: ConvertedChunk) -> tuple[dict[str, str], Counter, list[DataError]]:
        """`chunk`'s lines (joined, by kind) and counts without the rows whose id a row before them had, and a
        DataError for each of those, naming the row that had the id first."""
        n = len(chunk.kinds)
        keys = np.frombuffer(chunk.id_keys, np.uint64).reshape(n, 2)
        places = self._places(chunk.files, chunk.rows)
        # sorted once: the runs are searched in key order (numpy's searchsorted then narrows as it goes), and equal
        # keys in the chunk sit together, the first row first (a stable sort)
        order = np.argsort(keys[:, 0], kind="stable")
        k1, k2 = keys[order, 0], keys[order, 1]
        earlier = np.empty(n, np.int64)
        earlier[order] = self._lookup(k1, k2)  # an earlier chunk's row with the id, or -1
        starts = np.flatnonzero(np.r_[True, (k1[1:] != k1[:-1]) | (k2[1:] != k2[:-1])])
        first_here = np.empty(n, np.int64)
        first_here[order] = order[np.repeat(starts, np.diff(np.r_[starts, n]))]  # each group's start, everywhere
        later_here = first_here != np.arange(n)  # this chunk's first row with the id is an earlier one
        has_id = keys.any(axis=1)
        first = np.where(earlier >= 0, earlier, np.where(later_here, places[first_here], -1))
        repeat = has_id & (first >= 0)
        register = has_id & (earlier < 0) & ~later_here
        if register.any():
            self._add(keys[register], places[register])
        if not repeat.any():
            return chunk.lines, chunk.counts, []
        return self._without(chunk, repeat, first)

    def _without(self, chunk: ConvertedChunk, repeat: np.ndarray, first: np.ndarray
                 ) -> tuple[dict[str, str], Counter, list[DataError]]:
        """The rare chunk with repeats, row by row: a kind's joined lines split on the newlines that end them (JSON
        escapes any in a value)."""
        split = {kind: text.split("\n") for kind, text in chunk.lines.items()}
        taken: dict[str, list[str]] = defaultdict(list)
        at: Counter = Counter()
        duplicates = []
        for i, kind in enumerate(chunk.kinds):
            line = split[kind][at[kind]] + "\n"
            at[kind] += 1
            if repeat[i]:
                row_id = json.loads(line).get("id")
                duplicates.append(DataError(chunk.files[i], chunk.rows[i], "id", f"duplicate id {row_id!r}: "
                                            f"{self._where(int(first[i]))} has it already (each id is imported once)"))
            else:
                taken[kind].append(line)
        return ({k: "".join(v) for k, v in taken.items()}, Counter({k: len(v) for k, v in taken.items()}),
                duplicates)

    def _places(self, files: list[str], rows: list[int]) -> np.ndarray:
        """Each row's place: its file's number, then its row, in one int64."""
        distinct = set(files)
        for file in distinct:
            if file not in self._file_no:
                self._file_no[file] = len(self.files)
                self.files.append(file)
        if len(distinct) == 1:  # a chunk comes from one file but where a shard ends
            numbers = np.full(len(files), self._file_no[files[0]], np.int64)
        else:
            numbers = np.array([self._file_no[f] for f in files], np.int64)
        return numbers << self._ROW_BITS | np.array(rows, np.int64)

    def _where(self, place: int) -> str:
        return f"{self.files[place >> self._ROW_BITS]}:{place & ((1 << self._ROW_BITS) - 1)}"

    def _lookup(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """The place of each key (its two halves) in the runs, or -1."""
        found = np.full(len(first), -1, np.int64)
        for keys, checks, places in self._runs:
            i = np.minimum(np.searchsorted(keys, first), len(keys) - 1)
            found = np.where((found < 0) & (keys[i] == first) & (checks[i] == second), places[i], found)
        return found

    def _add(self, keys: np.ndarray, places: np.ndarray) -> None:
        order = np.argsort(keys[:, 0])
        self._runs.append((keys[order, 0], keys[order, 1], places[order]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= len(self._runs[-1][0]):  # like a binary counter
            (a1, a2, ap), (b1, b2, bp) = self._runs.pop(-2), self._runs.pop()
            k1, k2, p = np.concatenate([a1, b1]), np.concatenate([a2, b2]), np.concatenate([ap, bp])
            order = np.argsort(k1, kind="stable")
            self._runs.append((k1[order], k2[order], p[order]))


def _no_rows(path: Path) -> DataError:
    """A source that gave no rows at all: said, not imported as 0 rows."""
    if path.is_file() and path.stat().st_size == 0:
        why = "the file is empty"
    elif path.is_file() and path.suffix in (".csv", ".tsv"):
        why = "a header line and no rows under it"
    else:
        why = "it holds no rows"
    return DataError(path, None, None, f"no rows to import: {why}")


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
    seen = SeenIds()  # over every source: the stage's rows share one id space
    for spec in stage.sources:
        fmt = get_format(spec.format)
        opts = ImportOptions(images=Path(spec.images) if spec.images else None, columns=spec.columns,
                             kind=spec.kind, allow_outside_images=spec.allow_outside_images)
        license_ = spec.license or fmt.license
        counts: Counter = Counter()
        n_raw = 0
        convert = ChunkConverter(spec.format, opts, license_, spec.label, str(out), stage.images == "link")
        for done in _converted_chunks(engine, convert, _chunks(fmt.rows(Path(spec.path), opts), CHUNK_ROWS)):
            lines, kinds, duplicates = seen.admit(done)
            rejects = done.rejects + duplicates
            if rejects and stage.on_error == "raise":
                raise rejects[0]
            for exc in rejects:
                writer.reject(exc.path, exc.row, exc.field, exc.message, source=spec.label)
            for kind, text in lines.items():
                writer.lines(kind, text, kinds[kind])
            counts.update(kinds)
            if rejects:
                counts["rejected"] += len(rejects)
            n_raw += done.size
            progress.advance(done.size)
        if not n_raw:
            raise _no_rows(Path(spec.path))
        per_source[spec.label] = {"format": spec.format, "path": spec.path, "license": license_, **counts}
    return per_source


def run_import(stage: ImportStage, ctx: StageContext) -> dict:
    """The import stage's runner (`curate/stages.py`)."""
    return {"sources": import_sources(stage, ctx.work, ctx.writer, ctx.progress, ctx.engine)}


def estimate_total(stage: ImportStage) -> int | None:
    totals = [_estimate_rows(s) for s in stage.sources]
    return None if any(t is None for t in totals) else sum(totals)
