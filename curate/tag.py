"""Stage 3, tag: label every row with its subfield (histopathology, gross, IHC, cytology, FISH, other).

    patho-r1 curate tag curated/03-decon --seed seed.csv --out curated/04-tag
    # review curated/04-tag/review.csv (correct the subfield column), then:
    patho-r1 curate tag curated/03-decon --seed seed.csv --corrections curated/04-tag/review.csv --out curated/04-tag

The Patho-R1 recipe: a classifier trained from a small hand-labelled seed, improved by human correction of what it
is least sure of.  Ours, top to bottom:
1. embed every row (`curate/embedders.py`; on Ray Data in an actor pool at scale);
2. labels: the seed file and any corrections (hand labels), plus caption keyword rules as weak labels where
   exactly one rule fires (`keyword_label`);
3. a share of the hand labels (`holdout_fraction`, stratified) is held out; a logistic regression is fit on the
   rest and the weak labels;
4. every row gets `subfield` (its hand label where it has one, else the prediction), `subfield_confidence` and
   `subfield_source` (hand | classifier);
5. the `review` least confident classifier-labelled rows go to `review.csv`; the corrected file comes back as
   `corrections` (active learning), and the manifest reports per-class precision and recall on the held-out
   hand labels.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from patho_r1.curate.config import SUBFIELDS, TagStage
from patho_r1.curate.embedders import EMBEDDINGS, embed_rows
from patho_r1.curate.rows import read_id_table, row_text
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import iter_jsonl, relative_images, stage_files
from patho_r1.errors import DataError

KEYWORD_RULES: dict[str, re.Pattern] = {
    "ihc": re.compile(r"immunohisto|\bihc\b|immunostain|\bpositiv\w* for\b|\bcd\d+\b|\bki-?67\b|\bck\d+\b|\bdab\b",
                      re.I),
    "fish": re.compile(r"\bfish\b|fluorescen\w* in situ|\bprobe signals?\b|\bamplification signals?\b", re.I),
    "cytology": re.compile(r"cytolog|\bsmears?\b|fine[- ]needle|\bfna\b|\bpap(anicolaou)?\b|cytospin", re.I),
    "gross": re.compile(r"\bgross(ly)?\b|\bcut surface\b|\bresected specimen\b|\bmacroscopic", re.I),
    "histopathology": re.compile(r"\bh&e\b|haematoxylin|hematoxylin|\bhistolog|photomicrograph", re.I),
}


def keyword_label(text: str) -> str | None:
    """The subfield exactly one keyword rule names, or None (no rule, or rules that disagree)."""
    hits = [name for name, rule in KEYWORD_RULES.items() if rule.search(text)]
    return hits[0] if len(hits) == 1 else None


def read_labels(path: str | Path, column: str = "subfield") -> dict[str, str]:
    """id -> subfield from a CSV (a header with `id` and `subfield`) or a JSONL of such objects."""
    labels = {}
    for key, (n, row) in read_id_table(path, (column,)).items():
        label = row[column].lower()
        if label not in SUBFIELDS:
            raise DataError(path, n, column, f"{label!r} is not a subfield; expected one of {', '.join(SUBFIELDS)}")
        labels[key] = label
    return labels


def _absolute_image(row: dict, base: Path) -> str:
    """The first image of a row as an absolute path, for the reviewer to open."""
    refs = row.get("images") or [""]
    return os.path.normpath(os.path.join(base, refs[0])) if isinstance(refs[0], str) and refs[0] else ""


def _holdout(labels: dict[str, str], fraction: float, seed: int) -> set[str]:
    """A stratified share of the hand labels, kept out of training to measure the classifier."""
    rng = np.random.default_rng(seed)
    out = set()
    by_class: dict[str, list[str]] = {}
    for key, label in sorted(labels.items()):
        by_class.setdefault(label, []).append(key)
    for ids in by_class.values():
        k = int(round(fraction * len(ids))) if len(ids) > 1 else 0
        out.update(rng.permutation(ids)[:k].tolist())
    return out


def run_tag(stage: TagStage, ctx: StageContext) -> dict:
    """The tag stage's runner (`curate/stages.py`): the steps in this module's docstring."""
    from sklearn.linear_model import LogisticRegression

    parent = ctx.parent
    files = stage_files(parent)
    hand: dict[str, str] = read_labels(stage.seed) if stage.seed else {}
    for path in stage.corrections:
        hand.update(read_labels(path))
    held = _holdout(hand, stage.holdout_fraction, ctx.seed)
    emb = embed_rows(files, parent, stage.embedder, ctx.rows, ctx.work / EMBEDDINGS, engine=ctx.engine,
                     progress=ctx.progress, model_encoder=ctx.model_encoder)
    train_idx, train_y, test_idx, test_y, weak = _training_labels(stage, files, hand, held)
    if len(set(train_y)) < 2:
        raise DataError(stage.seed or parent, None, "subfield", f"tagging needs labels of at least two subfields "
                        f"to train on; found {sorted(set(train_y)) or 'none'} (seed labels and keyword rules)")
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", C=10.0)
    clf.fit(np.asarray(emb[train_idx]), train_y)
    report = _holdout_report(clf, emb, test_idx, test_y)
    counts, review = _label_rows(stage, ctx, files, clf, emb, hand)
    if review:
        _write_review(review, ctx.work / "review.csv")
    return {"subfields": dict(counts), "hand_labels": len(hand), "held_out": len(test_idx),
            "weak_labels": dict(weak), "holdout": report, "review": len(review),
            "embedder": json.loads(stage.embedder.model_dump_json())}


def _training_labels(stage: TagStage, files: dict[str, Path], hand: dict[str, str], held: set[str]
                     ) -> tuple[list[int], list[str], list[int], list[str], Counter]:
    """Labels of training and held-out rows, by row index (one streaming pass; the texts are not kept), and the weak
    labels taken per subfield."""
    train_idx, train_y, test_idx, test_y = [], [], [], []
    weak = Counter()
    i = 0
    for kind, file in files.items():
        for row in iter_jsonl(file):
            rid = str(row.get("id"))
            if rid in hand:
                (test_idx if rid in held else train_idx).append(i)
                (test_y if rid in held else train_y).append(hand[rid])
            elif (stage.keyword_labels and (label := keyword_label(row_text(kind, row)))
                  and weak[label] < stage.max_weak_per_class):  # bounded: memory does not grow with the corpus
                train_idx.append(i)
                train_y.append(label)
                weak[label] += 1
            i += 1
    return train_idx, train_y, test_idx, test_y, weak


def _holdout_report(clf, emb, test_idx: list[int], test_y: list[str]) -> dict:
    """Accuracy and per-class precision and recall on the held-out hand labels."""
    from sklearn.metrics import classification_report

    if not test_idx:
        return {}
    pred = clf.predict(np.asarray(emb[test_idx]))
    full = classification_report(test_y, pred, output_dict=True, zero_division=0)
    return {"accuracy": round(full["accuracy"], 4), "n": len(test_y),
            "per_class": {c: {"precision": round(v["precision"], 4), "recall": round(v["recall"], 4),
                              "support": int(v["support"])}
                          for c, v in full.items() if c in SUBFIELDS}}


def _label_rows(stage: TagStage, ctx: StageContext, files: dict[str, Path], clf, emb, hand: dict[str, str]
                ) -> tuple[Counter, list[tuple[float, dict]]]:
    """Predict in chunks and write every row with its label; keep the least confident classifier-labelled rows for
    review (bounded: only the least sure survive)."""
    classes = list(clf.classes_)
    review: list[tuple[float, dict]] = []
    counts: Counter = Counter()
    i = 0
    for kind, file in files.items():
        rows = iter_jsonl(file)
        while chunk := list(itertools.islice(rows, 4096)):
            proba = clf.predict_proba(np.asarray(emb[i:i + len(chunk)]))
            i += len(chunk)
            for row, p in zip(chunk, proba, strict=True):
                rid = str(row.get("id"))
                best = int(np.argmax(p))
                if rid in hand:
                    label, conf, source = hand[rid], 1.0, "hand"
                else:
                    label, conf, source = classes[best], float(p[best]), "classifier"
                    if stage.review:
                        review.append((conf, _review_entry(kind, row, rid, label, conf, ctx.parent)))
                        if len(review) > 4 * stage.review:  # memory stays bounded: only the least sure survive
                            review = sorted(review, key=lambda x: x[0])[: stage.review]
                counts[label] += 1
                ctx.writer.row(kind, {**relative_images(row, ctx.parent, ctx.final), "subfield": label,
                                      "subfield_confidence": round(conf, 4), "subfield_source": source})
    return counts, sorted(review, key=lambda x: x[0])[: stage.review]


def _review_entry(kind: str, row: dict, rid: str, label: str, conf: float, parent: Path) -> dict:
    return {"id": rid, "predicted": label, "confidence": round(conf, 4), "subfield": label,
            "text": row_text(kind, row)[:300], "image": _absolute_image(row, parent)}


def _write_review(review: list[tuple[float, dict]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "subfield", "predicted", "confidence", "text", "image"])
        w.writeheader()
        for _, entry in review:
            w.writerow(entry)
