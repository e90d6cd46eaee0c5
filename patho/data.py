"""Typed records for the dataset kinds and streaming loaders that name the file, row and field of bad input.

Kinds and their records:

| kind           | record               | used by                     |
|----------------|----------------------|-----------------------------|
| `caption`      | `CaptionRecord`      | continued pretraining (CPT) |
| `conversation` | `ConversationRecord` | chain-of-thought SFT        |
| `mcq`          | `MCQRecord`          | RL prompts, MCQ evaluation  |
| `embed_pair`   | `EmbedPairRecord`    | embedding training and eval |
| `grounding`    | `GroundingRecord`    | region answers (boxes)      |

The fifth kind, the VLMEvalKit TSV, is read by `iter_vlmeval_tsv` into `MCQRecord`s.

Sources: JSONL (one object per line), Parquet (read in row batches), or a local `datasets.save_to_disk` directory
(memory-mapped).  All three stream: a 3.5M-row corpus is never held in memory.  Images may be given as a path (relative
paths are resolved against the data file's directory), a base64 string or data URI, raw bytes, or a Hugging Face
`{"bytes": ..., "path": ...}` image dict.  Relative paths are made absolute while loading, so a record is
self-contained wherever it travels (Ray workers, TRL datasets).
"""

from __future__ import annotations

import base64
import binascii
import csv
import difflib
import functools
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patho_r1.errors import DataError
from patho_r1.rewards.parsing import OPTION_LETTERS

logger = logging.getLogger(__name__)

AnswerType = Literal["mcq", "numeric", "expression", "yesno", "open"]
ImageRef = str | bytes | dict


# ----------------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------------

class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    id: str | None = None


# Longer text is not a caption, question or turn but a broken export (a whole article, a file read into one cell):
# training would see only its first max_length tokens.  100k characters is ~25k tokens, far above any real one.
MAX_TEXT_CHARS = 100_000


def _too_long(text: str) -> str | None:
    if len(text) > MAX_TEXT_CHARS:
        return f"{len(text):,} characters, over the {MAX_TEXT_CHARS:,} a text field may hold (a broken export?)"
    return None


def _not_blank(value: str, info) -> str:
    if not value.strip():
        raise ValueError(f"{info.field_name} is empty")
    if problem := _too_long(value):
        raise ValueError(problem)
    return value


class CaptionRecord(_Record):
    images: list[ImageRef] = Field(min_length=1)
    caption: str

    _caption_not_blank = field_validator("caption")(_not_blank)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image"]
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def n_images(self) -> int:
        return 0 if isinstance(self.content, str) else sum(p.type == "image" for p in self.content)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ConversationRecord(_Record):
    messages: list[Message] = Field(min_length=2)
    images: list[ImageRef] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_turns(self):
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("messages: no assistant turn to learn from")
        for i, m in enumerate(self.messages):
            if m.role == "assistant" and not m.text().strip():
                raise ValueError(f"messages.{i}: empty assistant turn")
            if m.role == "user" and not m.text().strip() and not m.n_images():
                raise ValueError(f"messages.{i}: empty user turn (no text and no image)")
            if problem := _too_long(m.text()):
                raise ValueError(f"messages.{i}: {problem}")
        n = sum(m.n_images() for m in self.messages)
        if self.images and not n:
            raise ValueError(f"images: {len(self.images)} image(s) given but no message holds an image placeholder "
                             '({"type": "image"} in a content list, where the image goes)')
        if n and n != len(self.images):
            raise ValueError(f"images: the messages hold {n} image placeholders but {len(self.images)} images are "
                             "given")
        return self


class MCQRecord(_Record):
    question: str
    answer: str = Field(..., min_length=1, description="the gold: an option letter, yes/no, a number or a text")
    options: dict[str, str] = Field(default_factory=dict)
    answer_type: AnswerType = "mcq"
    images: list[ImageRef] = Field(default_factory=list)
    category: str | None = None

    _question_not_blank = field_validator("question")(_not_blank)

    @model_validator(mode="after")
    def _check_options(self):
        if self.answer_type != "mcq":
            return self
        letters = list(self.options)
        if not 2 <= len(letters) <= 6:
            raise ValueError(f"options: an MCQ needs 2 to 6 options (A-F), got {len(letters)}")
        if letters != list(OPTION_LETTERS[: len(letters)]):
            raise ValueError(f"options: keys must be consecutive letters from A, got {letters}")
        if self.answer not in self.options:
            raise ValueError(f"answer: {self.answer!r} is not among the options {letters}")
        texts = [v.strip().lower() for v in self.options.values()]
        blank = [k for k, v in self.options.items() if not v.strip()]
        if blank:
            raise ValueError(f"options.{blank[0]}: empty option text")
        if len(set(texts)) != len(texts):
            dup = next(k for k, v in self.options.items() if texts.count(v.strip().lower()) > 1)
            raise ValueError(f"options.{dup}: the same text as another option ({self.options[dup]!r})")
        return self

    def prompt_text(self) -> str:
        """Question followed by one `X. option` line per option (the VLMEvalKit MCQ layout)."""
        if self.answer_type != "mcq":
            return self.question
        lines = [self.question, *(f"{k}. {v}" for k, v in self.options.items()), "Answer with the option letter."]
        return "\n".join(lines)


class EmbedSide(BaseModel):
    """One side of an embedding pair: any mix of text, images and video frames."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    text: str | None = None
    images: list[ImageRef] = Field(default_factory=list)
    frames: list[ImageRef] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self):
        if not (self.text and self.text.strip()) and not self.images and not self.frames:
            raise ValueError("needs text, images or frames")
        return self


class EmbedPairRecord(_Record):
    query: EmbedSide
    positive: EmbedSide
    task: str = "pair"
    target_id: str | None = None


class GroundingBox(BaseModel):
    """One target region: `[x1, y1, x2, y2]` in the original image's pixels (pixel edges: `x2 = x1 + width`; see
    `patho_r1.boxes`) and what it is."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    bbox: list[float] = Field(min_length=4, max_length=4)
    label: str

    _label_not_blank = field_validator("label")(_not_blank)

    @model_validator(mode="after")
    def _ordered(self):
        x1, y1, x2, y2 = self.bbox
        if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
            raise ValueError(f"bbox {self.bbox} is not [x1, y1, x2, y2] with 0 <= x1 < x2 and 0 <= y1 < y2")
        return self


class GroundingRecord(_Record):
    """A referring question about an image and its target boxes (`boxes: []`: the structure is not there).  `image`
    is shorthand for `images: [image]`; with several images (a context tile and detail crops) `box_image` says
    which one the boxes are drawn on, and `image_size` is that image's `[width, height]` when known."""

    question: str
    boxes: list[GroundingBox]
    image: ImageRef | None = Field(None, description="shorthand for images=[image]; moved there on loading")
    images: list[ImageRef] = Field(default_factory=list)
    box_image: int = Field(0, ge=0)
    image_size: tuple[int, int] | None = None

    _question_not_blank = field_validator("question")(_not_blank)

    @model_validator(mode="before")
    @classmethod
    def _image_into_images(cls, raw):
        if isinstance(raw, dict) and raw.get("image") is not None:
            if raw.get("images"):
                raise ValueError("image: give `image` or `images`, not both")
            raw = {**raw, "images": [raw["image"]], "image": None}
        return raw

    @model_validator(mode="after")
    def _check_images_and_boxes(self):
        if not self.images:
            raise ValueError("images: a grounding record needs the image its boxes are drawn on")
        if self.box_image >= len(self.images):
            raise ValueError(f"box_image: {self.box_image} but only {len(self.images)} image(s)")
        if self.image_size is None:
            return self
        w, h = self.image_size
        if w <= 0 or h <= 0:
            raise ValueError(f"image_size: {list(self.image_size)} is not a [width, height] in pixels")
        for i, box in enumerate(self.boxes):
            if box.bbox[2] > w or box.bbox[3] > h:
                raise ValueError(f"boxes.{i}.bbox: {box.bbox} reaches outside the {w}x{h} image")
        return self


RECORD_TYPES: dict[str, type[_Record]] = {
    "caption": CaptionRecord,
    "conversation": ConversationRecord,
    "mcq": MCQRecord,
    "embed_pair": EmbedPairRecord,
    "grounding": GroundingRecord,
}


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------

_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


def _resolve_ref(ref: ImageRef, base_dir: str | Path | None) -> Path | bytes:
    """An image reference as either a file path or encoded image bytes.  Raises `FileNotFoundError`/`ValueError`."""
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return bytes(ref["bytes"])
        if ref.get("path"):
            return _resolve_ref(ref["path"], base_dir)
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"unsupported image reference of type {type(ref).__name__}")
    if ref.startswith("data:image"):
        return _b64decode(ref.split(",", 1)[-1])
    if len(ref) < 4096:
        path = Path(ref)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        if path.exists():
            return path
    # Not an existing file: base64 if it looks like base64 (long, only base64 characters; a file name has a dot)
    if len(ref) >= 64 and len(ref) % 4 == 0 and set(ref) <= _BASE64_CHARS:
        return _b64decode(ref)
    raise FileNotFoundError(f"image not found: {path if len(ref) < 4096 else ref[:64] + '...'}")


def _open_image(source: Path | bytes, *, full: bool) -> Image.Image:
    """Open an image; `full=False` only parses the header (cheap validation), `full=True` decodes it to RGB."""
    where = str(source) if isinstance(source, Path) else "bytes"
    try:
        img = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        if not full:
            img.verify()
            return img
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where} is not a readable image ({exc.__class__.__name__})") from None


def load_image(ref: ImageRef, base_dir: str | Path | None = None) -> Image.Image:
    """Materialise an image reference as an RGB PIL image.  Raises `FileNotFoundError` or `ValueError`."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    return _open_image(_resolve_ref(ref, base_dir), full=True)


def image_feature_value(ref: ImageRef, base_dir: str | Path | None = None) -> str | dict:
    """An image reference in the form `datasets.Image` reads: a path string, or `{"bytes": ..., "path": None}` for
    base64, data URIs, raw bytes and HF dicts (`datasets` takes every string for a file name)."""
    source = _resolve_ref(ref, base_dir)
    return str(source) if isinstance(source, Path) else {"bytes": source, "path": None}


def _b64decode(s: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("string is neither an existing path nor valid base64") from None


def _check_image(ref: ImageRef, base_dir: Path) -> ImageRef:
    """Check that an image reference opens (header only) and return it with relative paths made absolute."""
    source = _resolve_ref(ref, base_dir)
    _open_image(source, full=False)
    if isinstance(source, Path) and isinstance(ref, str):
        return str(source.resolve())
    return ref


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------

def _image_fields(record: _Record) -> Iterator[tuple[str, list]]:
    if isinstance(record, EmbedPairRecord):
        for side_name in ("query", "positive"):
            side = getattr(record, side_name)
            yield f"{side_name}.images", side.images
            yield f"{side_name}.frames", side.frames
    elif hasattr(record, "images"):
        yield "images", record.images


def _pydantic_field(err: dict) -> str:
    return ".".join(str(x) for x in err["loc"]) or "<row>"


def parse_record(raw: Any, kind: str, *, path: str | Path, row: int, base_dir: Path | None = None,
                 check_images: bool = True) -> _Record:
    """Validate one raw row into its record type; every problem becomes a `DataError` naming file, row and field."""
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(RECORD_TYPES)}")
    if not isinstance(raw, dict):
        raise DataError(path, row, None, f"expected a JSON object, got {type(raw).__name__}")
    names, ordered = _field_names(cls)
    for key in raw.keys() - names:  # extras: every row of most corpora has some (source, license, split)
        _check_near_miss(str(path), row, key, ordered, raw)
    try:
        record = cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        field = _pydantic_field(err)
        # Model-level validators report on the whole row (empty loc); their message starts with "field: ".
        if not err["loc"] and ": " in msg:
            field, _, msg = msg.partition(": ")
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise DataError(path, row, field, msg + more) from None
    if check_images:
        base = base_dir or Path(path).parent
        for field, refs in _image_fields(record):
            for i, ref in enumerate(refs):
                try:
                    refs[i] = _check_image(ref, base)
                except (FileNotFoundError, ValueError) as exc:
                    raise DataError(path, row, f"{field}[{i}]", str(exc)) from None
    return record


def decode_utf8(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    """One line's text, or a DataError naming the file, the line and the byte offset of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, lineno, None, f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte offset "
                        f"{offset + exc.start} of the file") from None


@functools.lru_cache(maxsize=16)
def _field_names(cls: type[_Record]) -> tuple[frozenset[str], tuple[str, ...]]:
    """A record type's field names, as a set and in order, kept: `model_fields` is a pydantic descriptor (about
    0.5 us an access), and its tuple was built again for each extra key of each row."""
    return frozenset(cls.model_fields), tuple(cls.model_fields)


def _check_near_miss(path: str, row: int, key: str, known: tuple[str, ...], raw: dict) -> None:
    """Records keep extra keys (datasets carry their own), but a key one typo away from a field is almost surely a
    typo.  When the row lacks the field it meant, that field would be missing or silently defaulted (`imags`: an MCQ
    without its image): an error.  When the row has both, the extra is only suspicious: a warning."""
    meant = _near_miss(key, known)
    if meant is None:
        return
    if meant not in raw:
        raise DataError(path, row, key, f"unknown field; did you mean {meant!r}? (this row has no {meant!r}, so it "
                        "would be missing or left at its default)")
    _warn_near_miss(path, key, meant)


@functools.lru_cache(maxsize=1024)
def _near_miss(key: str, known: tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return close[0] if close else None


@functools.lru_cache(maxsize=1024)
def _warn_near_miss(path: str, key: str, meant: str) -> None:  # once per file and key
    logger.warning("%s: unknown field %r kept as an extra; did you mean %r?", path, key, meant)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, path, lineno, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise invalid_json(path, lineno, exc) from None


def read_json_file(path: Path) -> Any:
    """A whole JSON file; bytes that are not UTF-8 and JSON that does not parse are one DataError naming the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise_not_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_json(path, exc.lineno, exc) from None


def invalid_json(path: str | Path, lineno: int, exc: json.JSONDecodeError) -> DataError:
    """The error for a JSONL line that does not parse."""
    return DataError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_parquet(path: Path, batch_size: int = 1024) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for item in batch.to_pylist():
            row += 1
            yield row, item


def _iter_hf_dir(path: Path) -> Iterator[tuple[int, Any]]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))  # memory-mapped Arrow: rows are read on access
    if hasattr(ds, "keys"):  # a DatasetDict: take the train split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    yield from enumerate(ds, start=1)


def iter_raw_rows(source: str | Path) -> Iterator[tuple[int, Any]]:
    path = Path(source)
    if not path.exists():
        raise DataError(path, None, None, "data source not found")
    if path.is_dir():
        return _iter_hf_dir(path)
    if path.suffix == ".parquet":
        return _iter_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return _iter_jsonl(path)
    raise DataError(path, None, None, "unsupported format (use .jsonl, .parquet or a datasets directory)")


def iter_records(source: str | Path, kind: str, *, check_images: bool = True, limit: int | None = None
                 ) -> Iterator[_Record]:
    """Stream validated records from a JSONL/Parquet file or a `datasets` directory."""
    path = Path(source)
    base_dir = path if path.is_dir() else path.parent
    for n, (row, raw) in enumerate(iter_raw_rows(path)):
        if limit is not None and n >= limit:
            return
        yield parse_record(raw, kind, path=path, row=row, base_dir=base_dir, check_images=check_images)


def load_records(source: str | Path, kind: str, **kwargs) -> list[_Record]:
    """Eager variant of `iter_records`, for small sets (evaluation splits, tests)."""
    return list(iter_records(source, kind, **kwargs))


def iter_table_rows(path: str | Path, delimiter: str = ",", required: set[str] = frozenset()
                    ) -> Iterator[tuple[int, dict | DataError]]:
    """(line, row) of a CSV or TSV, the header being line 1.  A row with too few or too many fields comes as a
    `DataError` in place of the row, so a caller may raise it or set it aside and read on; bad UTF-8 and a missing
    `required` column raise one (naming the line and byte offset, or the column)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "not found")
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's default 128 KiB field limit
    with path.open("r", encoding="utf-8", errors="strict", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
            missing = set(required) - set(header)
            if missing:
                raise DataError(path, 1, sorted(missing)[0], "missing column in the header")
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    n_given = len([v for v in row.values() if v is not None]) + len(row.get(None) or [])
                    yield reader.line_num, DataError(path, reader.line_num, None, f"{n_given} fields, but the "
                                                     f"header has {len(header)} columns")
                else:
                    yield reader.line_num, row
        except UnicodeDecodeError:
            raise_not_utf8(path)


def iter_vlmeval_tsv(path: str | Path) -> Iterator[MCQRecord]:
    """Read a VLMEvalKit-format TSV (`index, image` base64, `question, A..F, answer[, category]`) as MCQ records.

    Rows with no option columns filled are read as Yes/No (when the answer is yes/no) or open questions.
    """
    path = Path(path)
    for row_no, row in iter_table_rows(path, "\t", required={"index", "question", "answer"}):
        if isinstance(row, DataError):
            raise row
        options = {k: row[k] for k in OPTION_LETTERS if row.get(k) not in (None, "", "nan")}
        answer = (row.get("answer") or "").strip()
        if options:
            answer_type = "mcq"
        elif answer.lower() in ("yes", "no"):
            answer_type = "yesno"
        else:
            answer_type = "open"
        raw = {"id": str(row["index"]), "question": row["question"], "answer": answer, "options": options,
               "answer_type": answer_type, "category": row.get("category") or None,
               "images": [row["image"]] if row.get("image") else []}
        yield parse_record(raw, "mcq", path=path, row=row_no, base_dir=path.parent)


def raise_not_utf8(path: Path):
    """Find the first bad byte of a text file and raise a DataError naming its line and offset."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            decode_utf8(raw, path, lineno, offset)
            offset += len(raw)
    raise DataError(path, None, None, "not UTF-8")


def validate_file(source: str | Path, kind: str) -> int:
    """Validate every row; returns the row count or raises the first `DataError`."""
    n = 0
    for _ in iter_records(source, kind):
        n += 1
    return n
