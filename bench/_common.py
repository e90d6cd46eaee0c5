"""Shared setup for the benchmarks: a tiny model and a small synthetic world in a temporary folder."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def workspace(world_config=None, seed: int = 0) -> tuple[Path, Path]:
    """(tiny model dir, world dir), built fresh under a temporary folder."""
    from patho.synth import WorldConfig, generate_world
    from patho.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="patho-bench-"))
    model = build_tiny_model(root / "tiny")
    generate_world(root / "world", seed=seed, config=world_config or WorldConfig(
        n_train_tiles=120, n_heldout_tiles=36, n_sft=160, n_rl=64, n_rl_heldout=32, n_embed_pairs=64,
        n_composed_per_task=16))
    return model, root / "world"


@contextmanager
def timer(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0
