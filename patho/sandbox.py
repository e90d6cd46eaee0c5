"""A throwaway workspace with a tiny model and a small synthetic world, for benchmarks and quick experiments."""

from __future__ import annotations

import tempfile
from pathlib import Path

from patho.synth import WorldConfig, generate_world
from patho.tiny import TinySpec, build_tiny_model

SMALL_WORLD = WorldConfig(n_train_tiles=120, n_heldout_tiles=36, n_sft=160, n_rl=64, n_rl_heldout=32,
                          n_embed_pairs=64, n_composed_per_task=16)


def make_workspace(root: str | Path | None = None, world: WorldConfig = SMALL_WORLD, seed: int = 0,
                   spec: TinySpec = TinySpec()) -> tuple[Path, Path]:
    """Build `(tiny model dir, world dir)` under `root` (a new temporary folder by default)."""
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="patho-sandbox-"))
    model = build_tiny_model(root / "tiny", spec)
    generate_world(root / "world", seed=seed, config=world)
    return model, root / "world"
