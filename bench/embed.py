"""Embedding benchmarks, measured in one run.

    python bench/embed.py [--vectors 1000000]

Prints (1) peak activation memory of one contrastive step against the contrastive batch size, plain backward versus
GradCache with a fixed chunk (the GradCache column should stay nearly flat); (2) encode throughput with length
bucketing against without, and the padding share of each; (3) top-10 search latency on random 512-d vectors:
a faiss IVF index (built, saved, reloaded) against exact torch search.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

# This file is named like the package it measures; keep `python bench/embed.py` from importing itself as `embed`.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import workspace  # noqa: E402


def peak_step_memory(embedder, queries, positives, chunk):
    """Peak Python-allocated bytes (tracemalloc sees torch CPU tensors) during one contrastive step."""
    from embed.loss import grad_cache_step
    from embed.train import contrastive_loss

    loss_fn = contrastive_loss(0.05)
    embedder.zero_grad(set_to_none=True)
    tracemalloc.start()
    if chunk:
        grad_cache_step(embedder, queries, positives, chunk, loss_fn)
    else:
        loss_fn(embedder(queries), embedder(positives)).backward()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    from embed.evaluate import VectorIndex, exact_search
    from embed.model import Embedder
    from patho.config import LoraSpec
    from patho.data import load_records

    model_dir, world = workspace()
    emb = Embedder.from_pretrained(model_dir)
    emb.add_adapter(LoraSpec(r=8, alpha=16, dropout=0.0).to_peft())
    pairs = load_records(world / "embed/image_text_pairs.jsonl", "embed_pair")

    print("peak memory of one contrastive step (MB), batch size vs plain / GradCache(chunk 4):")
    for batch in (8, 16, 32, 64):
        q, p = [r.query for r in pairs[:batch]], [r.positive for r in pairs[:batch]]
        plain = peak_step_memory(emb, q, p, None) / 2**20
        cached = peak_step_memory(emb, q, p, 4) / 2**20
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

    vectors = rng.normal(size=(args.vectors, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:100] + 0.01 * rng.normal(size=(100, args.dim)).astype(np.float32)
    t0 = time.perf_counter()
    index = VectorIndex.build(vectors, kind="ivf", nprobe=32)
    build = time.perf_counter() - t0
    index.save(Path(model_dir).parent / "bench.faiss")
    index = VectorIndex.load(Path(model_dir).parent / "bench.faiss")
    t0 = time.perf_counter()
    _, approx = index.search(queries, 10)
    faiss_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    _, exact = exact_search(queries, vectors, 10)
    torch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
    print(f"top-10 on {args.vectors:,} x {args.dim}: faiss IVF-flat {faiss_ms:.3f} ms/query (build {build:.1f} s, "
          f"recall@10 vs exact {recall:.3f}); exact torch {torch_ms:.3f} ms/query; speed-up {torch_ms / faiss_ms:.1f}x")


if __name__ == "__main__":
    main()
