"""Stage 4, cluster: three difficulty levels within each subfield, by K-means on joint image + caption embeddings.

    patho-r1 curate cluster curated/04-tag --out curated/05-cluster [--criterion term_density]

Top to bottom:
1. the rows' embeddings: the tag stage's, linked, when it used the same embedder; else embedded here;
2. per subfield (`subfield` from the tag stage; one group when there is none), K-means with `k` clusters is fit
   on up to `sample` rows (scikit-learn; faiss past a million rows) and every row is assigned to its nearest
   centroid;
3. the clusters are ordered easy -> hard by a documented criterion, computed per cluster:
   - `term_density` (default): mean share of domain terms among a caption's words (`embedders.term_density`):
     harder material is described in denser specialist language;
   - `centroid_distance`: mean distance to the subfield's centroid: atypical material is harder;
   - `caption_length`: mean words per caption;
4. each row gets `difficulty` (easy / medium / hard for k = 3; level_0.. otherwise) and `difficulty_cluster`.

The manifest gives, per subfield, the cluster sizes, the silhouette (on at most 5,000 rows) and the criterion of
each cluster; with `truth` (a CSV of id, difficulty, such as the synthetic world's hidden attribute) it also gives
the adjusted Rand index of the levels against it.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from patho_r1.curate.config import LEVELS, ClusterStage, EmbedderSpec
from patho_r1.curate.embedders import EMBEDDINGS, embed_rows, term_density
from patho_r1.curate.minhash import n_words
from patho_r1.curate.rows import row_text
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import iter_jsonl, read_stage_manifest, relative_images, stage_files


def _kmeans(x: np.ndarray, k: int, backend: str, seed: int) -> np.ndarray:
    """Centroids (k, d) of `x`."""
    if backend == "faiss" or (backend == "auto" and len(x) > 1_000_000):
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=25, nredo=10, seed=seed, verbose=False)  # 10 restarts, as sklearn
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        return km.centroids
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x).cluster_centers_.astype(np.float32)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid, from |x|^2 - 2 x.c + |c|^2: (n, k) numbers, not an (n, k, d) array."""
    d = (x * x).sum(1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return d.argmin(1)


def level_names(k: int) -> list[str]:
    return list(LEVELS) if k == 3 else [f"level_{i}" for i in range(k)]


def run_cluster(stage: ClusterStage, ctx: StageContext) -> dict:
    """The cluster stage's runner (`curate/stages.py`): the steps in this module's docstring."""
    from sklearn.metrics import adjusted_rand_score

    parent, n_rows = ctx.parent, ctx.rows
    files = stage_files(parent)
    emb = embed_rows(files, parent, stage.embedder, n_rows, ctx.work / EMBEDDINGS, engine=ctx.engine,
                     progress=ctx.progress, model_encoder=ctx.model_encoder,
                     reuse=parent / EMBEDDINGS if _same_embedder(parent, stage) else None)
    groups, density, length = _row_features(files, n_rows)
    rng = np.random.default_rng(ctx.seed)
    level = np.zeros(n_rows, np.int8)
    cluster_of = np.zeros(n_rows, np.int8)
    report = {subfield: _cluster_subfield(stage, emb, np.asarray(idx), density, length, level, cluster_of, rng,
                                          ctx.seed)
              for subfield, idx in sorted(groups.items())}
    counts, predicted, true = _write_levels(stage, ctx, files, level, cluster_of)
    result = {"criterion": stage.criterion, "levels": dict(counts), "subfields": report}
    if predicted:
        result["adjusted_rand_index"] = round(float(adjusted_rand_score(true, predicted)), 4)
        result["truth_rows"] = len(predicted)
        agree = sum(p == t for p, t in zip(predicted, true, strict=True)) / len(predicted)
        result["level_agreement"] = round(agree, 4)  # same names in the same order: the criterion's direction too
    return result


def _same_embedder(parent: Path, stage: ClusterStage) -> bool:
    """The parent is a tag stage that embedded with the same embedder: its vectors are reused."""
    manifest = read_stage_manifest(parent)
    return (manifest is not None and manifest.stage == "tag"
            and EmbedderSpec.model_validate(manifest.counts.get("embedder", {})).identity()
            == stage.embedder.identity())


def _row_features(files: dict[str, Path], n_rows: int) -> tuple[dict[str, list[int]], np.ndarray, np.ndarray]:
    """One pass: each row's group and its criterion inputs (small per-row numbers, not the rows)."""
    groups: dict[str, list[int]] = defaultdict(list)
    density, length = np.zeros(n_rows, np.float32), np.zeros(n_rows, np.float32)
    i = 0
    for kind, file in files.items():
        for row in iter_jsonl(file):
            text = row_text(kind, row)
            groups[row.get("subfield") or "all"].append(i)
            density[i], length[i] = term_density(text), n_words(text)
            i += 1
    return groups, density, length


def _cluster_subfield(stage: ClusterStage, emb, idx: np.ndarray, density: np.ndarray, length: np.ndarray,
                      level: np.ndarray, cluster_of: np.ndarray, rng: np.random.Generator, seed: int) -> dict:
    """K-means on a sample of one subfield's rows, every row assigned to its nearest centroid, and the clusters
    ordered by the criterion into levels (written into `level` and `cluster_of`); returns the subfield's report."""
    from sklearn.metrics import silhouette_score

    if len(idx) < stage.k * 2:  # too few rows to split: all medium (or the middle level)
        level[idx] = stage.k // 2
        return {"rows": len(idx), "note": f"fewer than {stage.k * 2} rows: not clustered"}
    fit_idx = np.sort(rng.choice(idx, size=min(stage.sample, len(idx)), replace=False))
    labels, dist = _assign(stage, emb, idx, fit_idx, seed)
    criterion = {
        "term_density": [float(density[idx][labels == c].mean()) for c in range(stage.k)],
        "centroid_distance": [float(dist[labels == c].mean()) for c in range(stage.k)],
        "caption_length": [float(length[idx][labels == c].mean()) for c in range(stage.k)],
    }[stage.criterion]
    order = np.argsort(criterion, kind="stable")  # ascending: the lowest value is easiest
    rank = np.empty(stage.k, np.int64)
    rank[order] = np.arange(stage.k)
    level[idx] = rank[labels]
    cluster_of[idx] = labels
    sil_idx = rng.choice(len(idx), size=min(5000, len(idx)), replace=False)
    sil = silhouette_score(np.asarray(emb[idx[sil_idx]]), labels[sil_idx]) \
        if len(set(labels[sil_idx].tolist())) > 1 else float("nan")
    names = level_names(stage.k)
    return {"rows": int(len(idx)), "fit_on": int(len(fit_idx)), "silhouette": round(float(sil), 4),
            "levels": {names[rank[c]]: {"size": int((labels == c).sum()), stage.criterion: round(criterion[c], 4)}
                       for c in order}}


def _assign(stage: ClusterStage, emb, idx: np.ndarray, fit_idx: np.ndarray, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cluster and its distance to the subfield's centre, 65,536 rows at a time."""
    fit = np.asarray(emb[fit_idx])
    centroids = _kmeans(fit, stage.k, stage.backend, seed)
    centre = fit.mean(0)  # the subfield's centre, from the same sample
    del fit
    labels = np.empty(len(idx), np.int64)
    dist = np.empty(len(idx), np.float32)
    for s in range(0, len(idx), 65536):
        part = np.asarray(emb[idx[s:s + 65536]])
        labels[s:s + 65536] = _nearest(part, centroids)
        dist[s:s + 65536] = np.sqrt(((part - centre) ** 2).sum(1))
    return labels, dist


def _write_levels(stage: ClusterStage, ctx: StageContext, files: dict[str, Path], level: np.ndarray,
                  cluster_of: np.ndarray) -> tuple[Counter, list[str], list[str]]:
    """Every row with its level; returns the rows per level, and the predicted and true levels of the rows the
    `truth` file names."""
    names = level_names(stage.k)
    truth = _read_truth(stage.truth) if stage.truth else {}
    predicted, true = [], []
    counts: Counter = Counter()
    i = 0
    for kind, file in files.items():
        for row in iter_jsonl(file):
            name = names[level[i]]
            counts[name] += 1
            if str(row.get("id")) in truth:
                predicted.append(name)
                true.append(truth[str(row.get("id"))])
            ctx.writer.row(kind, {**relative_images(row, ctx.parent, ctx.final), "difficulty": name,
                                  "difficulty_cluster": int(cluster_of[i])})
            i += 1
    return counts, predicted, true


def _read_truth(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as fh:
        return {row["id"]: row["difficulty"] for row in csv.DictReader(fh) if row.get("difficulty")}
