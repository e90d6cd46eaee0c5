"""Embedding benchmarks, measured in one run.

    python bench/embed.py [--vectors 1000000]

    python bench/embed.py --index-only [--vectors 1000000] [--hnsw-vectors 200000]

Prints (1) peak activation memory of one contrastive step against the contrastive batch size, plain backward versus
GradCache with a fixed chunk (the GradCache column should stay nearly flat); (2) encode throughput with length
bucketing against without, and the padding share of each; (3) the self-tuning faiss index (target recall@10 0.95)
against exact torch search, on structured vectors (a mixture of clusters, as real embeddings are) and on the tiny
PathoCLIP's own image embeddings: build and tuning time, memory, ms/query, speed-up and recall@10 on fresh queries
that played no part in the tuning.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _step_peak_rss_child(model_dir: str, pairs_path: str, batch: int, chunk: int) -> None:
    """Child process: peak resident memory added by one contrastive step (ru_maxrss cannot be reset, hence a
    process per measurement; torch's CPU allocator is invisible to tracemalloc)."""
    import resource

    from patho_r1.config import LoraSpec
    from patho_r1.data import load_records
    from patho_r1.embed.loss import grad_cache_step, info_nce
    from patho_r1.embed.model import Embedder

    emb = Embedder.from_pretrained(model_dir)
    emb.add_adapter(LoraSpec(r=8, alpha=16, dropout=0.0).to_peft())
    pairs = load_records(pairs_path, "embed_pair")[:batch]
    q, p = [r.query for r in pairs], [r.positive for r in pairs]
    loss_fn = functools.partial(info_nce, temperature=0.05)
    loss_fn(emb(q[:2]), emb(p[:2])).backward()  # warm up allocator and kernels at the smallest size
    emb.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if chunk:
        grad_cache_step(emb, q, p, chunk, loss_fn)
    else:
        loss_fn(emb(q), emb(p)).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) / 1024)  # ru_maxrss is in KiB on Linux


def peak_step_memory(model_dir, pairs_path, batch: int, chunk: int) -> float:
    import subprocess

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(model_dir), str(pairs_path),
                          str(batch), str(chunk)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from patho_r1.fixtures.workspace import make_workspace

    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _step_peak_rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hnsw-vectors", type=int, default=200_000, help="HNSW builds slowly: a smaller gallery")
    ap.add_argument("--index-only", action="store_true")
    args = ap.parse_args()
    if args.index_only:
        index_bench(args.vectors, args.dim, args.hnsw_vectors)
        return
    from patho_r1.config import LoraSpec
    from patho_r1.data import load_records
    from patho_r1.embed.model import Embedder

    model_dir, world = make_workspace()
    emb = Embedder.from_pretrained(model_dir)
    emb.add_adapter(LoraSpec(r=8, alpha=16, dropout=0.0).to_peft())
    pairs = load_records(world / "embed/image_text_pairs.jsonl", "embed_pair")

    print("peak memory added by one contrastive step (MB of resident memory), batch size: plain vs GradCache(chunk 4)")
    for batch in (8, 16, 32, 64):
        plain = peak_step_memory(model_dir, world / "embed/image_text_pairs.jsonl", batch, 0)
        cached = peak_step_memory(model_dir, world / "embed/image_text_pairs.jsonl", batch, 4)
        print(f"  {batch:4d}   plain {plain:8.1f}   gradcache {cached:8.1f}")

    composed = load_records(world / "embed/composed_train.jsonl", "embed_pair")
    items = [r.query for r in composed] + [r.positive for r in composed] + [r.query for r in pairs[:64]]
    rng = np.random.default_rng(0)
    items = [items[i] for i in rng.permutation(len(items))]
    emb.encode(items[:8])  # warm up
    for bucket in (False, True):
        t0 = time.perf_counter()
        emb.encode(items, batch_size=16, bucket_by_length=bucket)
        rate = len(items) / (time.perf_counter() - t0)
        pad = emb.padding_fraction(items, batch_size=16, bucket_by_length=bucket)
        print(f"encode {'with' if bucket else 'without'} length bucketing: {rate:7.1f} items/s, padding {pad:.3f}")
    index_bench(args.vectors, args.dim, args.hnsw_vectors)




def _mixture(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    """Points around random cluster centres, L2-normalised (written in blocks to bound memory)."""
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.normal(size=(m, dim)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _compare(name: str, vectors: np.ndarray, queries: np.ndarray, kind: str, tmp: Path) -> None:
    from patho_r1.embed.evaluate import exact_search
    from patho_r1.embed.index import VectorIndex, recall_against

    index = VectorIndex.build(vectors, kind=kind, target_recall=0.95)
    index.save(tmp / f"{kind}.faiss")
    index = VectorIndex.load(tmp / f"{kind}.faiss")
    index.search(queries[:8], 10)
    t0 = time.perf_counter()
    _, approx = index.search(queries, 10)
    fast_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    _, exact = exact_search(queries, vectors, 10)
    exact_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    s = index.settings
    setting = f"nprobe {s.nprobe}/{s.nlist}" if kind == "ivf" else f"efSearch {s.ef_search}"
    print(f"  {name}: {len(vectors):,} x {vectors.shape[1]}, {kind} ({setting}): {fast_ms:.3f} ms/query vs exact "
          f"{exact_ms:.3f} -> {exact_ms / fast_ms:.1f}x faster; recall@10 on fresh queries "
          f"{recall_against(approx, exact):.3f} (tuned on held-out gallery vectors: {s.measured_recall:.3f}); build "
          f"{s.build_seconds:.1f} s of which tuning {s.tune_seconds:.1f} s; index {index.memory_bytes() / 2**20:,.0f} "
          f"MiB")


def index_bench(n: int, dim: int, hnsw_n: int) -> None:
    import tempfile

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(100, n // 1000), dim)).astype(np.float32)
    vectors = _mixture(n, dim, centres, rng)
    queries = _mixture(200, dim, centres, rng)  # fresh points of the same mixture: no part in the tuning
    print("self-tuning faiss index, target recall@10 0.95, against exact torch search:")
    with tempfile.TemporaryDirectory() as tmp:
        _compare("clustered", vectors, queries, "ivf", Path(tmp))
        _compare("clustered", vectors[:hnsw_n], queries, "hnsw", Path(tmp))
        del vectors
        from patho_r1.data import load_records
        from patho_r1.embed.clip import ClipEmbedder
        from patho_r1.fixtures.synth import WorldConfig, generate_world
        from patho_r1.fixtures.tiny_clip import build_tiny_clip

        world = generate_world(Path(tmp) / "world", config=WorldConfig(n_train_tiles=2000, n_heldout_tiles=200))
        del world
        clip = ClipEmbedder.from_pretrained(build_tiny_clip(Path(tmp) / "clip"))
        images = [{"images": r.images} for r in load_records(Path(tmp) / "world/cpt/train.jsonl", "caption")]
        fresh = [{"images": r.images} for r in load_records(Path(tmp) / "world/cpt/heldout.jsonl", "caption")]
        gallery, probe = clip.encode(images, batch_size=64), clip.encode(fresh, batch_size=64)
        _compare("tiny PathoCLIP image embeddings", gallery, probe, "ivf", Path(tmp))


if __name__ == "__main__":
    main()
