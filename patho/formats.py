"""Readers for the public pathology corpora, each turning its on-disk format into our record kinds.  The data
engine's importer (`curate`) and the benchmark runner (`eval bench`) both read through them, so a benchmark is read
exactly as it is decontaminated against.

Every format is a `SourceFormat`: `rows(src, opts)` streams raw rows with where they came from, and
`convert(raw, where, opts)` turns one into a `Converted` (a kind, the record's fields, its image sources) or raises
a `DataError` naming the file, row and field.  The importer decides what a bad row costs (`--on-error`).  Field
layouts follow `docs/dataset-formats.md`; its sections are cited beside each reader.

| format        | source                                              | kinds             |
|---------------|-----------------------------------------------------|-------------------|
| `pathvqa`     | HF parquet (`image{bytes,path}, question, answer`)  | mcq (yes/no, open)|
| `pathmmu`     | `data.json` (`data[subset][split]`) + `images/`     | mcq               |
| `quilt-vqa`   | HF parquet, or `quiltvqa_test_w_ans.json` + images  | mcq (yes/no, open)|
| `quilt-1m`    | `quilt_1M_lookup.csv` + an image folder             | caption           |
| `arch`        | `captions.json` (object keyed "0", "1", ...) + images | caption         |
| `pmc-oa`      | `pmc_oa.jsonl` (`image, caption`) + `images/`       | caption           |
| `vlmeval-tsv` | VLMEvalKit TSV, base64 images                       | mcq               |
| `medxpertqa-mm` | MedXpertQA MM jsonl (GitHub eval input or HF `MM/*.jsonl`) + images | mcq       |
| `omnimedvqa`  | `QA_information/*/<source>.json` + `Images/`        | mcq               |
| `csv`/`jsonl` | any table, with `--columns ours=theirs,...`         | any one kind      |

Adding a format is one `register_format` call; nothing else dispatches on the name.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patho_r1.data import iter_raw_rows, iter_table_rows, read_json_file
from patho_r1.errors import DataError
from patho_r1.rewards.parsing import OPTION_LETTERS


class ImageFile(str):
    """An image file's path (a `str`), with the source field that named it, a hint for when it is missing, and the
    real path of the image folder it must stay in (`check_inside_root`).  A converter does not stat the file: a
    reader that opens it anyway (the importer) learns then that it is missing, and says so with `missing`; one that
    does not calls `Converted.check_files`."""

    field: str
    hint: str
    root: str

    def __new__(cls, path: str, field: str, root: str, hint: str = ""):
        obj = super().__new__(cls, path)
        obj.field, obj.root, obj.hint = field, root, hint
        return obj

    def missing(self, where: tuple[str, int]) -> DataError:
        return DataError(where[0], where[1], self.field, f"image not found: {self}{self.hint}")

    def __reduce__(self):  # picklable with its field, hint and root (str's own reduction would drop them)
        return ImageFile, (str(self), self.field, self.root, self.hint)


ALLOW_OUTSIDE = "--allow-outside-images"  # the option that lifts the guard below, named in its refusals


def check_inside_root(image: ImageFile, where: tuple[str, int], real: str | None = None) -> None:
    """The one path guard for every image file every format names: raise a DataError unless the file resolves
    (through `..`, an absolute name, or symbolic links anywhere on its path) to a place inside its source's image
    folder.  `real`: the resolved path, where the caller already has it from the file it opened (the importer: so
    the check is of what was read, and costs no `realpath`)."""
    real = real or os.path.realpath(image)
    root = image.root
    if real.startswith(root if root.endswith(os.sep) else root + os.sep):
        return
    raise DataError(where[0], where[1], image.field, f"image {image} resolves to {real}, outside the image folder "
                    f"{root}; a dataset's rows may only name files inside it ({ALLOW_OUTSIDE} takes them)")


@functools.lru_cache(maxsize=256)
def real_folder(folder: str) -> str:
    """An image folder's real path, once per folder (not per row)."""
    return os.path.realpath(folder)


ImageSource = bytes | str | Path  # encoded bytes, or a file path (an `ImageFile` from the readers here)


@dataclass
class Converted:
    kind: str  # caption | mcq | conversation
    record: dict[str, Any]  # the record's fields, without images
    images: list[ImageSource] = field(default_factory=list)

    def check_files(self, where: tuple[str, int]) -> None:
        """Raise the named DataError of the first image file that is not there."""
        for image in self.images:
            if isinstance(image, ImageFile) and not os.path.isfile(image):
                raise image.missing(where)


@dataclass
class ImportOptions:
    images: Path | None = None  # where relative image names are looked up (formats with an image folder)
    allow_outside_images: bool = False  # take image files that resolve outside the image folder (the guard's off)
    columns: dict[str, str] = field(default_factory=dict)  # generic csv/jsonl: our field -> their column
    kind: str | None = None  # generic csv/jsonl: the kind every row is


@dataclass(frozen=True)
class SourceFormat:
    name: str
    rows: Callable[[Path, ImportOptions], Iterator[tuple[str, int, Any]]]  # (file label, 1-based row, raw)
    convert: Callable[[Any, tuple[str, int], ImportOptions], Converted]
    license: str | None = None  # the license the dataset card states, recorded unless --license overrides it
    summary: str = ""


FORMATS: dict[str, SourceFormat] = {}

# Families of formats kept in their own modules (each registers its formats when imported).  They import this module
# for `register_format` and its helpers, so this module loads them on first lookup rather than importing them at
# its top: a one-way dependency, not a cycle.
FORMAT_FAMILIES = ("patho_r1.grounding_formats", "patho_r1.pmeb_formats")


def all_formats() -> dict[str, SourceFormat]:
    """Every registered format, the families' included."""
    for module in FORMAT_FAMILIES:
        importlib.import_module(module)
    return FORMATS


def register_format(fmt: SourceFormat) -> SourceFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"import format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> SourceFormat:
    formats = all_formats()
    try:
        return formats[name]
    except KeyError:
        raise KeyError(f"unknown import format {name!r}; known: {', '.join(formats)}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------------

def _text(raw: dict, key: str, where: tuple[str, int], *, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, float) and value != value):  # pandas writes missing cells as NaN
        value = None
    if value is not None and not isinstance(value, str):
        value = str(value)
    if required and (value is None or not value.strip()):
        raise DataError(where[0], where[1], key, "missing" if value is None else "empty")
    return value.strip() if value is not None else None


def _image_file(name: str, base: str | Path, where: tuple[str, int], key: str, hint: str = "") -> ImageFile:
    """The file `name` names (under the image folder `base`, if relative, and to be kept inside it), unchecked: see
    `ImageFile` and `check_inside_root`."""
    if not name:
        raise DataError(where[0], where[1], key, "empty image name")
    base = os.fspath(base)
    # os.path, not pathlib: this runs once per row, and pathlib's parsing was a third of the import's time
    return ImageFile(name if os.path.isabs(name) else os.path.join(base, name), key, real_folder(base), hint)


@functools.lru_cache(maxsize=64)
def _beside(path: str, name: str) -> str:
    """The folder `name` beside the file `path` (once per file, not per row)."""
    return os.path.join(os.path.dirname(path), name)


def _answer_kind(answer: str) -> str:
    return "yesno" if answer.strip().lower() in ("yes", "no") else "open"


def _files(src: Path, suffix: str) -> list[Path]:
    if src.is_dir():
        files = sorted(src.rglob(f"*{suffix}"))
        if not files:
            raise DataError(src, None, None, f"no {suffix} files in this folder")
        return files
    if not src.is_file():
        raise DataError(src, None, None, "not found")
    return [src]


def _split_of(path: Path) -> str | None:
    """The split a shard belongs to, from its name or folder (`test-00000-of-00001.parquet`, `validation/0000...`)."""
    for part in (path.stem, *reversed(path.parent.parts)):
        for split in ("train", "validation", "val", "test"):
            if part == split or part.startswith(f"{split}-") or part.startswith(f"{split}_"):
                return split
    return None


def _parquet_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    for path in _files(src, ".parquet"):
        row = 0
        split = _split_of(path)
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=512)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends; the user needs the file, not the class
            raise DataError(path, None, None, f"not a readable parquet file ({exc})") from None
        for batch in batches:
            for item in batch.to_pylist():
                row += 1
                yield str(path), row, {**item, "_split": split}


def _jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Rows of a JSONL file through our loader (bad bytes and bad JSON are located by line)."""
    return ((str(path), n, raw) for n, raw in iter_raw_rows(path))


def _csv_rows(path: Path, delimiter: str = ",") -> Iterator[tuple[str, int, Any]]:
    """Rows as dicts (a short row as its DataError), numbered by their line in the file; the header is line 1."""
    return ((str(path), line, row) for line, row in iter_table_rows(path, delimiter))


def _raise_if_error(raw: Any) -> None:
    if isinstance(raw, DataError):
        raise raw


_OPTION = re.compile(r"^\s*\(?([A-Fa-f])\s*[\).:]\s*(.*)$", re.S)


def _lettered(text: str) -> tuple[str, str] | None:
    """`"A) text"`, `"(A) text"`, `"A. text"` -> ("A", "text").  PathMMU's own `split(')')[1]` cuts option texts
    that contain `)`; this keeps them whole."""
    m = _OPTION.match(text)
    return (m.group(1).upper(), m.group(2).strip()) if m else None


# ----------------------------------------------------------------------------------------------------------------------
# PathVQA and Quilt-VQA (docs/dataset-formats.md#pathvqa, #quilt-vqa): HF parquet with an Image column
# ----------------------------------------------------------------------------------------------------------------------

def _hf_image(raw: dict, where: tuple[str, int], base: Path | None) -> ImageSource:
    image = raw.get("image")
    if isinstance(image, dict):
        if image.get("bytes"):
            return bytes(image["bytes"])
        if image.get("path"):  # a file beside the parquet, unless --images says where
            return _image_file(image["path"], base or os.path.dirname(where[0]), where, "image")
    raise DataError(where[0], where[1], "image", "no image bytes and no path")


def _convert_vqa(raw: dict, where: tuple[str, int], opts: ImportOptions, prefix: str) -> Converted:
    _raise_if_error(raw)
    question = _text(raw, "question", where)
    answer = _text(raw, "answer", where)
    declared = (raw.get("answer_type") or "").upper()
    if declared == "CLOSED" and raw.get("yes_no_answer"):  # Quilt-VQA keeps the long answer beside yes/no
        answer = _text(raw, "yes_no_answer", where)
    record = {"id": f"{prefix}:{Path(where[0]).stem}:{where[1]}", "question": question, "answer": answer,
              "answer_type": _answer_kind(answer), "split": raw.get("_split")}
    if declared:
        record["source_answer_type"] = declared
    if raw.get("context"):
        record["context"] = raw["context"]
    return Converted("mcq", record, [_hf_image(raw, where, opts.images)])


register_format(SourceFormat(
    "pathvqa", _parquet_rows, lambda raw, where, opts: _convert_vqa(raw, where, opts, "pathvqa"), license="MIT",
    summary="PathVQA, Hugging Face parquet (flaviagiammarino/path-vqa); closed = answer yes/no"))


def _quilt_vqa_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    if src.suffix == ".json":  # quiltvqa_test_w_ans.json: a list of LLaVA-style dicts
        data = read_json_file(src)
        if not isinstance(data, list):
            raise DataError(src, None, None, f"expected a JSON list of questions, got {type(data).__name__}")
        for i, item in enumerate(data, start=1):
            yield str(src), i, item
    else:
        yield from _parquet_rows(src, opts)


def _convert_quilt_vqa(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    _raise_if_error(raw)
    if not isinstance(raw, dict):
        raise DataError(where[0], where[1], None, f"expected an object, got {type(raw).__name__}")
    if isinstance(raw.get("image"), str):  # the JSON release names an image file
        raw = dict(raw)
        if not raw.get("question"):
            turns = raw.get("conversations") or raw.get("conversatons") or []
            human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
            raw["question"] = raw.get("text") or (human or "").replace("<image>", "").strip() or None
        raw["image"] = {"path": raw["image"]}
    return _convert_vqa(raw, where, opts, "quilt-vqa")


register_format(SourceFormat(
    "quilt-vqa", _quilt_vqa_rows, _convert_quilt_vqa, license="CC BY-NC-ND 3.0",
    summary="Quilt-VQA: HF parquet (wisdomik/Quilt_VQA) or quiltvqa_test_w_ans.json plus images"))


# ----------------------------------------------------------------------------------------------------------------------
# PathMMU (docs/dataset-formats.md#pathmmu): data.json with data[subset][split] -> samples, images/ beside it
# ----------------------------------------------------------------------------------------------------------------------

def _pathmmu_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    path = src / "data.json" if src.is_dir() else src
    if not path.is_file():
        raise DataError(path, None, None, "not found (PathMMU ships data.json with an images/ folder)")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise DataError(path, None, None, "expected data[subset][split] -> list of questions")
    for subset, splits in data.items():
        if not isinstance(splits, dict):
            raise DataError(path, None, subset, "expected an object of splits")
        for split, samples in splits.items():
            for i, sample in enumerate(samples, start=1):
                yield f"{path}[{subset}][{split}]", i, {**sample, "_subset": subset, "_split": split}


_PATHMMU_REBUILD = (" (PathMMU ships images only for PubMed and EduContent; SocialPath, Atlas and PathCLS must be "
                    "rebuilt from their sources)")


def _convert_pathmmu(raw: dict, where: tuple[str, int], opts: ImportOptions) -> Converted:
    question = _text(raw, "question", where)
    options_in = raw.get("options")
    if not isinstance(options_in, list) or not options_in:
        raise DataError(where[0], where[1], "options", "expected a list like ['A) text', ...]")
    options = {}
    for i, text in enumerate(options_in):
        parsed = _lettered(str(text))
        if parsed is None:
            raise DataError(where[0], where[1], f"options[{i}]", f"not 'X) text': {text!r}")
        options[parsed[0]] = parsed[1]
    answer_raw = _text(raw, "answer", where)
    parsed = _lettered(answer_raw) or ((answer_raw.upper(), "") if answer_raw.upper() in OPTION_LETTERS else None)
    if parsed is None:
        raise DataError(where[0], where[1], "answer", f"no option letter in {answer_raw!r}")
    base = opts.images or Path(where[0].split("[", 1)[0]).parent / "images"
    image = _image_file(_text(raw, "img", where), base, where, "img", _PATHMMU_REBUILD)
    record = {"id": f"pathmmu:{raw['_subset']}:{raw['_split']}:{raw.get('No', where[1])}", "question": question,
              "options": options, "answer": parsed[0], "answer_type": "mcq", "category": raw["_subset"],
              "split": raw["_split"]}
    if raw.get("explanation"):
        record["explanation"] = raw["explanation"]
    return Converted("mcq", record, [image])


register_format(SourceFormat("pathmmu", _pathmmu_rows, _convert_pathmmu, license="CC BY-ND 4.0",
                             summary="PathMMU data.json plus images/ (jamessyx/PathMMU)"))


# ----------------------------------------------------------------------------------------------------------------------
# Quilt-1M (docs/dataset-formats.md#quilt-1m): quilt_1M_lookup.csv + an image folder
# ----------------------------------------------------------------------------------------------------------------------

_QUILT_KEEP = ("subset", "split", "pathology", "magnification", "med_umls_ids")


def _convert_quilt_1m(raw: dict, where: tuple[str, int], opts: ImportOptions) -> Converted:
    _raise_if_error(raw)
    caption = _text(raw, "caption", where)
    base = opts.images or _beside(where[0], "images")
    image = _image_file(_text(raw, "image_path", where), base, where, "image_path")
    record = {"id": f"quilt-1m:{raw.get('Unnamed: 0') or where[1]}", "caption": caption,
              **{k: raw[k] for k in _QUILT_KEEP if raw.get(k) not in (None, "")}}
    return Converted("caption", record, [image])


register_format(SourceFormat(
    "quilt-1m", lambda src, opts: _csv_rows(src), _convert_quilt_1m,
    license="Quilt-1M terms: research use only, no redistribution",
    summary="Quilt-1M quilt_1M_lookup.csv plus its image folder (--images, default: images/ beside the CSV)"))


# ----------------------------------------------------------------------------------------------------------------------
# ARCH (docs/dataset-formats.md#arch): captions.json keyed "0", "1", ... with uuid and caption; images/<uuid>.<ext>
# ----------------------------------------------------------------------------------------------------------------------

def _arch_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    path = src / "captions.json" if src.is_dir() else src
    if not path.is_file():
        raise DataError(path, None, None, "not found (ARCH ships captions.json with an images/ folder)")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise DataError(path, None, None, 'expected an object keyed "0", "1", ...')
    images = opts.images or path.parent / "images"
    by_stem = {p.stem: p for p in images.iterdir() if p.is_file()} if images.is_dir() else {}
    keys = sorted(data, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
    for n, key in enumerate(keys, start=1):
        entry = data[key] if isinstance(data[key], dict) else {}
        image = by_stem.get(str(entry.get("uuid")))
        yield str(path), n, {**entry, "_key": key, "_image": image.name if image else None, "_images": str(images),
                             "_set": path.parent.name}


def _convert_arch(raw: dict, where: tuple[str, int], opts: ImportOptions) -> Converted:
    uuid = _text(raw, "uuid", where)
    caption = _text(raw, "caption", where)
    if raw["_image"] is None:
        raise DataError(where[0], where[1], "uuid", f"no image named {uuid}.* in the images folder")
    image = _image_file(raw["_image"], raw["_images"], where, "uuid")  # a link in the folder may point out of it
    record = {"id": f"arch:{raw['_set']}:{raw['_key']}", "caption": caption, "arch_set": raw["_set"]}
    for key in ("figure_id", "letter"):
        if raw.get(key) not in (None, ""):
            record[key] = raw[key]
    return Converted("caption", record, [image])


register_format(SourceFormat("arch", _arch_rows, _convert_arch, license="CC BY-NC-SA 4.0 (unverified)",
                             summary="ARCH books_set/pubmed_set: captions.json plus images/"))


# ----------------------------------------------------------------------------------------------------------------------
# PMC-OA (docs/dataset-formats.md#pmc-oa): pmc_oa.jsonl rows {image, caption}, images/ beside it
# ----------------------------------------------------------------------------------------------------------------------

def _convert_pmc_oa(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    if not isinstance(raw, dict):
        raise DataError(where[0], where[1], None, f"expected an object, got {type(raw).__name__}")
    caption = _text(raw, "caption", where)
    base = opts.images or Path(where[0]).parent / "images"
    image = _image_file(_text(raw, "image", where), base, where, "image")
    record = {"id": f"pmc-oa:{Path(raw['image']).stem}", "caption": caption}
    for key in ("pmcid", "url_name"):
        if raw.get(key):
            record[key] = raw[key]
    return Converted("caption", record, [image])


register_format(SourceFormat(
    "pmc-oa", lambda src, opts: (r for f in _files(src, ".jsonl") for r in _jsonl_rows(f)), _convert_pmc_oa,
    license=None, summary="PMC-OA pmc_oa.jsonl plus images/ (axiong/pmc_oa); license per article: pass --license"))


# ----------------------------------------------------------------------------------------------------------------------
# VLMEvalKit TSV (docs/dataset-formats.md#vlmevalkit-tsv): index, image (base64, or <=64 chars naming another
# row's index), question, A-F, answer
# ----------------------------------------------------------------------------------------------------------------------

def _tsv_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    for path in _files(src, ".tsv"):
        images_by_index: dict[str, str] = {}  # VLMEvalKit stores a repeated image once and names it by index
        for row_no, raw in iter_table_rows(path, "\t", required={"index", "question", "answer"}):
            if isinstance(raw, dict):
                image = raw.get("image") or ""
                if len(image) > 64:
                    images_by_index[str(raw.get("index"))] = image
                elif image.strip():  # a reference: resolved here, so each raw row is self-contained
                    raw = {**raw, "image": images_by_index.get(image.strip()), "_image_ref": image.strip()}
            yield str(path), row_no, raw


def _convert_tsv(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    import base64
    import binascii

    _raise_if_error(raw)
    question = _text(raw, "question", where)
    answer = _text(raw, "answer", where)
    options = {k: raw[k].strip() for k in OPTION_LETTERS if (raw.get(k) or "").strip() not in ("", "nan")}
    hint = _text(raw, "hint", where, required=False)
    if hint and hint != "nan":
        question = f"Hint: {hint}\n{question}"  # VLMEvalKit's MCQ prompt puts the hint before the question
    image = raw.get("image") or ""
    images: list[ImageSource] = []
    if raw.get("_image_ref") and not image:  # a reference to another row's image that holds none
        raise DataError(where[0], where[1], "image", f"names index {raw['_image_ref']!r}, which holds no image")
    if image:
        try:
            images.append(base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError):
            raise DataError(where[0], where[1], "image", "not valid base64") from None
    elif raw.get("image_path"):
        images.append(_image_file(raw["image_path"], opts.images or Path(where[0]).parent, where, "image_path"))
    kind = "mcq" if options else _answer_kind(answer)
    record = {"id": f"{Path(where[0]).stem}:{raw['index']}", "question": question, "answer": answer,
              "options": options, "answer_type": kind}
    for key in ("category", "l2-category", "split"):
        if (raw.get(key) or "").strip():
            record[key.replace("-", "_")] = raw[key]
    return Converted("mcq", record, images)


register_format(SourceFormat("vlmeval-tsv", _tsv_rows, _convert_tsv, license=None,
                             summary="VLMEvalKit MCQ / short-QA TSV with base64 images"))


# ----------------------------------------------------------------------------------------------------------------------
# MedXpertQA MM (docs/dataset-formats.md#medxpertqa-mm): jsonl, GitHub eval input or the HF card's rows;
# images/ beside the file or one folder up
# ----------------------------------------------------------------------------------------------------------------------

_ANSWER_CHOICES = re.compile(r"\s*Answer Choices:\s*\(A\).*\Z", re.S)


def _medxpert_options(raw: dict, where: tuple[str, int]) -> dict[str, str]:
    value = raw.get("options")
    if isinstance(value, dict):  # the HF card: {"A": text, ...}
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):  # the GitHub input: [{"letter": "A", "content": text}, ...]
        pairs = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or "letter" not in item or "content" not in item:
                raise DataError(where[0], where[1], f"options[{i}]", "expected {letter, content}")
            pairs.append((str(item["letter"]), item["content"]))
    else:
        raise DataError(where[0], where[1], "options", "expected {letter: text} or a list of {letter, content}")
    return {k.strip().upper(): str(v).strip() for k, v in pairs}


def _medxpert_images(raw: dict, where: tuple[str, int], opts: ImportOptions) -> list[ImageSource]:
    names = raw.get("images")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names:
        raise DataError(where[0], where[1], "images", "expected a list of image names")
    here = os.path.dirname(where[0])
    bases = [opts.images] if opts.images else [os.path.join(here, "images"), os.path.join(here, "..", "images")]
    base = next((b for b in bases if os.path.isdir(b)), bases[0])
    out: list[ImageSource] = []
    for i, item in enumerate(names):
        name = item.get("image_path") if isinstance(item, dict) else item
        out.append(_image_file(str(name or ""), base, where, f"images[{i}]", " (MedXpertQA ships images.zip: unzip "
                               "it beside the jsonl, or pass --images)"))
    return out


def _convert_medxpert(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    if not isinstance(raw, dict):
        raise DataError(where[0], where[1], None, f"expected an object, got {type(raw).__name__}")
    # the HF rows append the options to the question; they are rendered from `options` instead, once
    question = _ANSWER_CHOICES.sub("", _text(raw, "question", where))
    options = _medxpert_options(raw, where)
    label = raw.get("label")
    label = label[0] if isinstance(label, list) and len(label) == 1 else label
    if not isinstance(label, str) or label.strip().upper() not in options:
        raise DataError(where[0], where[1], "label", f"expected one option letter of {sorted(options)}, got "
                        f"{raw.get('label')!r}")
    record = {"id": f"medxpertqa:{raw.get('id') or where[1]}", "question": question, "options": options,
              "answer": label.strip().upper(), "answer_type": "mcq", "category": raw.get("medical_task")}
    for key in ("body_system", "question_type", "medical_task"):
        if raw.get(key):
            record[key] = raw[key]
    return Converted("mcq", record, _medxpert_images(raw, where, opts))


register_format(SourceFormat(
    "medxpertqa-mm", lambda src, opts: (r for f in _files(src, ".jsonl") for r in _jsonl_rows(f)), _convert_medxpert,
    license="MIT", summary="MedXpertQA MM jsonl (TsinghuaC3I/MedXpertQA) plus its images folder"))


# ----------------------------------------------------------------------------------------------------------------------
# OmniMedVQA (docs/dataset-formats.md#omnimedvqa): OmniMedVQA/QA_information/{Open,Restricted}-access/<source>.json,
# image paths from OmniMedVQA/
# ----------------------------------------------------------------------------------------------------------------------

def _omnimed_rows(src: Path, opts: ImportOptions) -> Iterator[tuple[str, int, Any]]:
    for path in _files(src, ".json"):
        data = read_json_file(path)
        if not isinstance(data, list):
            raise DataError(path, None, None, f"expected a JSON list of questions, got {type(data).__name__}")
        # image paths are relative to the OmniMedVQA/ root: the folder above QA_information
        root = next((str(p.parent) for p in path.parents if p.name == "QA_information"), str(path.parent))
        for i, item in enumerate(data, start=1):
            yield str(path), i, {**item, "_root": root} if isinstance(item, dict) else item


def _convert_omnimed(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    if not isinstance(raw, dict):
        raise DataError(where[0], where[1], None, f"expected an object, got {type(raw).__name__}")
    question = _text(raw, "question", where)
    gold = _text(raw, "gt_answer", where)
    options = {k: _text(raw, f"option_{k}", where) for k in OPTION_LETTERS
               if _text(raw, f"option_{k}", where, required=False)}
    # the gold is the option's text, not its letter
    letters = [k for k, v in options.items() if v.strip().lower() == gold.strip().lower()]
    if len(letters) != 1:
        raise DataError(where[0], where[1], "gt_answer", f"{gold!r} is not exactly one of the options "
                        f"{list(options.values())}")
    image = _image_file(_text(raw, "image_path", where), opts.images or raw["_root"], where, "image_path")
    record = {"id": f"omnimedvqa:{raw.get('question_id') or where[1]}", "question": question, "options": options,
              "answer": letters[0], "answer_type": "mcq", "category": raw.get("dataset"),
              # one source file spells the field `modality`
              "modality_type": raw.get("modality_type") or raw.get("modality")}
    if raw.get("question_type"):
        record["question_type"] = raw["question_type"]
    return Converted("mcq", record, [image])


register_format(SourceFormat("omnimedvqa", _omnimed_rows, _convert_omnimed, license="per source dataset",
                             summary="OmniMedVQA QA_information/*/<source>.json plus Images/"))


# ----------------------------------------------------------------------------------------------------------------------
# Generic csv / jsonl with a column map
# ----------------------------------------------------------------------------------------------------------------------

_GENERIC_FIELDS = {"caption": ("caption",), "mcq": ("question", "answer"), "conversation": ("messages",)}


def _convert_generic(raw: Any, where: tuple[str, int], opts: ImportOptions) -> Converted:
    _raise_if_error(raw)
    if not isinstance(raw, dict):
        raise DataError(where[0], where[1], None, f"expected an object, got {type(raw).__name__}")
    kind = opts.kind
    record: dict[str, Any] = {}
    mapped = {**{k: k for k in raw if not str(k).startswith("_")}, **opts.columns}
    for ours, theirs in mapped.items():
        if theirs in raw and ours != "images":
            record[ours] = raw[theirs]
    for required in _GENERIC_FIELDS[kind]:
        if record.get(required) in (None, ""):
            raise DataError(where[0], where[1], mapped.get(required, required), "missing")
    images_value = raw.get(mapped.get("images", "images"))
    if isinstance(images_value, str):
        images_value = [images_value] if images_value.strip() else []
    images: list[ImageSource] = []
    for i, ref in enumerate(images_value or []):
        base = opts.images or Path(where[0]).parent
        images.append(_image_file(str(ref), base, where, f"{mapped.get('images', 'images')}[{i}]"))
    if kind == "mcq" and isinstance(record.get("options"), str):  # a CSV cell holding JSON
        try:
            record["options"] = json.loads(record["options"])
        except json.JSONDecodeError:
            raise DataError(where[0], where[1], mapped.get("options", "options"), "not a JSON object") from None
    record.setdefault("id", f"{Path(where[0]).stem}:{where[1]}")
    record["id"] = str(record["id"])
    return Converted(kind, record, images)


register_format(SourceFormat("csv", lambda src, opts: (r for f in _files(src, ".csv") for r in _csv_rows(f)),
                             _convert_generic, summary="any CSV; --kind and --columns ours=theirs,..."))
register_format(SourceFormat("jsonl",
                             lambda src, opts: (r for f in _files(src, ".jsonl") for r in _jsonl_rows(f)),
                             _convert_generic, summary="any JSONL; --kind and --columns ours=theirs,..."))
