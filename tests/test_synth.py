import json

import numpy as np
from PIL import Image

from patho_r1.data import iter_vlmeval_tsv, load_records
from patho_r1.fixtures.synth import TISSUES, WorldConfig, generate_world, render_tile, world_digest


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    cfg = WorldConfig(n_train_tiles=24, n_heldout_tiles=12, n_sft=10, n_rl=8, n_rl_heldout=6, n_embed_pairs=6,
                      n_composed_per_task=3, n_eval_tiles=12, n_eval_mcq=6)
    generate_world(tmp_path / "a", seed=7, config=cfg)
    generate_world(tmp_path / "b", seed=7, config=cfg)
    generate_world(tmp_path / "c", seed=8, config=cfg)
    assert world_digest(tmp_path / "a") == world_digest(tmp_path / "b")
    assert world_digest(tmp_path / "a") != world_digest(tmp_path / "c")


def _features(arr):
    a = arr.astype(np.float32) / 255
    dark = (a.mean(-1) < 0.45).mean()
    white = (a.min(-1) > 0.9).mean()
    return np.concatenate([a.mean((0, 1)), a.std((0, 1)), [dark, white]])


def test_class_is_visible_but_stain_varies():
    """A nearest-centroid classifier on simple colour/texture statistics separates the classes (the signal is there),
    and the same class renders differently across tiles (stain variation)."""
    train = [(_features(render_tile(t, np.random.default_rng([0, i]), 56, ("light", "dark")[i % 2])), k)
             for k, t in enumerate(TISSUES) for i in range(20)]
    test = [(_features(render_tile(t, np.random.default_rng([1, i]), 56, ("light", "dark")[i % 2])), k)
            for k, t in enumerate(TISSUES) for i in range(10)]
    x = np.stack([f for f, _ in train])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    centroids = np.stack([((np.stack([f for f, k in train if k == c]) - mu) / sd).mean(0) for c in range(len(TISSUES))])
    correct = sum(int(np.argmin(((((f - mu) / sd) - centroids) ** 2).sum(-1)) == k) for f, k in test)
    assert correct / len(test) >= 0.6  # chance is 1/6; colour statistics alone get ~0.8, so texture matters too
    a = render_tile(TISSUES[0], np.random.default_rng(1), 56, "light").astype(float)
    b = render_tile(TISSUES[0], np.random.default_rng(2), 56, "dark").astype(float)
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() > 10  # dark protocol is visibly darker


def test_every_dataset_kind_validates(world_dir, small_world_config):
    manifest = json.loads((world_dir / "world.json").read_text())
    assert manifest["seed"] == 0
    captions = load_records(world_dir / "cpt/train.jsonl", "caption")
    assert len(captions) == small_world_config.n_train_tiles
    convs = load_records(world_dir / "sft/train.jsonl", "conversation")
    kinds = {c.kind for c in convs}
    assert kinds == {"mcq", "description", "complex", "multi_turn"}
    for c in convs:
        for m in c.messages:
            if m.role == "assistant":
                text = m.text()
                assert text.startswith("<think>") and text.endswith("</answer>")
    assert any(sum(m.role == "assistant" for m in c.messages) == 2 for c in convs)
    mcqs = load_records(world_dir / "rl/train.jsonl", "mcq")
    assert all(4 <= len(m.options) <= 6 and m.answer in m.options for m in mcqs)
    assert len({m.answer for m in mcqs}) > 2  # gold letters are spread, not always A
    composed = load_records(world_dir / "embed/composed_heldout.jsonl", "embed_pair")
    assert {c.task for c in composed} == {"mi2t", "it2i", "it2t", "v2t"}
    assert all(len(c.query.images) == 2 for c in composed if c.task == "mi2t")
    assert all(len(c.query.frames) == 3 for c in composed if c.task == "v2t")
    assert load_records(world_dir / "embed/text_pairs.jsonl", "embed_pair")
    rows = list(iter_vlmeval_tsv(world_dir / "eval/PathoSynth_MCQ.tsv"))
    assert len(rows) == small_world_config.n_eval_mcq
    eval_images = {r.images[0] for r in rows}
    assert len(eval_images) > 1  # fresh tiles: the eval split is rendered apart from training and held-out tiles
    assert all(r.answer in r.options for r in rows)


def test_heldout_tiles_are_not_in_training_files(world_dir):
    train_images = {p for r in load_records(world_dir / "sft/train.jsonl", "conversation") for p in r.images}
    held = {p for r in load_records(world_dir / "rl/heldout.jsonl", "mcq") for p in r.images}
    assert held and not (train_images & held)
    img = Image.open(next(iter(held)))
    assert img.mode == "RGB" and img.size == (56, 56)
