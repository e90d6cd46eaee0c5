"""Readers for the zero-shot classification datasets of PMEB (MLLM4PUE's Pathology Multimodal Embedding Benchmark),
each in its release layout, registered in the format table of `patho_r1.formats`.

Every reader yields one labelled image per row as an `mcq` record with `answer_type: open`, `answer` and `category`
the dataset's own label (its folder name, its CSV value, its Excel column), and `id` the image's path relative to the
dataset folder: stable whatever the order of the files on disk.  Prompts and the words a model is shown for each
label are the suite's data (`embed/suites/pmeb.yaml`), not the reader's.

Three layouts cover the releases, plus two generic formats for a dataset we have no entry for:

| layout    | releases                                                         | generic format   |
|-----------|------------------------------------------------------------------|------------------|
| folders   | BACH, CRC-100K, Kather colon, Databiox, DigestPath, LC25000, RenalCell | `class-folders`  |
| table     | SICAP (Excel one-hot columns), SkinCancer and Osteo (CSV)       | `label-csv`      |
| file name | WSSS4LUAD (the label vector in the file name)                   |                  |

Which layouts are verified against a documented source, and which are guesses, is in docs/pmeb.md; each entry
below cites its source.  A label outside a dataset's known set is a `DataError` naming the file, row and field.

The formats register on import of this module (`embed.bench` imports it).  `patho_r1.formats` does not import it:
this module imports that one, and the shared floor keeps no import cycles (tests/test_structure.py).
"""

from __future__ import annotations

import filecmp
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patho_r1.errors import DataError
from patho_r1.formats import Converted, ImportOptions, SourceFormat, _csv_rows, _image_file, register_format

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
LABEL_QUESTION = "Which tissue class does this H&E image show?"


@dataclass(frozen=True)
class ClassDataset:
    """One PMEB classification release: its format name, its own labels, and how its rows are found."""

    name: str
    labels: tuple[str, ...]  # the labels as the release spells them (folder names, CSV values, Excel columns)
    rows: Callable[[Path, ClassDataset], Iterator[tuple[str, int, dict]]]
    source: str  # where the layout comes from (docs/pmeb.md lists it with its status)
    verified: bool
    license: str | None = None
    folders: Mapping[str, str] = field(default_factory=dict)  # folder name -> label, where they differ
    options: Mapping[str, Any] = field(default_factory=dict)  # the layout's own settings


def _images_under(folder: Path, exclude: re.Pattern | None) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not (exclude and exclude.search(p.name)))


def _require_folder(src: Path) -> None:
    if not src.is_dir():
        raise DataError(src, None, None, "not a folder (a PMEB classification dataset is read from its folder)")


def folder_rows(src: Path, ds: ClassDataset) -> Iterator[tuple[str, int, dict]]:
    """Class-per-folder: every image below a folder whose name is a label (or maps to one), at any depth (Databiox
    keeps a magnification folder under each grade).  Folders that name no label are not read."""
    _require_folder(src)
    exclude = re.compile(ds.options["exclude"]) if ds.options.get("exclude") else None
    by_folder = {**{label: label for label in ds.labels}, **ds.folders}
    found = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        label = by_folder.get(folder.name) if ds.labels else folder.name
        if label is None:
            continue
        for n, image in enumerate(_images_under(folder, exclude), start=1):
            found += 1
            yield str(folder), n, {"image": str(image), "label": label, "_root": str(src)}
    if not found:
        raise DataError(src, None, None, f"no images in class folders {sorted(by_folder) or '(any)'}")


def _table_files(src: Path, ds: ClassDataset) -> Path:
    pattern = ds.options["table"]
    hits = sorted(src.glob(pattern)) if src.is_dir() else [src]
    if len(hits) != 1:
        raise DataError(src, None, None, f"expected one label table {pattern}, found {len(hits)}")
    return hits[0]


def _xlsx_rows(path: Path) -> Iterator[tuple[str, int, dict]]:
    """Rows of the first sheet as dicts keyed by the header row (line 1), numbered as Excel numbers them."""
    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile and XML errors; the user needs the file
        raise DataError(path, None, None, f"not a readable Excel file ({exc})") from None
    sheet = book.worksheets[0]
    rows = sheet.iter_rows(values_only=True)
    header = [str(h) if h is not None else "" for h in next(rows, ())]
    for line, values in enumerate(rows, start=2):
        yield str(path), line, dict(zip(header, values, strict=False))
    book.close()


def table_rows(src: Path, ds: ClassDataset) -> Iterator[tuple[str, int, dict]]:
    """A label table (CSV or Excel) naming each image: the `image` column names a file under `images` (a folder of
    the dataset; else the table's own folder), or one found by name anywhere below the dataset folder
    (`find_by_name`); the label is the `label` column or, for one-hot tables, the one `onehot` column that holds 1."""
    opts = ds.options
    table = _table_files(src, ds)
    root = src if src.is_dir() else table.parent
    base = root / opts["images"] if "images" in opts else table.parent  # `images`: relative to the dataset folder
    rows = _xlsx_rows(table) if table.suffix.lower() == ".xlsx" else _csv_rows(table)
    by_name: dict[str, list[Path]] | None = None
    for where_file, line, raw in rows:
        if isinstance(raw, DataError):
            raise raw
        name = str(raw.get(opts["image"]) or "").strip()
        if not name:
            raise DataError(where_file, line, opts["image"], "missing image name")
        label = _table_label(raw, (where_file, line), ds)
        if label in opts.get("ignore", ()):
            continue  # a label the benchmark leaves out by definition (docs/pmeb.md), not a bad row
        path = base / name
        if not path.is_file() and opts.get("find_by_name"):
            if by_name is None:  # the release scatters images over case folders: index them once
                by_name = {}
                for p in _images_under(root, None):
                    by_name.setdefault(p.name, []).append(p)
            found = by_name.get(Path(name).name, [path])
            if len(found) > 1 and not all(filecmp.cmp(found[0], f, shallow=False) for f in found[1:]):
                # two folders hold different images of that name: which one the row means is unknown
                raise DataError(where_file, line, opts["image"], f"{name!r} names {len(found)} files "
                                f"({', '.join(str(f.relative_to(root)) for f in found[:3])}); give its folder")
            path = found[0]
        yield where_file, line, {"image": str(path), "label": label, "_root": str(root),
                                 "_split": raw.get(opts["split"]) if opts.get("split") else None,
                                 "_field": opts["image"], "_label_field": opts.get("label") or "/".join(opts["onehot"])}


def _table_label(raw: dict, where: tuple[str, int], ds: ClassDataset) -> str:
    onehot = ds.options.get("onehot")
    if onehot:
        hot = [col for col in onehot if str(raw.get(col)).strip() in ("1", "1.0", "True")]
        if len(hot) != 1:
            raise DataError(where[0], where[1], "/".join(onehot), f"expected exactly one of these columns set to 1, "
                            f"got {hot or 'none'}")
        return ds.options.get("merge", {}).get(hot[0], hot[0])
    col = ds.options["label"]
    value = raw.get(col)
    if value is None or not str(value).strip():
        raise DataError(where[0], where[1], col, "missing label")
    return str(value).strip()


_LABEL_VECTOR = re.compile(r"\[(\d),\s*(\d),\s*(\d)\]")


def label_vector_rows(src: Path, ds: ClassDataset) -> Iterator[tuple[str, int, dict]]:
    """WSSS4LUAD training patches: the file name ends with the image-level label vector `[tumor, stroma, normal]`;
    only single-label patches are classification items (mixed ones are left out, as the benchmarks do)."""
    _require_folder(src)
    folder = src / ds.options["folder"] if (src / ds.options["folder"]).is_dir() else src
    for n, image in enumerate(_images_under(folder, None), start=1):
        m = _LABEL_VECTOR.search(image.name)
        if m is None:
            raise DataError(image, None, "file name", "no label vector like [1, 0, 0] in the file name")
        bits = [int(b) for b in m.groups()]
        if sum(bits) == 1:
            yield str(folder), n, {"image": str(image), "label": ds.labels[bits.index(1)], "_root": str(src)}


def convert_labelled(raw: dict, where: tuple[str, int], opts: ImportOptions, ds: ClassDataset) -> Converted:
    label = raw["label"]
    if ds.labels and label not in ds.labels:
        raise DataError(where[0], where[1], raw.get("_label_field", "label"), f"unknown label {label!r}; {ds.name} has "
                        f"{list(ds.labels)}")
    image = _image_file(raw["image"], raw["_root"], where, raw.get("_field", "image"))
    rel = Path(os.path.relpath(raw["image"], raw["_root"])).as_posix()
    record = {"id": f"{ds.name}:{rel}", "question": LABEL_QUESTION, "answer": label, "answer_type": "open",
              "category": label}
    if raw.get("_split"):
        record["split"] = str(raw["_split"])
    return Converted("mcq", record, [image])


DATASETS: dict[str, ClassDataset] = {}


def register_dataset(ds: ClassDataset) -> ClassDataset:
    """Put a dataset in the format table (as `ds.name`) and in `DATASETS`."""
    DATASETS[ds.name] = ds
    register_format(SourceFormat(ds.name, lambda src, opts: ds.rows(Path(src), ds),
                                 lambda raw, where, opts: convert_labelled(raw, where, opts, ds),
                                 license=ds.license, summary=f"PMEB classification: {ds.source}"))
    return ds


_CRC = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")

# Sources (docs/pmeb.md has the full table).  Verified: a documented layout (the dataset's page, or two independent
# public loaders agreeing).  Guess: our reading of the dataset's description; the reader says what it expected.
for _ds in (
    ClassDataset("pmeb-bach", ("Normal", "Benign", "InSitu", "Invasive"), folder_rows,
                 "ICIAR2018_BACH_Challenge/Photos/{Normal,Benign,InSitu,Invasive}/*.tif (zenodo 3632035; "
                 "kaiko-ai/eva:docs/datasets/bach.md)",
                 verified=True, license="CC BY-NC-ND 4.0"),
    ClassDataset("pmeb-crc100k", _CRC, folder_rows,
                 "NCT-CRC-HE-100K/{ADI,...,TUM}/*.tif (zenodo 1214456; kaiko-ai/eva:docs/datasets/crc.md)",
                 verified=True, license="CC BY 4.0"),
    ClassDataset("pmeb-kather-colon", _CRC, folder_rows,
                 "CRC-VAL-HE-7K/{ADI,...,TUM}/*.tif (zenodo 1214456; PLIP's Kather colon test set)", verified=True,
                 license="CC BY 4.0"),
    ClassDataset("pmeb-databiox", ("G1", "G2", "G3"), folder_rows,
                 "BC_IDC_Grade_{1,2,3}/<magnification>/*.jpg (Mendeley yfp5sfj47m)", verified=False,
                 license="CC BY 4.0",
                 folders={"BC_IDC_Grade_1": "G1", "BC_IDC_Grade_2": "G2", "BC_IDC_Grade_3": "G3"}),
    ClassDataset("pmeb-digestpath-signet", ("pos", "neg"), folder_rows,
                 "sig-train-pos/*.jpeg, sig-train-neg/*.jpeg (+ .xml boxes) (DigestPath 2019)", verified=False,
                 license="CC BY-NC 4.0 (unverified)", folders={"sig-train-pos": "pos", "sig-train-neg": "neg"}),
    ClassDataset("pmeb-digestpath-colonoscopy", ("pos", "neg"), folder_rows,
                 "tissue-train-pos-v1/*.jpg (+ *_mask.jpg), tissue-train-neg/*.jpg (DigestPath 2019)", verified=False,
                 license="CC BY-NC 4.0 (unverified)", options={"exclude": r"_mask\.[a-z]+$"},
                 folders={"tissue-train-pos-v1": "pos", "tissue-train-pos": "pos", "tissue-train-neg": "neg"}),
    ClassDataset("pmeb-lc25000-colon", ("colon_aca", "colon_n"), folder_rows,
                 "lung_colon_image_set/colon_image_sets/{colon_aca,colon_n}/*.jpeg (tampapath/lung_colon_image_set)",
                 verified=True, license="unrestricted (the authors' README)"),
    ClassDataset("pmeb-lc25000-lung", ("lung_aca", "lung_n", "lung_scc"), folder_rows,
                 "lung_colon_image_set/lung_image_sets/{lung_aca,lung_n,lung_scc}/*.jpeg", verified=True,
                 license="unrestricted (the authors' README)"),
    ClassDataset("pmeb-renalcell", ("blood", "cancer", "normal", "other", "stroma"), folder_rows,
                 "class folders blood/cancer/normal/other/stroma (zenodo 7898308)", verified=False,
                 license="CC BY 4.0 (unverified)"),
    ClassDataset("pmeb-sicap", ("NC", "G3", "G4", "G5"), table_rows,
                 "SICAPv2/partition/Test/Test.xlsx (image_name, one-hot NC,G3,G4,G5,G4C) + images/ (Mendeley "
                 "9xxm58dvs3)", verified=True, license="CC BY 4.0",
                 options={"table": "partition/Test/Test.xlsx", "image": "image_name", "images": "images",
                          "onehot": ("NC", "G3", "G4", "G5", "G4C"), "merge": {"G4C": "G4"}}),
    ClassDataset("pmeb-skincancer",
                 ("nontumor_skin_necrosis_necrosis", "nontumor_skin_muscle_skeletal",
                  "nontumor_skin_sweatglands_sweatglands", "nontumor_skin_vessel_vessel",
                  "nontumor_skin_elastosis_elastosis", "nontumor_skin_chondraltissue_chondraltissue",
                  "nontumor_skin_hairfollicle_hairfollicle", "nontumor_skin_epidermis_epidermis",
                  "nontumor_skin_nerves_nerves", "nontumor_skin_subcutis_subcutis", "nontumor_skin_dermis_dermis",
                  "nontumor_skin_sebaceousglands_sebaceousglands", "tumor_skin_epithelial_sqcc",
                  "tumor_skin_melanoma_melanoma", "tumor_skin_epithelial_bcc", "tumor_skin_naevus_naevus"),
                 table_rows, "tiles CSV (file, class, set, malignicy) + tiles/ (heiDATA 7QCR8S)", verified=False,
                 license="CC BY 4.0", options={"table": "*.csv", "image": "file", "label": "class", "split": "set",
                                               "find_by_name": True}),
    ClassDataset("pmeb-osteo", ("Non-Tumor", "Viable", "Non-Viable-Tumor"), table_rows,
                 "ML_Features_1144.csv (image.name, classification) + case folders of .jpg (TCIA "
                 "Osteosarcoma-Tumor-Assessment)", verified=False, license="CC BY 3.0",
                 options={"table": "*.csv", "image": "image.name", "label": "classification", "find_by_name": True,
                          "ignore": ("viable: non-viable",)}),
    ClassDataset("pmeb-wsss4luad", ("tumor", "stroma", "normal"), label_vector_rows,
                 "training/*-[tumor, stroma, normal].png (WSSS4LUAD grand-challenge)", verified=True,
                 license="CC BY-NC-SA 4.0 (unverified)", options={"folder": "training"}),
    # Generic: any class-per-folder release, or any CSV of image and label (columns `image`, `label`).
    ClassDataset("class-folders", (), folder_rows, "any folder of class folders", verified=True),
    ClassDataset("label-csv", (), table_rows, "any CSV with columns image,label (paths relative to it)",
                 verified=True, options={"table": "*.csv", "image": "image", "label": "label"}),
):
    register_dataset(_ds)
