"""Retrieval and classification metrics for the embedder, composed-retrieval evaluation, and vector search.

* `recall_at_k`: a query counts as a hit at K when any of its positives is in the top K.
* `zero_shot_metrics`: accuracy, balanced accuracy and weighted F1 (sklearn) of prompt-template classification.
* `modality_gap`: `||mean(image) - mean(text)||_2` on L2-normalised embeddings (Liang et al. 2022).
* `exact_search` (torch matmul + top-k) for small galleries; large ones: `embed.index.VectorIndex` (faiss, self-tuned).
* `composed_retrieval`: the HOMIE-style tasks (multi-image -> text, image+text -> image, image+text -> text,
  video frames -> text), each with the prompt-fusion embedder and the "simple add" fusion baseline.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from patho_r1.data import EmbedPairRecord, MCQRecord, load_records

TEMPLATES = ("An H&E image of {}.", "A pathology image showing {}.", "{}.")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------

def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int,
                 exclude: Sequence[set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search with torch: (scores [Q, k], indices [Q, k]).  `exclude[i]` lists gallery
    indices query i may not retrieve (they rank last)."""
    q, g = torch.from_numpy(np.ascontiguousarray(queries, np.float32)), torch.from_numpy(
        np.ascontiguousarray(gallery, np.float32))
    sims = q @ g.T
    for i, banned in enumerate(exclude or []):
        if banned:
            sims[i, list(banned)] = float("-inf")
    scores, idx = torch.topk(sims, k=min(k, g.shape[0]), dim=1)
    return scores.numpy(), idx.numpy()


def recall_at_k(ranking: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """`ranking[i]` lists gallery indices best first; `positives[i]` the correct ones for query i."""
    out = {}
    for k in ks:
        hits = [bool(set(ranking[i, :k].tolist()) & positives[i]) for i in range(len(positives))]
        out[f"recall@{k}"] = float(np.mean(hits)) if hits else 0.0
    return out


def modality_gap(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    img = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    txt = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    return float(np.linalg.norm(img.mean(0) - txt.mean(0)))


def zero_shot_metrics(y_true: Sequence, y_pred: Sequence) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted"))}


# ----------------------------------------------------------------------------------------------------------------------
# Composed retrieval
# ----------------------------------------------------------------------------------------------------------------------

def _target_key(side) -> str:
    return side.text if side.text else "|".join(map(str, side.images or side.frames))


def _simple_add(embedder, queries: list, batch_size: int) -> np.ndarray:
    """Baseline fusion: embed every part alone (each image, each frame, the text) and add the vectors."""
    parts, owner = [], []
    for i, q in enumerate(queries):
        for ref in [*q.images, *q.frames]:
            parts.append({"images": [ref]})
            owner.append(i)
        if q.text:
            parts.append({"text": q.text})
            owner.append(i)
    emb = embedder.encode(parts, batch_size=batch_size)
    fused = np.zeros((len(queries), emb.shape[1]), np.float32)
    np.add.at(fused, np.array(owner), emb)
    return fused / np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)


def composed_retrieval(embedder, records: Sequence[EmbedPairRecord], batch_size: int = 32,
                       simple_add: bool = True) -> dict[str, dict]:
    """Per task: Recall@1/5/10 of the embedder and of the simple-add baseline, with chance at 1.

    The gallery is every distinct positive of the task.  A retrieved candidate is right when it is the query's own
    positive (the same text, the same image) or shares its `target_id`; several classes may share one answer text,
    and each of their queries is right on it.  A query never retrieves its own input: an image+text -> image query
    whose image is another query's positive would otherwise find itself.
    """
    by_task: dict[str, list[EmbedPairRecord]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    results = {}
    for task, recs in sorted(by_task.items()):
        gallery_keys: dict[str, int] = {}
        gallery_sides, gallery_targets = [], []
        for r in recs:
            key = _target_key(r.positive)
            if key not in gallery_keys:
                gallery_keys[key] = len(gallery_sides)
                gallery_sides.append(r.positive)
                gallery_targets.append(r.target_id or key)
        positives = [{gallery_keys[_target_key(r.positive)]}
                     | {j for j, t in enumerate(gallery_targets) if r.target_id is not None and t == r.target_id}
                     for r in recs]
        own_inputs = [{gallery_keys[str(ref)] for ref in [*r.query.images, *r.query.frames] if str(ref) in gallery_keys}
                      - positives[i] for i, r in enumerate(recs)]
        gallery = embedder.encode(gallery_sides, batch_size=batch_size)
        queries = embedder.encode([r.query for r in recs], batch_size=batch_size)
        _, ranking = exact_search(queries, gallery, k=10, exclude=own_inputs)
        m = recall_at_k(ranking, positives)
        m["chance@1"] = float(np.mean([len(p) / len(gallery_sides) for p in positives]))
        m["n_queries"], m["n_gallery"] = len(recs), len(gallery_sides)
        if simple_add:
            _, base_rank = exact_search(_simple_add(embedder, [r.query for r in recs], batch_size), gallery, k=10,
                                        exclude=own_inputs)
            m["simple_add_recall@1"] = recall_at_k(base_rank, positives, ks=(1,))["recall@1"]
        results[task] = m
    return results


def zero_shot_classification(embedder, image_refs: Sequence, labels: Sequence[str],
                             class_names: dict[str, str | Sequence[str]], batch_size: int = 32,
                             templates: Sequence[str] = TEMPLATES) -> tuple[dict, np.ndarray, np.ndarray]:
    """Prompt-ensemble zero-shot classification: each class is the mean embedding of its name (or each of its
    synonyms) in every template.  Also returns the image and class-text embeddings."""
    keys = sorted(class_names)
    prompts, owner = [], []
    for k, key in enumerate(keys):
        names = [class_names[key]] if isinstance(class_names[key], str) else class_names[key]
        for name in names:
            prompts += [t.format(name) for t in templates]
            owner += [k] * len(templates)
    emb = embedder.encode(prompts, batch_size=batch_size)
    text = np.zeros((len(keys), emb.shape[1]), np.float32)
    np.add.at(text, np.array(owner), emb)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    images = embedder.encode([{"images": [ref]} for ref in image_refs], batch_size=batch_size)
    pred = [keys[i] for i in (images @ text.T).argmax(1)]
    return zero_shot_metrics(list(labels), pred), images, text


def class_synonyms(records: Sequence[MCQRecord], most: int = 4) -> dict[str, list[str]]:
    """Each class's names as the data spells them: the correct-option texts of its records, commonest first (at
    most `most`; `adenocarcinoma` -> "well-differentiated adenocarcinoma"), or the category with spaces for
    underscores when no record has a lettered answer."""
    spelled: dict[str, Counter] = {}
    for r in records:
        counts = spelled.setdefault(r.category, Counter())
        if r.options and r.answer in r.options:
            counts[r.options[r.answer]] += 1
    return {c: [name for name, _ in counts.most_common(most)] or [c.replace("_", " ")]
            for c, counts in spelled.items()}


def class_names(records: Sequence[MCQRecord]) -> dict[str, str]:
    """Each class's one name: its commonest spelling in the data (`class_synonyms`)."""
    return {c: names[0] for c, names in class_synonyms(records, most=1).items()}


def evaluate_embedder(embedder, composed: str | None = None, classification: str | None = None,
                      batch_size: int = 32) -> dict:
    out: dict = {}
    if composed:
        out["tasks"] = composed_retrieval(embedder, load_records(composed, "embed_pair"), batch_size)
    if classification:
        recs = [r for r in load_records(classification, "mcq") if r.images and r.category]
        labels = [r.category for r in recs]
        names = class_names(recs)
        metrics, img, txt = zero_shot_classification(embedder, [r.images[0] for r in recs], labels, names,
                                                     batch_size)
        metrics["chance"] = 1.0 / len(names)
        out["zero_shot"] = metrics
        out["modality_gap"] = modality_gap(img, txt)
    return out


def write_results(out_dir: str | Path, metrics: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = []
    if metrics.get("tasks"):
        lines += ["| task | R@1 | R@5 | R@10 | chance@1 | simple-add R@1 |", "|---|---|---|---|---|---|"]
        for task, m in metrics["tasks"].items():
            lines.append(f"| {task} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | "
                         f"{m['chance@1']:.3f} | {m.get('simple_add_recall@1', float('nan')):.3f} |")
    if metrics.get("zero_shot"):
        z = metrics["zero_shot"]
        lines += ["", "| zero-shot | accuracy | balanced accuracy | weighted F1 | chance | modality gap |",
                  "|---|---|---|---|---|---|",
                  f"| tiles | {z['accuracy']:.3f} | {z['balanced_accuracy']:.3f} | {z['weighted_f1']:.3f} | "
                  f"{z['chance']:.3f} | {metrics['modality_gap']:.3f} |"]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
