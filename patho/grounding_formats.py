"""Importers from the common box-annotation forms into `grounding` records, and the writers that export records
back to them (the round trip the tests run).

| format       | source                                                             | one record per             |
|--------------|--------------------------------------------------------------------|----------------------------|
| `coco`       | COCO object-detection JSON: `images`, `annotations`, `categories`; | image and category present |
|              | `bbox` is `[x, y, width, height]` in pixels from the top-left      |                            |
| `boxes-csv`  | a CSV of boxes, one row a box: `image, label, x1, y1, x2, y2`       | image and label (and       |
|              | (optional `question, width, height`); blank corners: none there    | question, when given)      |

The COCO layout is the one its site defines (https://cocodataset.org/#format-data, "Object Detection") and
pycocotools reads (cocodataset/cocoapi@8c9bcc3cf640524c4c20a9c40e89cb6a2f2fa0e9, PythonAPI/pycocotools/coco.py
`COCO.createIndex`, `COCO.loadRes`): box corners are `x2 = x + width`, `y2 = y + height`, pixel edges, no `+ 1`
(docs/grounding.md#formats).  Crowd annotations (`iscrowd: 1`) mark regions a detector is not scored on; they are
left out of the targets.

Record question: the CSV's `question` column when given, else "Locate every <label> in this image." Box labels are
the category names.  Bad input is one `DataError` naming the file, the row (the image's position in `images` for
COCO, the line for the CSV) and the field (`annotations[17].bbox`, `x2`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from patho_r1.data import read_json_file
from patho_r1.errors import DataError

# The table's own helpers: one image-path rule and one CSV reader for every format.
from patho_r1.formats import (
    Converted,
    ImportOptions,
    SourceFormat,
    _csv_rows,
    _files,
    _image_file,
    _raise_if_error,
    register_format,
)

EDGE_SLACK = 1.0  # a corner this far past the image edge is float noise in an export and is clipped; farther: error


def default_question(label: str) -> str:
    return f"Locate every {label} in this image."


def _number(value: Any, where: tuple[str, int], field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(where[0], where[1], field, f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise DataError(where[0], where[1], field, f"not a finite number: {value!r}")
    return number


def _fit(box: list[float], size: tuple[float, float] | None, where: tuple[str, int], field: str) -> list[float]:
    """Check a box's corners; clip corners within `EDGE_SLACK` outside the image."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DataError(where[0], where[1], field, f"empty box {box}: needs x1 < x2 and y1 < y2")
    if size is not None:
        w, h = size
        if x1 < -EDGE_SLACK or y1 < -EDGE_SLACK or x2 > w + EDGE_SLACK or y2 > h + EDGE_SLACK:
            raise DataError(where[0], where[1], field, f"box {box} reaches outside the {w:g}x{h:g} image")
        return [max(x1, 0.0), max(y1, 0.0), min(x2, w), min(y2, h)]
    if x1 < 0 or y1 < 0:
        raise DataError(where[0], where[1], field, f"box {box} has a negative corner")
    return box


# ----------------------------------------------------------------------------------------------------------------------
# COCO JSON
# ----------------------------------------------------------------------------------------------------------------------

def _coco_list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(path, None, key, f"expected a list of {key} (a COCO detection file)")
    return value


def _coco_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    """One raw row per image: the image entry, its annotations (with their index in the file) and the category
    names."""
    for path in _files(src, ".json"):
        data = read_json_file(path)
        if not isinstance(data, dict):
            raise DataError(path, None, None, "expected an object with images, annotations and categories")
        categories = {}
        for i, cat in enumerate(_coco_list(data, "categories", path)):
            if not isinstance(cat, dict) or "id" not in cat or not str(cat.get("name") or "").strip():
                raise DataError(path, None, f"categories[{i}]", "expected {id, name}")
            categories[cat["id"]] = str(cat["name"]).strip()
        by_image: dict[Any, list] = defaultdict(list)
        for i, ann in enumerate(_coco_list(data, "annotations", path)):
            by_image[ann.get("image_id") if isinstance(ann, dict) else None].append((i, ann))
        for n, image in enumerate(_coco_list(data, "images", path), start=1):
            image_id = image.get("id") if isinstance(image, dict) else None
            yield str(path), n, {"image": image, "annotations": by_image.get(image_id, []),
                                 "categories": categories}


def _coco_box(i: int, ann: Any, size, where: tuple[str, int], categories: dict) -> tuple[str, list[float]] | None:
    """(category name, corners) of one annotation; None for a crowd region."""
    if not isinstance(ann, dict):
        raise DataError(where[0], where[1], f"annotations[{i}]", "expected an object")
    if ann.get("iscrowd"):
        return None
    if ann.get("category_id") not in categories:
        raise DataError(where[0], where[1], f"annotations[{i}].category_id",
                        f"{ann.get('category_id')!r} is not a category id")
    bbox = ann.get("bbox")
    field = f"annotations[{i}].bbox"
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise DataError(where[0], where[1], field, f"expected [x, y, width, height], got {bbox!r}")
    x, y, w, h = (_number(v, where, field) for v in bbox)
    return categories[ann["category_id"]], _fit([x, y, x + w, y + h], size, where, field)


def _convert_coco(raw: dict, where: tuple[str, int], opts: ImportOptions) -> list[Converted]:
    image = raw["image"]
    if not isinstance(image, dict):
        raise DataError(where[0], where[1], "images", "expected {id, file_name, width, height}")
    name = str(image.get("file_name") or "")
    size = (_number(image.get("width"), where, "width"), _number(image.get("height"), where, "height"))
    by_label: dict[str, list] = defaultdict(list)
    for i, ann in raw["annotations"]:
        found = _coco_box(i, ann, size, where, raw["categories"])
        if found:
            by_label[found[0]].append({"bbox": found[1], "label": found[0]})
    base = opts.images or os.path.dirname(where[0])
    out = []
    for label, boxes in by_label.items():
        record = {"id": f"coco:{Path(where[0]).stem}:{image.get('id')}:{label}", "question": default_question(label),
                  "boxes": boxes, "image_size": [int(size[0]), int(size[1])], "category": label,
                  "coco_image_id": image.get("id")}
        out.append(Converted("grounding", record, [_image_file(name, base, where, "file_name")]))
    return out


def _coco_rows_per_label(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    """One raw row per (image, category), already converted: the table turns one raw row into one record, and an
    image holds several.  A bad image comes as its DataError (raised by `_coco_convert`, so `--on-error` decides);
    the image's row number is kept, so errors name the image."""
    for label, row, raw in _coco_rows(src, opts):
        try:
            converted = _convert_coco(raw, (label, row), opts)
        except DataError as exc:
            yield label, row, exc
            continue
        for item in converted:
            yield label, row, item


def _coco_convert(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    _raise_if_error(raw)
    return raw  # converted in `_coco_rows_per_label`


register_format(SourceFormat(
    "coco", _coco_rows_per_label, _coco_convert, license=None,
    summary="COCO detection JSON (images, annotations with [x, y, w, h] boxes, categories) plus its images; "
            "one grounding record per image and category"))


# ----------------------------------------------------------------------------------------------------------------------
# Per-image CSV of boxes
# ----------------------------------------------------------------------------------------------------------------------

CSV_CORNERS = ("x1", "y1", "x2", "y2")


def _column(opts: ImportOptions, ours: str) -> str:
    return opts.columns.get(ours, ours)


def _csv_groups(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    """Rows grouped by (image, label, question); a group is yielded at its first line, holding each member's line.
    A row with too few fields is yielded alone, as its DataError."""
    for path in _files(src, ".csv"):
        groups: dict[tuple, list] = {}
        for label, line, row in _csv_rows(path):
            if isinstance(row, DataError):
                yield label, line, row
                continue
            key = tuple((row.get(_column(opts, k)) or "").strip() for k in ("image", "label", "question"))
            groups.setdefault(key, []).append((line, row))
        for members in groups.values():
            yield str(path), members[0][0], members


def _csv_corners(line: int, row: dict, path: str, opts: ImportOptions, size) -> list[float] | None:
    cells = [(row.get(_column(opts, k)) or "").strip() for k in CSV_CORNERS]
    if not any(cells):
        return None  # "none of this label here": a negative
    where = (path, line)
    for cell, name in zip(cells, CSV_CORNERS, strict=True):
        if not cell:
            raise DataError(path, line, _column(opts, name), "empty (give all four corners, or none)")
    box = [_number(c, where, _column(opts, n)) for c, n in zip(cells, CSV_CORNERS, strict=True)]
    return _fit(box, size, where, _column(opts, "x2"))


def _csv_size(members: list, path: str, opts: ImportOptions) -> tuple[float, float] | None:
    line, row = members[0]
    w, h = ((row.get(_column(opts, k)) or "").strip() for k in ("width", "height"))
    if not w and not h:
        return None
    return _number(w, (path, line), _column(opts, "width")), _number(h, (path, line), _column(opts, "height"))


def _convert_csv(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    _raise_if_error(raw)
    path = where[0]
    line, first = raw[0]
    image = (first.get(_column(opts, "image")) or "").strip()
    label = (first.get(_column(opts, "label")) or "").strip()
    for name, value in (("image", image), ("label", label)):
        if not value:
            raise DataError(path, line, _column(opts, name), "empty")
    size = _csv_size(raw, path, opts)
    boxes = []
    for member_line, row in raw:
        corners = _csv_corners(member_line, row, path, opts, size)
        if corners is not None:
            boxes.append({"bbox": corners, "label": label})
    question = (first.get(_column(opts, "question")) or "").strip() or default_question(label)
    record = {"id": f"{Path(path).stem}:{line}", "question": question, "boxes": boxes, "category": label}
    if size is not None:
        record["image_size"] = [int(size[0]), int(size[1])]
    base = opts.images or os.path.dirname(path)
    return Converted("grounding", record, [_image_file(image, base, where, _column(opts, "image"))])


register_format(SourceFormat(
    "boxes-csv", _csv_groups, _convert_csv, license=None,
    summary="CSV of boxes (image, label, x1, y1, x2, y2[, question, width, height]), one row a box; "
            "--columns renames"))


# ----------------------------------------------------------------------------------------------------------------------
# Writers (records -> the formats above)
# ----------------------------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def coco_dict(records: Iterable[dict]) -> dict:
    """Records (`image` name, `image_size`, `boxes`) as one COCO detection dict.  Each record is its own COCO
    image (a referring question makes its own target set, even on an image another record shares), ids from 1."""
    images, annotations, categories = [], [], {}
    for n, rec in enumerate(records, start=1):
        w, h = rec["image_size"]
        images.append({"id": n, "file_name": rec["image"], "width": w, "height": h})
        for box in rec["boxes"]:
            cat = categories.setdefault(box["label"], len(categories) + 1)
            x1, y1, x2, y2 = box["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": cat,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in categories.items()]}


def write_coco(records: Iterable[dict], path: str | Path) -> Path:
    data = coco_dict(records)
    _atomic_write(Path(path), lambda fh: json.dump(data, fh))
    return Path(path)


def write_boxes_csv(records: Iterable[dict], path: str | Path) -> Path:
    """One row a box; a record without boxes is one row with blank corners (its label from `category`)."""
    columns = ["image", "label", *CSV_CORNERS, "question", "width", "height"]

    def write(fh):
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(columns)
        for rec in records:
            w, h = rec.get("image_size") or ("", "")
            rows = [(b["label"], *b["bbox"]) for b in rec["boxes"]] or [(rec["category"], "", "", "", "")]
            for label, *corners in rows:
                out.writerow([rec["image"], label, *corners, rec["question"], w, h])

    _atomic_write(Path(path), write)
    return Path(path)
