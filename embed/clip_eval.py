"""PathoCLIP's evaluation, as the paper's tables report it, for any embedder with `encode(items, batch_size=...)`:
PathoCLIP and other CLIP directories (`embed.clip.ClipEmbedder`) and the HOMIE embedder (`embed.model.Embedder`).

- **Retrieval**: Recall@1/5/10/50 image -> text and text -> image, and the mean of the eight.  Several images may
  share one caption text: the text gallery holds each text once, and a hit is the image's own caption text.
- **Zero-shot classification**: prompt ensembling, every class embedded as the mean over its name's synonyms (the
  correct-option texts the data uses for it) x `TEMPLATES`; accuracy, balanced accuracy, weighted F1.
- **Few-shot linear probe**: logistic regression on image embeddings with k = 1, 2, 4, 8, 16 shots per class, 10
  seeds each; mean and standard deviation, and a box plot.
- **Composed retrieval** (HOMIE's tasks), for the comparison: a CLIP can only add its parts' vectors ("simple add").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patho_r1.data import CaptionRecord, MCQRecord, load_records
from patho_r1.embed.clip_config import ClipEvalConfig
from patho_r1.embed.evaluate import (
    class_synonyms,
    composed_retrieval,
    exact_search,
    recall_at_k,
    zero_shot_classification,
)

TEMPLATES = ("an H&E image of {}.", "a histopathology image showing {}.", "a photomicrograph of {}.", "{}.")
RETRIEVAL_KS = (1, 5, 10, 50)


def retrieval(embedder, records: Sequence[CaptionRecord], batch_size: int = 32) -> dict:
    texts: dict[str, int] = {}
    text_of = [texts.setdefault(r.caption, len(texts)) for r in records]
    image_emb = embedder.encode([{"images": r.images[:1]} for r in records], batch_size=batch_size)
    text_emb = embedder.encode(list(texts), batch_size=batch_size)
    _, i2t = exact_search(image_emb, text_emb, k=max(RETRIEVAL_KS))
    _, t2i = exact_search(text_emb, image_emb, k=max(RETRIEVAL_KS))
    images_of: list[set[int]] = [set() for _ in texts]
    for i, t in enumerate(text_of):
        images_of[t].add(i)
    out = {"image_to_text": recall_at_k(i2t, [{t} for t in text_of], RETRIEVAL_KS),
           "text_to_image": recall_at_k(t2i, images_of, RETRIEVAL_KS),
           "n_images": len(records), "n_texts": len(texts)}
    out["mean_recall"] = float(np.mean([*out["image_to_text"].values(), *out["text_to_image"].values()]))
    return out


def zero_shot(embedder, records: Sequence[MCQRecord], synonyms: dict[str, list[str]], batch_size: int = 32) -> dict:
    out, _, _ = zero_shot_classification(embedder, [r.images[0] for r in records], [r.category for r in records],
                                         synonyms, batch_size, templates=TEMPLATES)
    out["chance"] = 1.0 / len(synonyms)
    return out


def few_shot(embedder, train: Sequence[MCQRecord], test: Sequence[MCQRecord], shots: Sequence[int] = (1, 2, 4, 8, 16),
             seeds: int = 10, batch_size: int = 32) -> dict:
    """Linear-probe accuracy per shot count: `seeds` draws of k training images per class each."""
    from sklearn.linear_model import LogisticRegression

    x_train = embedder.encode([{"images": r.images[:1]} for r in train], batch_size=batch_size)
    x_test = embedder.encode([{"images": r.images[:1]} for r in test], batch_size=batch_size)
    y_train, y_test = np.array([r.category for r in train]), np.array([r.category for r in test])
    by_class = {c: np.flatnonzero(y_train == c) for c in sorted(set(y_train))}
    out = {}
    for k in shots:
        runs = []
        for seed in range(seeds):
            rng = np.random.default_rng([seed, k])
            pick = np.concatenate([rng.choice(idx, min(k, len(idx)), replace=False) for idx in by_class.values()])
            probe = LogisticRegression(max_iter=2000).fit(x_train[pick], y_train[pick])
            runs.append(float((probe.predict(x_test) == y_test).mean()))
        out[str(k)] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs}
    return out


def evaluate_model(embedder, cfg: ClipEvalConfig, composed: str | None = None) -> dict:
    """Every evaluation the config names, for one embedder."""
    out: dict = {}
    if cfg.retrieval:
        out["retrieval"] = retrieval(embedder, load_records(cfg.retrieval, "caption"), cfg.batch_size)
    test = [r for r in load_records(cfg.classification, "mcq") if r.images and r.category] \
        if cfg.classification else []
    if test:
        train = [r for r in load_records(cfg.few_shot_train, "mcq") if r.images and r.category] \
            if cfg.few_shot_train else []
        out["zero_shot"] = zero_shot(embedder, test, class_synonyms([*train, *test]), cfg.batch_size)
        if train:
            out["few_shot"] = few_shot(embedder, train, test, cfg.shots, cfg.seeds, cfg.batch_size)
    if composed:
        tasks = composed_retrieval(embedder, load_records(composed, "embed_pair"), cfg.batch_size,
                                   simple_add=not hasattr(embedder, "embed_texts"))  # a CLIP adds already
        out["composed"] = {"tasks": tasks, "mean_recall@1": float(np.mean([t["recall@1"] for t in tasks.values()]))}
        if all("simple_add_recall@1" in t for t in tasks.values()):
            out["composed"]["simple_add_mean_recall@1"] = float(np.mean([t["simple_add_recall@1"]
                                                                          for t in tasks.values()]))
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def comparison_markdown(results: dict[str, dict]) -> str:
    """One row per model (and a simple-add row for an embedder that fuses), the paper's columns."""
    head = ["model", *(f"i->t R@{k}" for k in RETRIEVAL_KS), *(f"t->i R@{k}" for k in RETRIEVAL_KS), "mean R",
            "zero-shot acc", "bal. acc", "weighted F1", "16-shot probe", "composed R@1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in results.items():
        r, z, f, c = m.get("retrieval", {}), m.get("zero_shot", {}), m.get("few_shot", {}), m.get("composed", {})
        shots = max(f, key=int) if f else None
        cells = [label, *(_fmt(r.get("image_to_text", {}).get(f"recall@{k}")) for k in RETRIEVAL_KS),
                 *(_fmt(r.get("text_to_image", {}).get(f"recall@{k}")) for k in RETRIEVAL_KS),
                 _fmt(r.get("mean_recall")), _fmt(z.get("accuracy")), _fmt(z.get("balanced_accuracy")),
                 _fmt(z.get("weighted_f1")),
                 f"{f[shots]['mean']:.3f} ± {f[shots]['std']:.3f}" if shots else "-", _fmt(c.get("mean_recall@1"))]
        lines.append("| " + " | ".join(cells) + " |")
        if "simple_add_mean_recall@1" in c:
            lines.append("| " + " | ".join([f"{label} (simple add)", *["-"] * (len(head) - 2),
                                             _fmt(c["simple_add_mean_recall@1"])]) + " |")
    if any("few_shot" in m for m in results.values()):
        lines += ["", "| model | " + " | ".join(f"{k}-shot" for k in next(m["few_shot"] for m in results.values()
                                                                          if "few_shot" in m)) + " |"]
        first = next(m["few_shot"] for m in results.values() if "few_shot" in m)
        lines.append("|---|" + "---|" * len(first))
        for label, m in results.items():
            if "few_shot" in m:
                lines.append(f"| {label} | " + " | ".join(f"{v['mean']:.3f} ± {v['std']:.3f}"
                                                            for v in m["few_shot"].values()) + " |")
    return "\n".join(lines) + "\n"


def few_shot_box_plot(results: dict[str, dict], path: Path) -> Path | None:
    """Accuracy over the seeds per shot count, one box per model, side by side."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

    models = {label: m["few_shot"] for label, m in results.items() if "few_shot" in m}
    if not models:
        return None
    shots = list(next(iter(models.values())))
    fig = Figure(figsize=(1.6 + 1.2 * len(shots) * max(1, len(models)) / 2, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(models)
    for j, (label, per_shot) in enumerate(models.items()):
        positions = [i + (j - (len(models) - 1) / 2) * width for i in range(len(shots))]
        boxes = ax.boxplot([per_shot[k]["runs"] for k in shots], positions=positions, widths=width * 0.9,
                           patch_artist=True, manage_ticks=False)
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{j}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{j}", label=label)
    ax.set_xticks(range(len(shots)), [f"{k}-shot" for k in shots])
    ax.set_ylabel("linear-probe accuracy")
    seeds = len(next(iter(next(iter(models.values())).values()))["runs"])
    ax.set_title(f"few-shot linear probe ({seeds} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_comparison(out_dir: str | Path, results: dict[str, dict], cfg: ClipEvalConfig | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "config": cfg.model_dump() if cfg else None}
    (out / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "comparison.md").write_text(comparison_markdown(results))
    few_shot_box_plot(results, out / "few_shot.png")
    return out
