"""What the curate stages read off a stored row: its comparable text, its image digests, its image paths."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path

from patho_r1.errors import DataError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def row_text(kind: str, row: dict) -> str:
    """The text a row is compared and embedded by: the caption; the question with its options (or, for a region
    question, its boxes' labels); or every turn."""
    if kind == "caption":
        return row.get("caption", "")
    if kind == "mcq":
        return " ".join([row.get("question", ""), *(row.get("options") or {}).values()])
    if kind == "grounding":
        return " ".join([row.get("question", ""), *(b.get("label", "") for b in row.get("boxes") or [])])
    parts = []
    for message in row.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text") or "" for p in content if p.get("type") == "text")
    return " ".join(parts)


def image_digest(ref: str, base: Path) -> str:
    """The sha256 of an image's bytes: the file name in our content-addressed store, else hashed from the file."""
    stem = ref.rpartition("/")[2].partition(".")[0]  # no os.path or pathlib: once per row
    if len(stem) == 64 and _HEX64.match(stem):
        return stem
    path = Path(ref) if os.path.isabs(ref) else base / ref
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_key(row: dict, base: Path) -> int:
    """A 63-bit key of a row's image set (0 for none): equal keys mean the same images in the same order.  One
    image's key is its digest's first bits; a set's, those of the sha256 of its digests."""
    digests = [image_digest(r, base) for r in row.get("images") or [] if isinstance(r, str)]
    if not digests:
        return 0
    return digest_key(digests[0] if len(digests) == 1 else hashlib.sha256("|".join(digests).encode()).hexdigest())


def digest_key(digest: str) -> int:
    """The 63-bit key of a hex digest (its first 16 digits are enough), never 0 (0 is "no images")."""
    return int(digest[:16], 16) >> 1 or 1


def image_paths(row: dict, base: Path) -> list[Path]:
    return [Path(r) if Path(r).is_absolute() else base / r for r in row.get("images") or [] if isinstance(r, str)]


def read_id_table(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
                  ) -> dict[str, tuple[int, dict[str, str]]]:
    """A CSV (with a header) or JSONL keyed by `id`: id -> (its line number, its stripped `required` and present
    `optional` fields).  A missing id or required field names the file, line and field."""
    from patho_r1.curate.store import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "label file not found")
    jsonl = path.suffix == ".jsonl"
    rows = iter_jsonl(path) if jsonl else csv.DictReader(path.read_text("utf-8").splitlines())
    table = {}
    for n, row in enumerate(rows, start=1 if jsonl else 2):
        for key in ("id", *required):
            if not str(row.get(key) or "").strip():
                raise DataError(path, n, key, "missing")
        fields = {k: str(row[k]).strip() for k in (*required, *optional) if str(row.get(k) or "").strip()}
        table[str(row["id"]).strip()] = (n, fields)
    return table
