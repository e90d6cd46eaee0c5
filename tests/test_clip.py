"""PathoCLIP: the tiny CLIP round trip, two-stage training that lowers the loss, the stage II anchor that limits drift,
the paper's evaluations against hand-made embeddings, the `clip` CLI and phase; and the self-tuning faiss index."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from patho_r1.data import CaptionRecord, MCQRecord
from patho_r1.embed.clip import ClipEmbedder
from patho_r1.embed.clip_config import ClipPhaseConfig
from patho_r1.embed.clip_eval import few_shot, few_shot_box_plot, retrieval, zero_shot
from patho_r1.embed.clip_train import run_clip
from patho_r1.embed.evaluate import class_synonyms
from patho_r1.embed.index import VectorIndex, recall_against


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from patho_r1.fixtures.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _config(clip_dir, world, out, **stage2) -> ClipPhaseConfig:
    return ClipPhaseConfig.model_validate({
        "model": str(clip_dir), "output_dir": str(out), "use_cpu": True, "wandb": {"mode": "disabled"},
        "logging_steps": 5,
        "stage1": {"data": [str(world / "cpt/train.jsonl")], "epochs": 4, "learning_rate": 1e-3, "batch_size": 16},
        "stage2": {"data": [str(world / "cpt/train.jsonl"), str(world / "cpt/mixed.jsonl")], "epochs": 1,
                   "learning_rate": 1e-3, "batch_size": 16, **stage2},
    })


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------

def test_tiny_clip_encodes_both_towers_normalised_and_reloads_to_identical_embeddings(tiny_clip_dir, world_dir,
                                                                                      tmp_path):
    clip = ClipEmbedder.from_pretrained(tiny_clip_dir)
    images = [{"images": [str(p)]} for p in sorted((world_dir / "images").glob("*.png"))[:3]]
    items = [*images, "an H&E tile of adenocarcinoma", {"text": "necrosis", "images": images[0]["images"]}]
    emb = clip.encode(items, batch_size=2)
    assert emb.shape == (5, clip.hidden_size) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the image+text input is the normalised sum of its two parts (CLIP cannot fuse)
    parts = clip.encode([images[0], "necrosis"])
    fused = parts.sum(0) / np.linalg.norm(parts.sum(0))
    assert np.allclose(emb[4], fused, atol=1e-5)
    clip.save_pretrained(tmp_path / "again")
    again = ClipEmbedder.from_pretrained(tmp_path / "again").encode(items, batch_size=2)
    assert np.array_equal(emb, again)
    assert clip.tokenizer("A B").input_ids[-1] == clip.tokenizer.eos_token_id  # the text tower pools there


# ----------------------------------------------------------------------------------------------------------------------
# Training: the loss falls, and stage II's anchor limits drift from stage I
# ----------------------------------------------------------------------------------------------------------------------

def test_two_stage_training_lowers_the_loss_and_the_anchor_limits_stage_two_drift(tiny_clip_dir, world_dir, tmp_path):
    free = run_clip(_config(tiny_clip_dir, world_dir, tmp_path / "free"))
    anchored = run_clip(_config(tiny_clip_dir, world_dir, tmp_path / "anchored", anchor_weight=10.0))
    s1 = free.metrics["stage1"]
    assert s1["steps"] == 24 and s1["last_loss"] < 0.8 * s1["first_loss"]
    # stage I is the same run in both (same seed, same data): the anchor is the only difference in stage II
    assert anchored.metrics["stage1"] == s1
    d_free, d_anchor = free.metrics["stage2"]["drift"], anchored.metrics["stage2"]["drift"]
    assert d_anchor < 0.5 * d_free, (d_anchor, d_free)
    manifest = json.loads((anchored.model_dir / "patho_manifest.json").read_text())
    assert manifest["phase"] == "clip" and manifest["complete"]
    assert manifest["extra"]["stages"]["stage2"]["drift"] == pytest.approx(d_anchor)
    assert manifest["metrics"]["stage2_drift"] == pytest.approx(d_anchor)  # what the run console's headline reads
    from patho_r1.launch.report import phase_headline

    assert f"stage2 loss {anchored.metrics['stage2']['first_loss']:.2f}->" in phase_headline(
        tmp_path / "anchored", manifest["metrics"])
    rows = [json.loads(line) for line in (tmp_path / "anchored/metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"stage1", "stage2"} and all("drift" in r for r in rows
                                                                       if r["stage"] == "stage2")
    # the checkpoint is a plain CLIP directory
    assert ClipEmbedder.from_pretrained(anchored.model_dir).encode(["x"]).shape == (1, 64)


def test_a_lower_vision_rate_keeps_the_image_tower_closer_to_stage_one(tiny_clip_dir, world_dir, tmp_path,
                                                                        monkeypatch):
    from patho_r1.embed import clip_train

    seen = {}
    real = clip_train.snapshot

    def keep(clip):  # remember stage I's weights, to measure the image tower's drift after stage II
        seen["anchor"] = real(clip)
        return seen["anchor"]

    monkeypatch.setattr(clip_train, "snapshot", keep)
    drifts = {}
    for scale in (1.0, 0.05):
        result = run_clip(_config(tiny_clip_dir, world_dir, tmp_path / str(scale), vision_lr_scale=scale))
        trained = ClipEmbedder.from_pretrained(result.model_dir)
        vision = {n for n, _ in trained.model.named_parameters() if n.startswith(("vision_model", "visual_projection"))}
        anchor = {n: v for n, v in seen["anchor"].items() if n in vision}
        drifts[scale] = clip_train.drift(trained, anchor)
    assert drifts[0.05] < 0.3 * drifts[1.0], drifts


def test_grad_cache_gives_clip_the_plain_gradients_temperature_included(tiny_clip_dir, world_dir):
    from patho_r1.data import load_records
    from patho_r1.embed.clip_train import _clip_loss
    from patho_r1.embed.loss import grad_cache_step

    records = load_records(world_dir / "cpt/train.jsonl", "caption")[:8]
    images, texts = [{"images": r.images} for r in records], [r.caption for r in records]
    grads = []
    for chunk in (None, 3):
        clip = ClipEmbedder.from_pretrained(tiny_clip_dir)
        if chunk:
            grad_cache_step(clip, images, texts, chunk, functools.partial(_clip_loss, clip))
        else:
            _clip_loss(clip, clip(images), clip(texts)).backward()
        grads.append({n: p.grad.clone() for n, p in clip.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "logit_scale" in grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-4), name


def test_stage_one_may_not_have_an_anchor(tiny_clip_dir, tmp_path):
    from patho_r1.config import validate_config
    from patho_r1.errors import ConfigError

    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(ConfigError, match="stage1.anchor_weight"):
        validate_config(ClipPhaseConfig, {"model": str(tiny_clip_dir), "output_dir": str(tmp_path),
                                          "stage1": {"data": [str(tmp_path / "c.jsonl")], "anchor_weight": 1.0}})


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation against hand-made embeddings
# ----------------------------------------------------------------------------------------------------------------------

class TableEmbedder:
    """Embeds by lookup: an image by its reference, a text by its string."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def encode(self, items, batch_size=32):
        keys = [it["images"][0] if isinstance(it, dict) else it for it in items]
        out = np.array([self.table[k] for k in keys], np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _png(tmp_path, name):
    from PIL import Image

    path = tmp_path / f"{name}.png"
    Image.new("RGB", (4, 4)).save(path)
    return str(path)


def test_retrieval_both_directions_by_hand(tmp_path):
    a, b, c = (_png(tmp_path, n) for n in "abc")
    # images a and b share one caption; c has its own.  a and c embed on their caption; b lands on c's caption.
    records = [CaptionRecord(images=[a], caption="tumour"), CaptionRecord(images=[b], caption="tumour"),
               CaptionRecord(images=[c], caption="stroma")]
    emb = TableEmbedder({a: [1, 0], b: [0.1, 1], c: [0, 1], "tumour": [1, 0], "stroma": [0, 1]})
    m = retrieval(emb, records)
    assert m["n_texts"] == 2
    assert m["image_to_text"]["recall@1"] == pytest.approx(2 / 3)  # b's top text is "stroma"
    assert m["image_to_text"]["recall@5"] == 1.0  # two texts: everything is in the top 5
    # "tumour" -> a first (a hit); "stroma" -> c first (a hit)
    assert m["text_to_image"]["recall@1"] == 1.0
    assert m["mean_recall"] == pytest.approx(np.mean([2 / 3, 1, 1, 1, 1, 1, 1, 1]))


def test_zero_shot_ensembles_synonyms_and_templates(tmp_path):
    from patho_r1.embed.clip_eval import TEMPLATES

    x, y = _png(tmp_path, "x"), _png(tmp_path, "y")
    recs = [MCQRecord(question="q", options={"A": "carcinoma", "B": "stroma"}, answer="A", images=[x],
                      category="tumour"),
            MCQRecord(question="q", options={"A": "malignant epithelium", "B": "stroma"}, answer="A", images=[x],
                      category="tumour"),
            MCQRecord(question="q", options={"A": "carcinoma", "B": "stroma"}, answer="B", images=[y],
                      category="benign")]
    synonyms = class_synonyms(recs)
    assert synonyms == {"tumour": ["carcinoma", "malignant epithelium"], "benign": ["stroma"]}
    # x lies between the two tumour synonyms: "stroma" is nearer to it than either one, but not than their mean
    table = {x: [0.5, 1, 0], y: [0.6, 0.3, 0.74]}
    for t in TEMPLATES:
        table[t.format("carcinoma")] = [1, 0, 0]
        table[t.format("malignant epithelium")] = [0, 1, 0]
        table[t.format("stroma")] = [0.6, 0.3, 0.74]
    m = zero_shot(TableEmbedder(table), recs, synonyms)
    assert m["accuracy"] == 1.0 and m["chance"] == 0.5
    alone = zero_shot(TableEmbedder(table), recs, {"tumour": ["carcinoma"], "benign": ["stroma"]})
    assert alone["accuracy"] == pytest.approx(1 / 3)  # one synonym alone sends x to "benign"


def test_few_shot_probe_separates_separable_classes_and_draws_the_box_plot(tmp_path):
    rng = np.random.default_rng(0)
    table, train, test = {}, [], []
    for label, centre in (("a", [4, 0]), ("b", [0, 4]), ("c", [-4, -4])):
        for i in range(24):
            ref = _png(tmp_path, f"{label}{i}")
            table[ref] = (np.array(centre) + rng.normal(size=2)).tolist()
            (train if i < 16 else test).append(MCQRecord(question="q", answer="x", answer_type="open",
                                                         images=[ref], category=label))
    out = few_shot(TableEmbedder(table), train, test, shots=(1, 16), seeds=3)
    assert set(out) == {"1", "16"} and len(out["16"]["runs"]) == 3
    assert out["16"]["mean"] == 1.0 and out["1"]["mean"] >= 0.8
    png = few_shot_box_plot({"m": {"few_shot": out}}, tmp_path / "box.png")
    assert png.stat().st_size > 1000


def test_clip_cli_trains_then_compares_with_the_homie_embedder(tiny_clip_dir, tiny_model_dir, world_dir, tmp_path,
                                                               capsys):
    import yaml

    from patho_r1.checkpoint import Manifest, write_manifest
    from patho_r1.config import LoraSpec
    from patho_r1.embed.model import Embedder
    from patho_r1.launch.cli import main

    cfg = _config(tiny_clip_dir, world_dir, tmp_path / "run").model_dump(mode="json", exclude_none=True)
    cfg["stage1"]["epochs"], cfg["stage2"]["epochs"] = 1, 0.5
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["clip", "train", str(tmp_path / "clip.yaml")]) == 0
    assert "clip stage2:" in capsys.readouterr().out
    homie = Embedder.from_pretrained(tiny_model_dir)  # an untrained adapter: the comparison runs, not wins
    homie.add_adapter(LoraSpec(r=4, alpha=8, dropout=0.0).to_peft())
    homie.save_adapter(tmp_path / "homie")
    write_manifest(tmp_path / "homie", Manifest(phase="embed", step=0, parent=str(tiny_model_dir), complete=True,
                                                extra={"base_model": str(tiny_model_dir)}))
    assert main(["clip", "eval", "--model", str(tmp_path / "run/model"), "--model", f"random={tiny_clip_dir}",
                 "--homie", str(tmp_path / "homie"), "--world", str(world_dir), "--seeds", "2",
                 "--out", str(tmp_path / "cmp")]) == 0
    results = json.loads((tmp_path / "cmp/comparison.json").read_text())["results"]
    assert set(results) == {"run", "random", "homie"}
    for m in results.values():
        assert set(m) >= {"retrieval", "zero_shot", "few_shot", "composed"}
        assert set(m["few_shot"]) == {"1", "2", "4", "8", "16"}
    assert "simple_add_mean_recall@1" in results["homie"]["composed"]  # HOMIE fuses; its simple-add row too
    table = (tmp_path / "cmp/comparison.md").read_text()
    assert "| homie (simple add) |" in table and (tmp_path / "cmp/few_shot.png").is_file()


def test_clip_eval_names_a_bad_input_before_loading_any_model(tiny_clip_dir, world_dir, tmp_path, capsys):
    from patho_r1.launch.cli import main

    for args, message in (
        (["--model", str(tmp_path / "nope"), "--world", str(world_dir)], "--model: "),
        (["--model", str(tiny_clip_dir), "--world", str(tmp_path / "no-world")], "--retrieval: "),
        (["--homie", str(tmp_path), "--world", str(world_dir)], "--homie: "),
    ):
        assert main(["clip", "eval", *args, "--out", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The self-tuning index
# ----------------------------------------------------------------------------------------------------------------------

def _clustered(n: int, d: int, clusters: int, rng) -> np.ndarray:
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_the_index_tunes_itself_to_the_target_recall_and_keeps_it_on_reload(kind, tmp_path):
    rng = np.random.default_rng(0)
    vectors = _clustered(6000, 32, 40, rng)
    untuned = VectorIndex.build(vectors, kind=kind, target_recall=None, nprobe=1, ef_search=10)
    tuned = VectorIndex.build(vectors, kind=kind, target_recall=0.95)
    s = tuned.settings
    assert s.measured_recall >= 0.95 and s.tune_queries == 1000
    # fresh queries from the same mixture, not used in tuning: recall against exact search holds up
    queries = vectors[:300] + 0.05 * rng.normal(size=(300, 32)).astype(np.float32)
    exact = VectorIndex.build(vectors, kind="flat").search(queries, 10)[1]
    assert recall_against(tuned.search(queries, 10)[1], exact) >= 0.9
    assert recall_against(untuned.search(queries, 10)[1], exact) < recall_against(tuned.search(queries, 10)[1], exact)
    tuned.save(tmp_path / "g.faiss")
    again = VectorIndex.load(tmp_path / "g.faiss")
    assert again.settings == s
    import faiss

    live = again.index.nprobe if kind == "ivf" else faiss.downcast_index(again.index.index).hnsw.efSearch
    assert live == (s.nprobe or s.ef_search)
    assert np.array_equal(again.search(queries, 10)[1], tuned.search(queries, 10)[1])
    assert json.loads((tmp_path / "g.faiss.json").read_text())["measured_recall"] == s.measured_recall


def test_the_tuned_setting_is_the_smallest_that_reaches_the_target():
    rng = np.random.default_rng(1)
    vectors = _clustered(4000, 16, 30, rng)
    tuned = VectorIndex.build(vectors, kind="ivf", target_recall=0.9)
    s = tuned.settings
    assert s.curve[str(s.nprobe)] == s.measured_recall >= 0.9
    if s.nprobe > 1:  # the setting one below was measured, and missed the target
        assert s.curve[str(s.nprobe - 1)] < 0.9
    assert all(r < 0.9 for v, r in s.curve.items() if int(v) < s.nprobe)
    # the held-out sample went in afterwards under its own row numbers: every vector finds itself first
    assert tuned.index.ntotal == 4000
    assert np.array_equal(tuned.search(vectors, 1)[1][:, 0], np.arange(4000))


def test_bf16_clip_phase_computes_under_autocast_with_fp32_weights_that_move(tiny_clip_dir, world_dir, tmp_path):
    """`dtype: bfloat16` used to be ignored (every matmul fp32).  Now the towers run in bf16 under autocast while the
    weights the optimizer updates stay fp32: a step at 1e-5 moves nearly every weight with a gradient."""
    from patho_r1.embed.clip_train import clip_compute_dtype, train_stage
    from patho_r1.embed.contrastive_loop import StepLog

    cfg = ClipPhaseConfig.model_validate({
        "model": str(tiny_clip_dir), "output_dir": str(tmp_path), "use_cpu": True, "dtype": "bfloat16",
        "wandb": {"mode": "disabled"},
        "stage1": {"data": [str(world_dir / "cpt/train.jsonl")], "learning_rate": 1e-5, "batch_size": 8,
                   "max_steps": 2}})  # the schedule warms up from 0 over the first step
    clip = ClipEmbedder.from_pretrained(tiny_clip_dir)
    clip.autocast_dtype = clip_compute_dtype(cfg)
    seen = []
    hook = clip.model.visual_projection.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    params = {n: p for n, p in clip.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {}  # which elements had a gradient at the last step (the optimizer step sets .grad to None)
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad != 0))
             for n, p in params.items()]
    train_stage(clip, cfg.stage1, "stage1", cfg, StepLog(tmp_path / "m.jsonl", 1, lambda *_: None, phase="clip"))
    for h in [hook, *hooks]:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in params.values())
    moved = sum(int(((params[n].detach() != before[n]) & g).sum()) for n, g in grads.items())
    total = sum(int(g.sum()) for g in grads.values())
    assert total > 1000 and moved / total >= 0.99, (moved, total)
    from patho_r1.errors import ConfigError

    with pytest.raises(ConfigError, match="float16 needs loss scaling"):
        clip_compute_dtype(cfg.model_copy(update={"dtype": "float16"}))
