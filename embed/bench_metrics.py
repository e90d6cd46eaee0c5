"""The embedding suite's metrics, each with its chance level and a 95% bootstrap interval over items.

* Recall@K from per-query hits (a query is a hit at K when any of its positives is in its top K); chance is the
  hypergeometric probability that K candidates drawn at random include a positive.
* Classification: accuracy, balanced accuracy and weighted F1, the values scikit-learn's `accuracy_score`,
  `balanced_accuracy_score` and `f1_score(average="weighted")` give; chance is a predictor that guesses uniformly
  among the classes (accuracy and balanced accuracy 1/C; weighted F1 in closed form below).
* The interval: a percentile bootstrap over items.  Every resample is a vector of multinomial counts (how often each
  item was drawn), so all resamples of a metric are one matrix product over per-item one-hot columns, not a Python
  loop of scikit-learn calls: 1,000 resamples of 1,000 items take milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)
CONFIDENCE = 0.95


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] multinomial draw counts: row b says how often each of n items appears in bootstrap sample b."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return [float(lo), float(hi)]


def hits_at_k(ranking: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = KS) -> dict[int, np.ndarray]:
    """Per query, whether any positive is in its first k ranked candidates."""
    return {k: np.array([bool(set(ranking[i, :k].tolist()) & positives[i]) for i in range(len(positives))])
            for k in ks}


def recall_chance(n_gallery: int, n_positives: Sequence[int], k: int) -> float:
    """Mean over queries of P(at least one of a query's positives among k candidates drawn at random)."""
    k = min(k, n_gallery)
    out = []
    for p in n_positives:
        none = 1.0
        for i in range(k):  # P(no positive in k draws without replacement), one factor per draw
            none *= max(n_gallery - p - i, 0) / (n_gallery - i)
        out.append(1.0 - none)
    return float(np.mean(out)) if out else 0.0


def recall_metrics(ranking: np.ndarray, positives: Sequence[set[int]], n_gallery: int, *, n_boot: int = 1000,
                   seed: int = 0, ks: Sequence[int] = KS) -> dict:
    """{"R@k": value, "R@k_ci": [lo, hi], "R@k_chance": value} for each k."""
    hits = hits_at_k(ranking, positives, ks)
    counts = resample_counts(len(positives), n_boot, seed) if len(positives) else None
    out: dict = {}
    for k, h in hits.items():
        out[f"R@{k}"] = float(h.mean()) if len(h) else 0.0
        out[f"R@{k}_ci"] = _interval(counts @ h / len(h)) if counts is not None else [0.0, 0.0]
        out[f"R@{k}_chance"] = recall_chance(n_gallery, [len(p) for p in positives], k)
    return out


def _one_hot(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)))
    out[np.arange(len(labels)), [index[x] for x in labels]] = 1.0
    return out


def _classification_stats(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and weighted F1 of every weighting of the items at once: `weights` [B, n] (the
    bootstrap counts, or one row of ones for the point value), `truth`/`pred` one-hot [n, C]."""
    support = weights @ truth  # [B, C] items of each true class
    predicted = weights @ pred  # [B, C] items predicted as each class
    tp = weights @ (truth * pred)  # [B, C]
    total = support.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        recall = np.where(support > 0, tp / support, np.nan)
    return {"accuracy": tp.sum(1) / total,
            "balanced_accuracy": np.nanmean(recall, axis=1),  # over the classes present, as scikit-learn does
            "weighted_f1": (f1 * support).sum(1) / total}


def weighted_f1_chance(labels: Sequence[str], classes: Sequence[str]) -> float:
    """Expected weighted F1 of a uniform random guess among C classes: class c (share p_c of the items) then has
    precision p_c and recall 1/C, so F1_c = 2 p_c (1/C) / (p_c + 1/C), weighted by p_c."""
    c = len(classes)
    shares = _one_hot(labels, classes).mean(0)
    return float(sum(p * 2 * p / c / (p + 1 / c) for p in shares if p > 0))


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str], *,
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, weighted F1, each with `_ci` and `_chance`; `classes`: every candidate class."""
    truth, pred = _one_hot(y_true, classes), _one_hot(y_pred, classes)
    point = _classification_stats(truth, pred, np.ones((1, len(y_true))))
    boot = _classification_stats(truth, pred, resample_counts(len(y_true), n_boot, seed))
    chance = {"accuracy": 1 / len(classes), "balanced_accuracy": 1 / len(classes),
              "weighted_f1": weighted_f1_chance(y_true, classes)}
    out: dict = {}
    for name in ("accuracy", "balanced_accuracy", "weighted_f1"):
        out[name] = float(point[name][0])
        out[f"{name}_ci"] = _interval(boot[name])
        out[f"{name}_chance"] = float(chance[name])
    return out
