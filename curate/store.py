"""A curated dataset folder: kind files, a content-addressed image store, rejects, and a manifest, written atomically.

    DIR/caption.jsonl, DIR/mcq.jsonl, DIR/conversation.jsonl   whichever kinds the stage wrote
    DIR/images/ab/<sha256>.<ext>                               each image once, under the sha256 of its bytes
    DIR/rejects.jsonl                                          rows not taken, each with file, row, field and reason
    DIR/removed.jsonl                                          (dedup, decontaminate) rows removed, and why
    DIR/manifest.json                                          stage, config hash, inputs, counts, parent, digests

Every stage writes into a temporary sibling folder that replaces DIR in one rename (`atomic_directory`), so a crash
never leaves a half-written dataset under DIR.  Later stages do not copy images: their rows point into the import
folder's store with paths relative to their own folder, so a chain of stage folders moves as one tree.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import stat
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from patho_r1.checkpoint import SealedManifest, config_hash
from patho_r1.data import invalid_json
from patho_r1.errors import DataError

MANIFEST = "manifest.json"
KINDS = ("caption", "mcq", "conversation", "grounding")
IMAGE_DIR = "images"

# First bytes of the image formats pathology corpora ship; anything else is opened by PIL to learn its format.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"),
          (b"GIF8", "gif"), (b"BM", "bmp"))


class StageManifest(SealedManifest):
    """A curate stage folder's manifest: the shared sealed-folder fields (`parent`: the stage folder this one read;
    `files`: the sha256 of each JSONL file written; `complete`, `created`) plus the stage, its config and counts."""

    FILE: ClassVar[str] = MANIFEST

    stage: str
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str
    inputs: dict[str, str] = Field(default_factory=dict, description="input path -> digest")
    counts: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0

    def output_digest(self) -> str:
        """One digest of what this stage wrote: the next stage's input digest."""
        return config_hash(self.files)


def read_stage_manifest(directory: str | Path) -> StageManifest | None:
    """The folder's manifest, or None where it has none or one that does not parse (a torn or hand-edited file is
    not a finished stage either: the callers then say so in one line, or refuse to write over the folder)."""
    try:
        return StageManifest.read_from(directory)
    except (ValueError, OSError):  # pydantic's ValidationError is a ValueError
        return None


def input_digest(path: str | Path) -> str:
    """A cheap digest of an input: a stage folder's output digest, else a file's size, mtime and first and last MiB
    (hashing a 36 GB image corpus on every run would cost more than the stage); a folder digests its files' names,
    sizes and mtimes."""
    path = Path(path)
    manifest = read_stage_manifest(path) if path.is_dir() else None
    if manifest is not None:
        return manifest.output_digest()
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        if not path.is_dir():
            with p.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if st.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def is_done(directory: str | Path, cfg_hash: str, inputs: dict[str, str]) -> bool:
    """A finished stage with this config over these inputs: resuming skips it."""
    manifest = read_stage_manifest(directory)
    return (manifest is not None and manifest.complete and manifest.config_hash == cfg_hash
            and manifest.inputs == inputs)


UNKNOWN_EXTENSION = "img"  # bytes with none of the signatures above


def image_extension(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return UNKNOWN_EXTENSION


_PNG, _JPEG = _MAGIC[0][0], _MAGIC[1][0]
_JPEG_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))  # SOFn


def image_problem(data: bytes, max_pixels: int | None) -> str | None:
    """Why `data` is not a whole image of at most `max_pixels` pixels, or None.  PNG and JPEG, what the corpora ship,
    are checked by walking their structure here (a PNG's chunks with their CRCs to IEND, as PIL's `verify` does; a
    JPEG's segments to its scan and its end marker, which PIL's `verify` does not look for): a few microseconds,
    where PIL's open alone was a third of the import.  Other formats (rare in the corpora) must open and decode in
    PIL, whose `verify` checks little outside PNG."""
    if data.startswith(_PNG):
        return _png_problem(data, max_pixels)
    if data.startswith(_JPEG):
        return _jpeg_problem(data, max_pixels)
    return _pil_problem(data, max_pixels)


def _size_problem(width: int, height: int, max_pixels: int | None) -> str | None:
    if not width or not height:
        return f"an image of {width}x{height} pixels"
    if max_pixels and width * height > max_pixels:
        return (f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                "(Image.MAX_IMAGE_PIXELS: PIL's decompression-bomb guard, which the training loaders open images "
                "under)")
    return None


_U32, _PNG_CHUNK = struct.Struct(">I"), struct.Struct(">I4s")  # compiled once: this runs once per image


def _png_problem(data: bytes, max_pixels: int | None) -> str | None:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return "not a PNG: no header chunk after the PNG signature"
    if problem := _size_problem(_U32.unpack_from(data, 16)[0], _U32.unpack_from(data, 20)[0], max_pixels):
        return problem
    view, pos, n, has_data = memoryview(data), 8, len(data), False
    while pos + 12 <= n:
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        end = pos + 12 + length
        if end > n:
            break
        if zlib.crc32(view[pos + 4:end - 4]) != _U32.unpack_from(data, end - 4)[0]:
            return f"a damaged PNG: the {kind.decode('latin-1')!r} chunk at byte {pos} fails its CRC"
        if kind == b"IEND":
            return None if has_data else "a PNG with no image data (no IDAT chunk)"
        has_data = has_data or kind == b"IDAT"
        pos = end
    return f"a truncated PNG: {n:,} bytes, cut before its IEND chunk"


def _jpeg_problem(data: bytes, max_pixels: int | None) -> str | None:
    pos, n, size = 2, len(data), None
    while True:  # the segments before the scan: each is FF, a marker, and a 2-byte length that counts itself
        if pos + 4 > n:
            return f"a truncated JPEG: {n:,} bytes, cut before its image data"
        marker = data[pos + 1]
        if data[pos] != 0xFF or (marker < 0xC0 and marker != 0x01):
            return f"not a JPEG: no marker at byte {pos}"
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            return "a JPEG that ends before its image data"
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return f"a truncated JPEG: the segment at byte {pos} runs past the end ({n:,} bytes)"
        if marker in _JPEG_FRAMES and length >= 8:
            size = (int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big"))
        if marker == 0xDA:  # the scan starts
            break
        pos += 2 + length
    if size is None:
        return "a JPEG with no frame header before its image data"
    if problem := _size_problem(*size, max_pixels):
        return problem
    # coded data escapes each FF byte it holds (FF 00), so an FF D9 after the scan starts is the end-of-image marker
    if data.rfind(b"\xff\xd9", pos) < 0:
        return f"a truncated JPEG: {n:,} bytes, no end-of-image marker"
    return None


def _pil_problem(data: bytes, max_pixels: int | None) -> str | None:
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # its bomb warning: the size is checked here, against our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if problem := _size_problem(*im.size, max_pixels):  # before the decode, which it bounds
                    return problem
                im.load()
    except Image.DecompressionBombError as exc:
        return f"over the pixel limit ({exc})"
    except Exception as exc:  # PIL raises a dozen kinds on malformed bytes (OSError, SyntaxError, struct.error, ...)
        return f"not a readable image ({type(exc).__name__})"
    return None


class ImageStore:
    """Images under `root/ab/<sha256>.<ext>`: identical bytes are stored once, however many rows and sources name
    them.  Parallel workers may share a store: creation is exclusive, and two writers of one hash hold the same
    bytes."""

    def __init__(self, root: str | Path, link: bool = False):
        self.root = str(root)
        self.link = link  # hard-link source files instead of copying them (same filesystem; else copied)
        self._folders: set[str] = set()  # the ab/ folders made (256 at most): no stat per row

    def put(self, data: bytes, source: str | Path | None = None, digest: str | None = None) -> tuple[str, str]:
        """Store `data` (read from the file `source`, if it came from one; `digest`: its sha256, if known); returns
        (its path relative to the store's parent folder, its sha256)."""
        digest = digest or hashlib.sha256(data).hexdigest()
        rel = f"{digest[:2]}/{digest}.{image_extension(data)}"
        path = f"{self.root}/{rel}"  # not pathlib, nor os.path.join: once per row
        if digest[:2] not in self._folders:
            os.makedirs(f"{self.root}/{digest[:2]}", exist_ok=True)
            self._folders.add(digest[:2])
        # Written in place, not via a temporary name: the store lives in the stage's temporary folder, which only
        # becomes the dataset once complete.  Creation is exclusive, so an image stored before (by this row's twin,
        # or a parallel writer) fails here without a byte written, and without a stat first.
        try:
            if not (self.link and source is not None and _hard_link(source, path)):
                with open(path, "xb") as fh:
                    fh.write(data)
        except FileExistsError:
            pass
        return f"{IMAGE_DIR}/{rel}", digest


# Where the kernel says an open file is: one readlink, where os.path.realpath would lstat each folder on its path.
_FD_PATHS = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else None


def read_image_file(path: str, check: Callable[[str], None] | None = None) -> bytes:
    """A file's bytes, by four system calls, five with `check` (open, fstat, [readlink,] read, close;
    `open(path, "rb").read()` makes nine: also a terminal check, two seeks, a second fstat, and a second read to find
    the end, a third more time per image on this project's 2-core test machine).  `check(real_path)` runs after the
    open and before a byte is read, with the real path of what was opened (symbolic links resolved): it raises to
    refuse the file.  Opened without blocking and refused unless a regular file: a FIFO named x.jpg would hang the
    import, and /dev/zero never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(errno.EINVAL, "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file", path)
        if check is not None:
            check(os.readlink(f"{_FD_PATHS}/{fd}") if _FD_PATHS else os.path.realpath(path))
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:  # it grew since the fstat: the rest, to the end
            data += b"".join(iter(functools.partial(os.read, fd, 1 << 20), b""))
        return data
    finally:
        os.close(fd)


class NotARegularFile(OSError):
    """A device, FIFO or socket where an image file was named."""


def _hard_link(source: str | Path, path: str) -> bool:
    """Link `path` to `source` (a directory entry: about 7x faster than writing a new file, and no second copy);
    False where the filesystems differ or links are not allowed.  An existing `path` still raises."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise
    except OSError:
        return False
    return True


# One encoder for every row: json.dumps builds a new one at each call when given options.
_encode = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode


def encode_row(row: dict) -> str:
    """A row as the JSONL line a stage writes (with its newline): for workers that encode what `StageWriter.lines`
    then writes."""
    return _encode(row) + "\n"


class _HashingWriter:
    """A JSONL file written line by line, hashed as it is written (the manifest's digest costs no second read)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = path.open("w", encoding="utf-8")
        self.sha = hashlib.sha256()
        self.n = 0

    def write(self, row: dict) -> None:
        self.write_lines(_encode(row) + "\n", 1)

    def write_lines(self, text: str, n: int) -> None:
        self.fh.write(text)
        self.sha.update(text.encode("utf-8"))
        self.n += n

    def close(self) -> str:
        self.fh.close()
        return self.sha.hexdigest()


class StageWriter:
    """What one stage writes into its (temporary) folder: rows by kind, rejects, removals, counts."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, _HashingWriter] = {}
        self.counts: Counter = Counter()

    def _writer(self, name: str) -> _HashingWriter:
        if name not in self._writers:
            self._writers[name] = _HashingWriter(self.directory / f"{name}.jsonl")
        return self._writers[name]

    def row(self, kind: str, row: dict) -> None:
        self._writer(kind).write(row)

    def lines(self, kind: str, text: str, n: int) -> None:
        """`n` rows of `kind` already encoded (`encode_row`), joined: one write and one hash update for them all."""
        self._writer(kind).write_lines(text, n)

    def reject(self, path: str, row: int | None, field: str | None, reason: str, source: str | None = None) -> None:
        self._writer("rejects").write({"file": path, "row": row, "field": field, "reason": reason, "source": source})

    def removed(self, entry: dict) -> None:
        self._writer("removed").write(entry)

    def close(self) -> dict[str, str]:
        """Close every file; returns name -> sha256 for the manifest, and the row count of each."""
        files = {}
        for name, writer in self._writers.items():
            files[f"{name}.jsonl"] = writer.close()
            self.counts[f"rows.{name}"] = writer.n
        return files

    def kind_counts(self) -> dict[str, int]:
        return {k: self._writers[k].n for k in KINDS if k in self._writers}


def stage_files(directory: str | Path) -> dict[str, Path]:
    """The kind files a stage folder holds, by kind."""
    directory = Path(directory)
    return {k: directory / f"{k}.jsonl" for k in KINDS if (directory / f"{k}.jsonl").is_file()}


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSONL file that this package wrote (already validated): plain json, no record parsing.  A line
    broken since (a truncated or hand-edited file) raises a DataError naming it."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise invalid_json(path, n, exc) from None


def parse_lines(lines: list[str], path: str | Path) -> list[dict]:
    """The rows of a batch of non-blank JSONL lines from `path`, in one json call (a fifth faster than one a line).
    A broken line raises a DataError with its 1-based place in the batch as the row: the caller, which knows where
    the batch starts, turns it into the file's row (`offset_row`)."""
    try:
        return json.loads(f"[{','.join(lines)}]")
    except json.JSONDecodeError:
        for i, line in enumerate(lines, start=1):
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise invalid_json(path, i, exc) from None
        raise  # every line is JSON, so their list is: not reached


def offset_row(exc: DataError, rows_before: int) -> DataError:
    """`exc` (raised for a batch) with its row counted from the start of the file."""
    return DataError(exc.path, None if exc.row is None else rows_before + exc.row, exc.field, exc.message)



def relative_images(row: dict, src_dir: Path, dest_dir: Path) -> dict:
    """A row read from `src_dir`, with its image paths rewritten relative to `dest_dir` (stage chaining)."""
    if not row.get("images"):
        return row
    prefix = _relative_folder(str(src_dir), str(dest_dir))
    images = []
    for ref in row["images"]:
        if isinstance(ref, str) and not os.path.isabs(ref) and len(ref) < 4096:
            # src/ref seen from dest: the folder's relative path, then ref (lexical, as relpath is); a plain ref
            # (no '.' or '..' part, no '//') needs no normalising, and relpath per row was a fifth of the dedup
            plain = "/." not in "/" + ref and "//" not in ref
            ref = ref if prefix == "." and plain else f"{prefix}/{ref}" if plain else os.path.normpath(
                os.path.join(prefix, ref))
        images.append(ref)
    return {**row, "images": images}


_STORE_PATH = re.compile(rf"{IMAGE_DIR}/[0-9a-f]{{2}}/[0-9a-f]{{64}}\.[a-z]+")  # as `ImageStore.put` names them
_PATH_START = f'"{IMAGE_DIR}/'


def images_rewritable(line: str, row: dict) -> bool:
    """Whether `ImageRebase.lines` may re-base `line`'s image paths (`row` is the line parsed) by putting a prefix
    before each `"images/` in its text: every image path is a plain store path, and each starts the line's only such
    places (a path's text starts one, so the count tells: a caption that quotes `"images/x` makes it one more)."""
    refs = row.get("images") or []
    return line.count(_PATH_START) == len(refs) and all(isinstance(r, str) and _STORE_PATH.fullmatch(r) for r in refs)


class ImageRebase:
    """A stage's stored rows seen from another stage folder (stage chaining): `row` re-encodes one row with its image
    paths relative to `dest_dir` (`relative_images`); `lines` does the same to many lines at once, as text, where
    `images_rewritable` said so of each: one replacement over a batch in place of a parse and an encode per row,
    which were a third of the dedup."""

    def __init__(self, src_dir: str | Path, dest_dir: str | Path):
        self.src_dir, self.dest_dir = Path(src_dir), Path(dest_dir)
        prefix = _relative_folder(str(src_dir), str(dest_dir))
        # a prefix JSON would escape cannot go into the text as it is: every row is re-encoded then
        self.textual = _encode(prefix) == f'"{prefix}"'
        self._new_start = _PATH_START if prefix == "." else f'"{prefix}/{IMAGE_DIR}/'

    def row(self, row: dict) -> str:
        return encode_row(relative_images(row, self.src_dir, self.dest_dir))

    def lines(self, text: str) -> str:
        """Rewritable lines, joined, as `row` would write their rows (the last line's newline added if missing: a
        file's last line, or Ray Data's lines)."""
        if text and not text.endswith("\n"):
            text += "\n"
        return text.replace(_PATH_START, self._new_start) if self._new_start != _PATH_START else text

    def line(self, line: str, row: dict) -> str:
        return self.lines(line) if self.textual and images_rewritable(line, row) else self.row(row)


@functools.lru_cache(maxsize=64)
def _relative_folder(src_dir: str, dest_dir: str) -> str:
    return os.path.relpath(os.path.abspath(src_dir), os.path.abspath(dest_dir))
