"""Shared fixtures: one tiny model and one small synthetic world per test session (built in a few seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from patho.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def small_world_config():
    from patho.synth import WorldConfig

    return WorldConfig(n_train_tiles=96, n_heldout_tiles=36, n_sft=40, n_rl=24, n_rl_heldout=12, n_embed_pairs=24,
                       n_composed_per_task=8)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory, small_world_config):
    from patho.synth import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=0, config=small_world_config)
    return root
