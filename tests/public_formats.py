"""Small files in each public dataset's *own* on-disk format (../shared/notes/dataset-formats.md), with bad rows
planted where the real releases have them.  Each writer returns (source path, expected counts)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).save(buf, format="JPEG")
    return buf.getvalue()


def pathvqa(root: Path) -> tuple[Path, dict]:
    """HF parquet shards `data/{train,test}-0000N-of-0000M.parquet`; `image` is an Image struct {bytes, path}.
    One test row repeats a train image (same bytes); one row has an empty answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "path-vqa" / "data"
    data.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("question", pa.string()), ("answer", pa.string())])
    train = [({"bytes": png(1), "path": "img_0.jpg"}, "is this a benign tumor?", "yes"),
             ({"bytes": png(2), "path": "img_1.jpg"}, "what does this image show?", "lymphoid hyperplasia"),
             ({"bytes": png(3), "path": "img_2.jpg"}, "are the nuclei enlarged?", "no")]
    test = [({"bytes": png(1), "path": "img_3.jpg"}, "what is present?", "granuloma"),
            ({"bytes": png(4), "path": "img_4.jpg"}, "is there necrosis?", "")]  # empty answer: a bad row
    for name, rows in (("train-00000-of-00001", train), ("test-00000-of-00001", test)):
        table = pa.Table.from_pylist([{"image": i, "question": q, "answer": a} for i, q, a in rows], schema=schema)
        pq.write_table(table, data / f"{name}.parquet")
    return data, {"mcq": 4, "rejected": 1, "unique_images": 3}  # img_3 repeats img_0


def pathmmu(root: Path) -> tuple[Path, dict]:
    """`data.json` = data[subset][split] -> samples; images only for PubMed and EduContent (SocialPath's missing)."""
    base = root / "PathMMU"
    (base / "images").mkdir(parents=True)
    for i in range(3):
        (base / "images" / f"pubmed_{i}.jpg").write_bytes(jpeg(10 + i))
    sample = {"No": 0, "img": "pubmed_0.jpg", "question": "What is the most likely diagnosis?",
              "options": ["A) Adenocarcinoma", "B) Lymphoma (diffuse)", "C) Melanoma", "D) Both A and B"],
              "answer": "B) Lymphoma (diffuse)", "explanation": "Sheets of atypical lymphoid cells."}
    data = {
        "PubMed": {"val": [sample], "test": [{**sample, "No": 1, "img": "pubmed_1.jpg", "answer": "D) Both A and B"},
                                             {**sample, "No": 2, "img": "pubmed_2.jpg", "answer": "C) Melanoma"}]},
        "SocialPath": {"test": [{**sample, "No": 0, "img": "tweet_0.jpg", "tw_id": "123", "img_position": 1,
                                 "ref_web": "https://example.org"}]},
    }
    (base / "data.json").write_text(json.dumps(data))
    return base, {"mcq": 3, "rejected": 1}


def quilt_vqa(root: Path) -> tuple[Path, dict]:
    """HF parquet `data/train-*.parquet`: image, question, answer, answer_type (OPEN/CLOSED), context."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "Quilt_VQA" / "data"
    data.mkdir(parents=True)
    rows = [{"image": {"bytes": png(20), "path": None}, "question": "Is there a granuloma?", "answer": "yes",
             "answer_type": "CLOSED", "context": "video transcript"},
            {"image": {"bytes": png(21), "path": None}, "question": "What pattern is seen?",
             "answer": "A nodular pattern of epithelioid histiocytes surrounding necrosis.", "answer_type": "OPEN",
             "context": ""}]
    pq.write_table(pa.Table.from_pylist(rows), data / "train-00000-of-00001.parquet")
    return data, {"mcq": 2, "rejected": 0}


def quilt_1m(root: Path) -> tuple[Path, dict]:
    """`quilt_1M_lookup.csv` with its real columns; one row names an image that is not in the folder."""
    base = root / "quilt"
    (base / "images").mkdir(parents=True)
    columns = ["Unnamed: 0", "caption", "image_path", "subset", "split", "pathology", "roi_text", "noisy_text",
               "corrected_text", "med_umls_ids", "magnification", "height", "width"]
    with (base / "quilt_1M_lookup.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for i in range(4):
            name = f"vid{i}_frame.jpg"
            if i != 3:
                (base / "images" / name).write_bytes(jpeg(30 + i))
            w.writerow({"Unnamed: 0": i, "caption": f"caption number {i}, with a comma", "image_path": name,
                        "subset": "quilt", "split": "train", "pathology": "['Dermatopathology']",
                        "med_umls_ids": "['C0027651']", "magnification": 1, "height": 16, "width": 16})
    return base / "quilt_1M_lookup.csv", {"caption": 3, "rejected": 1}


def arch(root: Path) -> tuple[Path, dict]:
    """`books_set/captions.json` keyed "0", "1", ... (uuid, caption, figure_id, letter); one caption has no image,
    as 35 do in the real books set."""
    base = root / "arch" / "books_set"
    (base / "images").mkdir(parents=True)
    captions = {}
    for i in range(11):  # keys "0".."10": sorted as numbers, not as strings
        uid = f"uuid-{i:03d}"
        if i != 4:
            (base / "images" / f"{uid}.png").write_bytes(png(40 + i))
        captions[str(i)] = {"figure_id": f"fig{i // 2}", "letter": "ab"[i % 2], "uuid": uid,
                            "caption": f"Figure {i}: a lesion with atypia."}
    (base / "captions.json").write_text(json.dumps(captions))
    return base, {"caption": 10, "rejected": 1}


def pmc_oa(root: Path) -> tuple[Path, dict]:
    """`pmc_oa.jsonl` rows {image, caption} with `images/` beside it; one row has a non-image file."""
    base = root / "pmc_oa"
    (base / "images").mkdir(parents=True)
    rows = []
    for i in range(3):
        name = f"PMC{1000 + i}_Fig1_{i}.jpg"
        (base / "images" / name).write_bytes(jpeg(50 + i) if i != 2 else b"<html>not an image</html>")
        rows.append({"image": name, "caption": f"Histology of case {i}."})
    (base / "pmc_oa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base / "pmc_oa.jsonl", {"caption": 2, "rejected": 1}


def vlmeval_tsv(root: Path) -> tuple[Path, dict]:
    """A VLMEvalKit MCQ TSV: base64 images, one row naming another row's image by its index (<= 64 chars), a
    hint, one row with bad base64."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "PathMMU_VAL.tsv"
    b64 = base64.b64encode(png(60)).decode()
    rows = [["0", b64, "", "Which stain is used?", "H&E", "PAS", "", "", "A", "PubMed", "val"],
            ["1", "0", "Patient is 60.", "What is shown?", "Necrosis", "Fibrosis", "Mucin", "", "C", "PubMed", "val"],
            ["2", "!!notbase64!!" * 8, "", "What is shown?", "X", "Y", "", "", "B", "PubMed", "val"]]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "image", "hint", "question", "A", "B", "C", "D", "answer", "category", "split"])
        w.writerows(rows)
    return path, {"mcq": 2, "rejected": 1, "unique_images": 1}


WRITERS = {"pathvqa": pathvqa, "pathmmu": pathmmu, "quilt-vqa": quilt_vqa, "quilt-1m": quilt_1m, "arch": arch,
           "pmc-oa": pmc_oa, "vlmeval-tsv": vlmeval_tsv}
