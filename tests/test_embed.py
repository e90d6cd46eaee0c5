"""The embedder: metrics against hand computations and sklearn, GradCache against the plain loss, encoding any mix of
inputs, adapter switching, bootstrap filtering, a short training run, and the faiss index round trip."""

import functools
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from patho_r1.embed.config import BootstrapConfig, EmbedPhaseConfig
from patho_r1.embed.evaluate import exact_search, modality_gap, recall_at_k, zero_shot_metrics
from patho_r1.embed.index import VectorIndex
from patho_r1.embed.loss import grad_cache_step, info_nce
from patho_r1.embed.model import Embedder, EmbedInput, summary_messages
from patho_r1.embed.train import bootstrap_filter, run_embed


def test_recall_at_k_by_hand():
    ranking = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [2, 3, 0, 1]])
    positives = [{1}, {3}, {2, 0}]
    # query 0: positive at rank 2; query 1: at rank 4; query 2: at rank 1
    assert recall_at_k(ranking, positives, ks=(1, 2, 3, 4)) == {
        "recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3), "recall@3": pytest.approx(2 / 3),
        "recall@4": 1.0}


def test_zero_shot_metrics_match_sklearn():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    m = zero_shot_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))


def test_modality_gap_by_hand():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    txt = np.array([[0.0, 2.0], [0.0, 1.0]])  # normalised to (0, 1)
    assert modality_gap(img, txt) == pytest.approx(np.sqrt(2))
    assert modality_gap(img, img) == 0.0


def test_exact_search_and_faiss_index_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(500, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:20] + 0.01 * rng.normal(size=(20, 16)).astype(np.float32)
    scores, idx = exact_search(queries, gallery, k=5)
    assert (idx[:, 0] == np.arange(20)).all() and scores.shape == (20, 5)
    for kind in ("flat", "ivf", "hnsw"):
        index = VectorIndex.build(gallery, kind=kind)
        index.save(tmp_path / f"{kind}.faiss")
        again = VectorIndex.load(tmp_path / f"{kind}.faiss")
        _, fidx = again.search(queries, 5)
        assert (fidx[:, 0] == idx[:, 0]).mean() >= 0.95


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # logits = I / t; each row: log-softmax of [2, 0] at the diagonal
    expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(0)))
    assert float(info_nce(q, p, temperature=t)) == pytest.approx(expected, rel=1e-6)
    # with both pairs in one group, the off-diagonal is not a negative: the loss is zero
    assert float(info_nce(q, p, temperature=t, groups=torch.tensor([0, 0]))) == pytest.approx(0.0, abs=1e-6)


def test_info_nce_groups_mask_only_same_target_pairs_by_hand():
    # three pairs, unit vectors at 0, 90 and 180 degrees; pairs 0 and 2 share a target
    q = p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = 1.0
    # row 0: logits [1, 0, -1] with column 2 masked -> -log(e / (e + 1)); row 2 likewise; row 1: [0, 1, 0]
    row02 = -np.log(np.e / (np.e + 1))
    row1 = -np.log(np.e / (np.e + 2))
    expected = (2 * row02 + row1) / 3  # the logits are symmetric, so both directions give the same mean
    got = info_nce(q, p, temperature=t, groups=torch.tensor([7, 3, 7]))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(info_nce(q, p, temperature=t)) > float(got)  # unmasked, the same-target pair is a hard negative


def test_grad_cache_gives_the_same_gradients_as_the_plain_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    xs_q, xs_p = torch.randn(12, 8), torch.randn(12, 8)

    def embed(chunk):
        return net(torch.stack(list(chunk)))

    loss_fn = functools.partial(info_nce, temperature=0.05)
    plain = loss_fn(embed(xs_q), embed(xs_p))
    plain.backward()
    reference = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    cached = grad_cache_step(embed, list(xs_q), list(xs_p), chunk_size=5, loss_fn=loss_fn)
    assert float(cached) == pytest.approx(float(plain.detach()), rel=1e-6)
    for ref, p in zip(reference, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)


def test_grad_cache_replays_dropout_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    xs = list(torch.randn(6, 8))
    seen = []

    def embed(chunk):
        out = net(torch.stack(list(chunk)))
        seen.append(out.detach().clone())
        return out

    grad_cache_step(embed, xs, xs, chunk_size=3, loss_fn=lambda q, p: info_nce(q, p, 0.1))
    # 4 chunks in pass 1 (2 query + 2 positive), then the same 4 recomputed in pass 2
    for first, second in zip(seen[:4], seen[4:], strict=True):
        assert torch.equal(first, second)


def test_summary_prompts_follow_homie():
    assert summary_messages(EmbedInput(text="dense nuclei"))[0]["content"][-1]["text"].endswith(
        "Summarize above sentence in one word:")
    msg = summary_messages(EmbedInput(text="darker", images=["a", "b"]))[0]["content"]
    assert [p["type"] for p in msg] == ["image", "image", "text"]
    assert msg[-1]["text"] == "darker\nSummarize above image and sentence in one word:"
    assert summary_messages(EmbedInput(frames=["a"]))[0]["content"][-1]["text"] == "Summarize above video in one word:"


def test_encode_any_mix_is_normalised_order_preserving_and_bucketing_invariant(tiny_model_dir, world_dir):
    from patho_r1.data import load_records

    emb = Embedder.from_pretrained(tiny_model_dir)
    recs = load_records(world_dir / "embed/composed_heldout.jsonl", "embed_pair")
    items = [r.query for r in recs[:8]] + ["a text only item", {"images": [recs[0].query.images[0]]}]
    a = emb.encode(items, batch_size=3, bucket_by_length=True)
    b = emb.encode(items, batch_size=3, bucket_by_length=False)
    one = emb.encode(items[2:3])
    assert a.shape == (10, emb.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, b, atol=2e-4)  # batching changes padding, not the vectors
    np.testing.assert_allclose(a[2], one[0], atol=2e-4)


def test_adapter_switching_keeps_the_reasoner(tiny_model_dir, tmp_path):
    from patho_r1.config import LoraSpec

    emb = Embedder.from_pretrained(tiny_model_dir)
    before = emb.encode(["glands"])
    emb.add_adapter(LoraSpec(r=4, alpha=8, dropout=0.0).to_peft())
    for name, p in emb.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with emb.reasoning():
        np.testing.assert_allclose(emb.encode(["glands"]), before, atol=1e-5)
    assert np.abs(emb.encode(["glands"]) - before).max() > 1e-3
    emb.save_adapter(tmp_path / "adapter")
    again = Embedder.from_pretrained(tiny_model_dir, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(again.encode(["glands"]), emb.encode(["glands"]), atol=1e-5)


def test_bootstrap_filter_keeps_pairs_above_lambda(tiny_model_dir, world_dir, tmp_path):
    emb = Embedder.from_pretrained(tiny_model_dir)
    report = bootstrap_filter(emb, BootstrapConfig(data=str(world_dir / "embed/text_pairs.jsonl"), threshold=0.9),
                              tmp_path)
    out = tmp_path / "text_pairs.jsonl"
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert report["kept"] == len(kept) and report["kept"] + report["dropped"] == report["total"]
    assert report["similarity"]["min"] <= 0.9 or report["dropped"] == 0
    saved = json.loads(out.with_suffix(".report.json").read_text())
    assert saved["threshold"] == 0.9


def test_short_embed_run_writes_adapter_metrics_and_manifest(tiny_model_dir, world_dir, tmp_path):
    from patho_r1.checkpoint import read_manifest

    cfg = EmbedPhaseConfig(
        model=str(tiny_model_dir), output_dir=str(tmp_path / "embed"), temperature=0.05,
        lora={"r": 4, "alpha": 8, "dropout": 0.0}, train_projector=True,
        stage1={"curriculum": [{"data": str(world_dir / "embed/text_pairs.jsonl"), "epochs": 1}],
                "batch_size": 8, "learning_rate": 1e-3, "max_steps": 2},
        stage2={"curriculum": [{"data": str(world_dir / "embed/image_text_pairs.jsonl"), "epochs": 1},
                               {"data": str(world_dir / "embed/composed_train.jsonl"), "epochs": 1}],
                "batch_size": 8, "learning_rate": 1e-3, "max_steps": 3, "grad_cache_chunk": 4},
        stain_augment={"hed_sigma": 0.05, "hed_bias": 0.05},
        eval={"composed": str(world_dir / "embed/composed_heldout.jsonl"),
              "classification": str(world_dir / "rl/heldout.jsonl")},
        use_cpu=True, dtype="float32", logging_steps=1)
    result = run_embed(cfg)
    assert result.global_step == 5
    metrics = json.loads((tmp_path / "embed/eval/metrics.json").read_text())
    assert set(metrics["tasks"]) == {"mi2t", "it2i", "it2t", "v2t"}
    assert {"accuracy", "balanced_accuracy", "weighted_f1"} <= set(metrics["zero_shot"])
    assert read_manifest(result.model_dir).phase == "embed"
    log = [json.loads(x) for x in (tmp_path / "embed/metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["stage1"] * 2 + ["stage2"] * 3
    assert all(np.isfinite(r["loss"]) for r in log)


def test_the_embed_phase_logs_to_wandb(tiny_model_dir, world_dir, tmp_path):
    cfg = EmbedPhaseConfig(
        model=str(tiny_model_dir), output_dir=str(tmp_path / "embed"), lora={"r": 4, "alpha": 8, "dropout": 0.0},
        stage1={"curriculum": [{"data": str(world_dir / "embed/text_pairs.jsonl")}], "batch_size": 4,
                "max_steps": 2},
        wandb={"mode": "offline", "project": "patho-r1-test"}, use_cpu=True, logging_steps=1)
    run_embed(cfg)
    runs = list((tmp_path / "embed/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # an offline run keeps its history in the run's protobuf log; the metric names are in it as plain strings.  The
    # log is written by wandb's own service process, which may still be flushing on a loaded machine: wait for it.
    import time

    log_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.time() + 30
    while b"stage1/learning_rate" not in log_file.read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    log = log_file.read_bytes()
    assert b"stage1/loss" in log and b"stage1/learning_rate" in log


def test_zero_shot_class_names_come_from_the_data_not_the_synthetic_world():
    from patho_r1.data import MCQRecord
    from patho_r1.embed.evaluate import class_names

    def rec(cat, options, answer, answer_type="mcq"):
        return MCQRecord(question="q", options=options, answer=answer, category=cat, answer_type=answer_type)

    records = [rec("luad", {"A": "lung adenocarcinoma", "B": "squamous"}, "A"),
               rec("luad", {"A": "squamous", "B": "lung adenocarcinoma"}, "B"),
               rec("luad", {"A": "adenocarcinoma of lung", "B": "x"}, "A"),
               rec("benign_stroma", {}, "stroma", answer_type="open")]
    assert class_names(records) == {"luad": "lung adenocarcinoma", "benign_stroma": "benign stroma"}


class _TableEmbedder:
    """Embeds each input by a table keyed on its content (its images, then its text)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def encode(self, items, batch_size=32):
        rows = []
        for item in items:
            item = EmbedInput.of(item)
            v = np.array(self.table["|".join([*map(str, item.images), item.text or ""])], np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)


def _pair(task, query, positive, target):
    from patho_r1.data import EmbedPairRecord

    return EmbedPairRecord(task=task, query=query, positive=positive, target_id=target)


def test_composed_retrieval_never_lets_a_query_retrieve_its_own_image():
    from patho_r1.embed.evaluate import composed_retrieval

    # it2i: the dark-stained tile b answers "a, darker"; tile a itself answers "c, lighter", so a is in the gallery.
    # "a, darker" lies nearest to its own image a, then to b: allowed to retrieve itself, it would miss.
    recs = [_pair("it2i", {"images": ["a.png"], "text": "darker"}, {"images": ["b.png"]}, "gland|dark"),
            _pair("it2i", {"images": ["c.png"], "text": "lighter"}, {"images": ["a.png"]}, "gland|light")]
    emb = _TableEmbedder({"a.png|darker": [1, 0.6, 0], "c.png|lighter": [0.6, 0, 1], "b.png|": [0, 1, 0],
                          "a.png|": [1, 0, 0]})
    m = composed_retrieval(emb, recs, simple_add=False)["it2i"]
    assert m["n_gallery"] == 2 and m["recall@1"] == 1.0


def test_composed_retrieval_counts_a_shared_answer_text_as_right_for_every_class():
    from patho_r1.embed.evaluate import composed_retrieval

    # two classes with the same answer to "what is the background?": one gallery entry, right for both queries
    recs = [_pair("it2t", {"images": ["x.png"], "text": "background?"}, {"text": "clean pink"}, "stroma|bg"),
            _pair("it2t", {"images": ["y.png"], "text": "background?"}, {"text": "clean pink"}, "glands|bg"),
            _pair("it2t", {"images": ["z.png"], "text": "background?"}, {"text": "white spaces"}, "fat|bg")]
    emb = _TableEmbedder({"x.png|background?": [1, 0], "y.png|background?": [1, 0.2], "z.png|background?": [0, 1],
                          "clean pink": [1, 0], "white spaces": [0, 1]})
    m = composed_retrieval(emb, recs, simple_add=False)["it2t"]
    assert m["n_gallery"] == 2
    assert m["recall@1"] == 1.0  # merged by text, the glands query once had no right candidate at all


@pytest.mark.parametrize("chunk", [0, 2])
def test_two_ranks_give_the_loss_and_gradients_of_one_process_with_the_global_batch(tmp_path, chunk):
    """Cross-rank negatives: each of two gloo ranks holds half the batch; gathered with gradients and averaged,
    they reproduce one process's loss and gradients on the whole batch, with and without GradCache."""
    import subprocess
    import sys

    import embed_ranks

    store = tmp_path / "store"  # a file store for the process group
    out = tmp_path / "rank0.pt"
    procs = [subprocess.Popen([sys.executable, embed_ranks.__file__, str(r), "2", str(store), str(out), str(chunk)])
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = torch.load(out)
    net, xq, xp, groups = embed_ranks.model_and_batch()
    loss, grads = embed_ranks.step(net, xq, xp, groups, chunk)
    assert ranks["loss"] == pytest.approx(loss, rel=1e-6)
    for theirs, ours in zip(ranks["grads"], grads, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_embedding_head_the_same_loss_and_gradients(tiny_model_dir, world_dir,
                                                                                    tmp_path):
    """Recomputing layers in the backward pass changes memory, not numbers: the same loss and LoRA gradients."""
    from patho_r1.data import load_records
    from patho_r1.embed.config import EmbedPhaseConfig
    from patho_r1.embed.loss import info_nce
    from patho_r1.embed.train import build_embedder

    pairs = load_records(world_dir / "embed/image_text_pairs.jsonl", "embed_pair")[:6]
    results = []
    for checkpointing in (False, True):
        cfg = EmbedPhaseConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), use_cpu=True,
                               train_vision_tower=True, gradient_checkpointing=checkpointing,
                               stage2={"curriculum": [{"data": str(world_dir / "embed/image_text_pairs.jsonl")}]},
                               wandb={"mode": "disabled"})
        embedder = build_embedder(cfg)
        embedder.train()
        base = embedder.model.get_base_model()
        assert base.is_gradient_checkpointing == checkpointing
        saved = []  # what autograd keeps for the backward pass: with checkpointing, the layer inputs only

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = info_nce(embedder([p.query for p in pairs]), embedder([p.positive for p in pairs]),
                            temperature=0.05)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in embedder.model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads, sum(saved)))
    (loss0, g0, saved0), (loss1, g1, saved1) = results
    assert saved1 < 0.5 * saved0, (saved1, saved0)  # measured: about 1/6
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    assert g0.keys() == g1.keys() and any("lora" in n for n in g0) and any(".visual." in n for n in g0)
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6) for n in g0)
