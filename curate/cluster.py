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
from patho_r1.curate.store import StageWriter, iter_jsonl, read_stage_manifest, relative_images, stage_files


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


def run_cluster(stage: ClusterStage, parent: Path, out: Path, final: Path, writer: StageWriter, progress,
                engine: str, n_rows: int, seed: int = 0, model_encoder=None) -> dict:
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    files = stage_files(parent)
    parent_manifest = read_stage_manifest(parent)
    same_embedder = (parent_manifest is not None and parent_manifest.stage == "tag"
                     and EmbedderSpec.model_validate(parent_manifest.counts.get("embedder", {})).identity()
                     == stage.embedder.identity())
    emb = embed_rows(files, parent, stage.embedder, n_rows, out / EMBEDDINGS, engine=engine, progress=progress,
                     model_encoder=model_encoder, reuse=parent / EMBEDDINGS if same_embedder else None)

    # One pass: each row's group and its criterion inputs (small per-row numbers, not the rows).
    groups: dict[str, list[int]] = defaultdict(list)
    density, length = np.zeros(n_rows, np.float32), np.zeros(n_rows, np.float32)
    i = 0
    for kind, file in files.items():
        for row in iter_jsonl(file):
            text = row_text(kind, row)
            groups[row.get("subfield") or "all"].append(i)
            density[i], length[i] = term_density(text), n_words(text)
            i += 1

    rng = np.random.default_rng(seed)
    names = level_names(stage.k)
    level = np.zeros(n_rows, np.int8)
    cluster_of = np.zeros(n_rows, np.int8)
    report: dict[str, dict] = {}
    for subfield, idx in sorted(groups.items()):
        idx = np.asarray(idx)
        if len(idx) < stage.k * 2:  # too few rows to split: all medium (or the middle level)
            level[idx] = stage.k // 2
            report[subfield] = {"rows": len(idx), "note": f"fewer than {stage.k * 2} rows: not clustered"}
            continue
        fit_idx = np.sort(rng.choice(idx, size=min(stage.sample, len(idx)), replace=False))
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
        report[subfield] = {
            "rows": int(len(idx)), "fit_on": int(len(fit_idx)), "silhouette": round(float(sil), 4),
            "levels": {names[rank[c]]: {"size": int((labels == c).sum()), stage.criterion: round(criterion[c], 4)}
                       for c in order},
        }

    truth = _read_truth(stage.truth) if stage.truth else None
    pred_truth: tuple[list, list] = ([], [])
    counts: Counter = Counter()
    i = 0
    for kind, file in files.items():
        for row in iter_jsonl(file):
            name = names[level[i]]
            counts[name] += 1
            if truth is not None and str(row.get("id")) in truth:
                pred_truth[0].append(name)
                pred_truth[1].append(truth[str(row.get("id"))])
            writer.row(kind, {**relative_images(row, parent, final), "difficulty": name,
                              "difficulty_cluster": int(cluster_of[i])})
            i += 1
    result = {"criterion": stage.criterion, "levels": dict(counts), "subfields": report}
    if truth is not None and pred_truth[0]:
        result["adjusted_rand_index"] = round(float(adjusted_rand_score(pred_truth[1], pred_truth[0])), 4)
        result["truth_rows"] = len(pred_truth[0])
        agree = sum(p == t for p, t in zip(*pred_truth, strict=True)) / len(pred_truth[0])
        result["level_agreement"] = round(agree, 4)  # same names in the same order: the criterion's direction too
    return result


def _read_truth(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as fh:
        return {row["id"]: row["difficulty"] for row in csv.DictReader(fh) if row.get("difficulty")}
