"""PMEB, the embedding suite: every dataset's reader on its miniature release layout, the metrics against scikit-learn
and brute-force counts, a selection that does not depend on file order, the cache, missing folders and broken
images, the suite end to end through `patho-r1 embed bench` with the tiny HOMIE head and a tiny PathoCLIP, and the
`embed_bench` phase in the run report."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest

from patho_r1.embed.bench import (
    BenchOptions,
    CachedEncoder,
    Item,
    ModelSpec,
    gather,
    load_suite,
    read_task,
    run_bench,
    search,
    select,
)
from patho_r1.embed.bench_metrics import classification_metrics, recall_chance, recall_metrics
from patho_r1.errors import DataError
from patho_r1.fixtures.pmeb import write_pmeb


@pytest.fixture(scope="module")
def pmeb_root(tmp_path_factory):
    return write_pmeb(tmp_path_factory.mktemp("pmeb") / "data", per_class=1)


class HashEmbedder:
    """A stand-in model: each distinct input (image bytes, text) gets its own random unit vector; counts inputs."""

    def __init__(self, dim: int = 16):
        self.dim, self.inputs = dim, 0

    def encode(self, items, batch_size=32):
        out = []
        for it in items:
            parts = [hashlib.sha256(open(i, "rb").read() if isinstance(i, str) else i).hexdigest()
                     for i in it.get("images") or []]
            seed = int(hashlib.sha256(repr((it.get("text"), parts)).encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).normal(size=self.dim)
            out.append(v / np.linalg.norm(v))
        self.inputs += len(items)
        return np.array(out, np.float32)


def _fake_run(root, tasks=None, **opts):
    model = HashEmbedder()
    results = run_bench(load_suite("pmeb"), root, [ModelSpec("fake", "clip", "unused")],
                        BenchOptions(tasks=tasks, n_boot=50, note=lambda line: None, **opts), loaded={"fake": model})
    return results, model


# ----------------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------------

def test_every_dataset_reads_from_its_release_layout_with_its_own_labels(pmeb_root):
    suite = load_suite("pmeb")
    got = {t.name: read_task(t, pmeb_root, strict=False) for t in suite.tasks}
    # one tile per class; the releases' irregularities are counted, never silently lost
    expected_classes = {"bach": 4, "crc100k": 9, "kather-colon": 9, "databiox": 3, "digestpath-signet": 2,
                        "digestpath-colonoscopy": 2, "lc25000-colon": 2, "lc25000-lung": 3, "osteo": 3,
                        "renalcell": 5, "sicap": 4, "skincancer": 16, "wsss4luad": 3}
    for name, n in expected_classes.items():
        labels = Counter(it.target for it in got[name].items)
        assert set(labels) <= set(suite.tasks[[t.name for t in suite.tasks].index(name)].classes), name
        assert len(labels) == n, name
    # SICAP's cribriform row (G4C) is read as G4; masks, box files, mixed labels are not items
    assert Counter(it.target for it in got["sicap"].items)["G4"] == 2
    assert len(got["digestpath-colonoscopy"].items) == 2 and len(got["wsss4luad"].items) == 3
    assert len(got["osteo"].items) == 3  # the mixed "viable: non-viable" row is left out by definition
    # ARCH: six captions, one naming a missing image, which is dropped and listed with its file and row
    assert len(got["arch-book"].items) == 6 and got["arch-book"].n_read == 7
    assert "captions.json:7: field 'uuid': no image named no-such-image" in got["arch-book"].dropped[0]
    # composed retrieval takes the open-ended questions only (the two yes/no ones are not targets)
    assert len(got["quilt-vqa"].items) == 6 and len(got["quilt-vqa-red"].items) == 6
    assert all(it.text and it.target not in ("yes", "no") for it in got["quilt-vqa-red"].items)
    # ids are paths inside the dataset, so they do not depend on where the data root is
    assert got["bach"].items[0].id.startswith("pmeb-bach:") and str(pmeb_root) not in got["bach"].items[0].id


def test_a_label_the_dataset_does_not_have_is_named_with_its_file_and_row(tmp_path):
    import shutil

    root = write_pmeb(tmp_path / "d", per_class=1, tasks=["osteo"])
    csv = root / "Osteosarcoma-Tumor-Assessment" / "ML_Features_1144.csv"
    csv.write_text(csv.read_text().replace("Non-Viable-Tumor", "Necrotic", 1))
    task = next(t for t in load_suite("pmeb").tasks if t.name == "osteo")
    with pytest.raises(DataError, match=r"ML_Features_1144.csv:\d+: field 'classification': unknown label 'Necrotic'"):
        read_task(task, root, strict=True)
    shutil.rmtree(root)


def test_a_bad_suite_or_model_is_one_line_before_any_data_is_read(tmp_path):
    from patho_r1.embed.bench import parse_model
    from patho_r1.errors import ConfigError

    bad = tmp_path / "suite.yaml"
    bad.write_text("name: x\ntasks: [1\n")
    with pytest.raises(ConfigError, match=r"suite.yaml: invalid YAML: line 3, column 1"):
        load_suite(bad)
    bad.write_text("name: x\ntasks:\n  - {name: a, meta: retrieval, format: no-such-format, path: p}\n")
    with pytest.raises(ConfigError, match=r"tasks.0.format: unknown format 'no-such-format'"):
        load_suite(bad)
    with pytest.raises(ConfigError, match=r"--model: .*/nope not found"):
        parse_model(f"c={tmp_path / 'nope'}")
    assert parse_model("plip=clip:vinid/plip") == ModelSpec("plip", "clip", "vinid/plip")  # a hub id is left to load


def test_a_row_naming_an_image_outside_its_dataset_folder_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "ds").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "in.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (tmp_path / "ds" / "labels.csv").write_text("image,label\nin.png,a\n../outside.png,b\n")
    task = load_suite("pmeb").tasks[0].model_copy(update={"name": "generic", "meta": "classification",
                                                          "format": "label-csv", "path": "ds"})
    got = read_task(task, tmp_path, strict=False)
    assert [it.target for it in got.items] == ["a"] and got.n_read == 2
    assert "labels.csv:3: field 'image': image" in got.dropped[0] and "outside the image folder" in got.dropped[0]
    with pytest.raises(DataError, match=r"labels.csv:3: field 'image'.*outside the image folder"):
        read_task(task, tmp_path, strict=True)
    assert len(read_task(task, tmp_path, strict=True, allow_outside=True).items) == 2  # the user's choice


def test_a_name_found_in_two_case_folders_with_different_images_is_an_error(tmp_path):
    root = write_pmeb(tmp_path / "d", per_class=1, tasks=["osteo"])
    folder = root / "Osteosarcoma-Tumor-Assessment"
    first = next(folder.rglob("Case-0-*.jpg"))
    other = folder / "Training-Set-9" / first.name
    other.parent.mkdir()
    other.write_bytes(next(folder.rglob("Case-1-*.jpg")).read_bytes())
    task = next(t for t in load_suite("pmeb").tasks if t.name == "osteo")
    with pytest.raises(DataError, match=rf"ML_Features_1144.csv:\d+: field 'image.name': '{first.name}' names 2 files"):
        read_task(task, root, strict=True)
    other.write_bytes(first.read_bytes())  # the same image twice: either copy is the row's
    assert len(read_task(task, root, strict=True).items) == 3


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------

def test_classification_metrics_match_scikit_learn_and_chance_by_hand():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    truth = list(rng.choice(classes, 300, p=[0.5, 0.3, 0.15, 0.05]))
    pred = [t if rng.random() < 0.6 else rng.choice(classes) for t in truth]
    m = classification_metrics(truth, pred, classes, n_boot=500)
    assert m["weighted_f1"] == pytest.approx(f1_score(truth, pred, average="weighted"))
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    for key in ("weighted_f1", "accuracy", "balanced_accuracy"):
        lo, hi = m[f"{key}_ci"]
        assert lo < m[key] < hi
    # the accuracy interval is the binomial one (normal approximation) within a point
    half = 1.96 * np.sqrt(m["accuracy"] * (1 - m["accuracy"]) / 300)
    assert m["accuracy_ci"][0] == pytest.approx(m["accuracy"] - half, abs=0.012)
    # chance by hand: 3 of class a, 1 of b, two classes: F1_a = 2(.75)(.5)/1.25 = .6, F1_b = 2(.25)(.5)/.75 = 1/3
    m = classification_metrics(["a", "a", "a", "b"], ["a", "a", "b", "b"], ["a", "b"], n_boot=20)
    assert m["weighted_f1_chance"] == pytest.approx(0.75 * 0.6 + 0.25 / 3)
    assert m["accuracy_chance"] == m["balanced_accuracy_chance"] == 0.5


def test_weighted_f1_chance_is_what_uniform_guessing_scores():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    classes = ["a", "b", "c"]
    truth = list(rng.choice(classes, 6000, p=[0.6, 0.3, 0.1]))
    guessed = f1_score(truth, list(rng.choice(classes, 6000)), average="weighted")
    assert classification_metrics(truth, truth, classes, n_boot=10)["weighted_f1_chance"] == pytest.approx(
        guessed, abs=0.015)


@pytest.mark.parametrize("faiss_above", [0, 10_000])  # the faiss index and torch's exact search
def test_recall_at_k_is_a_brute_force_count(faiss_above):
    rng = np.random.default_rng(2)
    queries, gallery = rng.normal(size=(40, 8)), rng.normal(size=(25, 8))
    positives = [set(rng.choice(25, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    ranking = search(queries.astype(np.float32), gallery.astype(np.float32), 10, faiss_above)
    m = recall_metrics(ranking, positives, 25, n_boot=200)
    sims = queries @ gallery.T
    for k in (1, 5, 10):
        count = 0
        for i in range(40):  # a hit: some positive scores above all but at most k-1 other candidates
            best = max(sims[i, j] for j in positives[i])
            count += int((sims[i] > best).sum() < k)
        assert m[f"R@{k}"] == pytest.approx(count / 40)
        assert m[f"R@{k}_ci"][0] <= m[f"R@{k}"] <= m[f"R@{k}_ci"][1]


def test_recall_chance_by_hand():
    assert recall_chance(10, [1], 1) == pytest.approx(0.1)
    assert recall_chance(10, [2], 5) == pytest.approx(1 - 56 / 252)  # 1 - C(8,5)/C(10,5)
    assert recall_chance(4, [1, 1], 10) == 1.0  # k beyond the gallery: everything is retrieved


# ----------------------------------------------------------------------------------------------------------------------
# Selection, cache, missing and broken inputs
# ----------------------------------------------------------------------------------------------------------------------

def test_the_same_seed_selects_the_same_ids_whatever_the_order_and_keeps_class_shares():
    items = [Item(f"x:{c}/{i:03d}.png", f"/{c}/{i}.png", ("f", i), c) for c, n in
             (("a", 40), ("b", 30), ("c", 20), ("d", 10)) for i in range(n)]
    picks = []
    for order in range(3):
        shuffled = items[:]
        random.Random(order).shuffle(shuffled)  # the order a file system lists them in
        picks.append([it.id for it in select(shuffled, 20, seed=7, stratify=True)])
    assert picks[0] == picks[1] == picks[2]
    assert Counter(i.split(":")[1].split("/")[0] for i in picks[0]) == {"a": 8, "b": 6, "c": 4, "d": 2}
    assert [it.id for it in select(items, 20, seed=8, stratify=True)] != picks[0]
    assert len(select(items, None, seed=7, stratify=True)) == 100  # no limit: every item (Osteo)


def test_the_selection_is_recorded_and_repeats_on_a_copy_of_the_data_listed_in_another_order(pmeb_root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    # copy the class folders in reverse order, so the new folder's entries were created in another order
    for src in sorted(pmeb_root.rglob("*"), reverse=True):
        dst = copy / src.relative_to(pmeb_root)
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    a, _ = _fake_run(pmeb_root, max_samples=5, seed=3)
    b, _ = _fake_run(copy, max_samples=5, seed=3)
    assert a["selection"] == b["selection"] and len(a["selection"]["crc100k"]) == 5
    assert a["tasks"]["crc100k"]["results"] == b["tasks"]["crc100k"]["results"]


def test_each_distinct_input_is_encoded_once_per_model(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):  # two files, the same bytes
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "c.png")
    items = [Item(n, str(tmp_path / n), ("f", 1), "t") for n in ("a.png", "b.png", "c.png")]
    from patho_r1.embed.bench import check_images

    check_images(items, {})
    model = HashEmbedder()
    enc = CachedEncoder(model, batch_size=2)
    first = enc.images(items)
    enc.images(items)
    enc.texts(["x", "y", "x"])
    enc.texts(["y"])
    assert model.inputs == 2 + 2 and np.array_equal(first[0], first[1])


def test_a_missing_dataset_folder_is_skipped_with_a_note_or_fails_with_strict(tmp_path):
    root = write_pmeb(tmp_path / "d", per_class=1, tasks=["bach", "lc25000-colon"])
    notes = []
    results = run_bench(load_suite("pmeb"), root, [ModelSpec("fake", "clip", "unused")],
                        BenchOptions(tasks=["bach", "sicap", "lc25000-colon"], n_boot=20, note=notes.append),
                        loaded={"fake": HashEmbedder()})
    assert set(results["tasks"]) == {"bach", "lc25000-colon"} and set(results["skipped"]) == {"sicap"}
    assert notes == [f"skipped sicap: {root / 'SICAPv2'} not found"]
    with pytest.raises(DataError, match=r"SICAPv2: task sicap: not found \(--strict\)"):
        gather(load_suite("pmeb"), root, BenchOptions(tasks=["bach", "sicap"], strict=True))


def test_a_broken_image_is_an_error_naming_the_file(tmp_path):
    root = write_pmeb(tmp_path / "d", per_class=1, tasks=["crc100k"])
    broken = sorted((root / "NCT-CRC-HE-100K" / "MUC").iterdir())[0]
    broken.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(DataError, match=f"{broken}: not a readable image"):
        _fake_run(root, tasks=["crc100k"])


# ----------------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from patho_r1.fixtures.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "pathoclip")


def test_the_suite_runs_end_to_end_on_every_dataset_with_homie_and_pathoclip(pmeb_root, tiny_model_dir, tiny_clip,
                                                                            tmp_path, capsys):
    from patho_r1.checkpoint import Manifest, write_manifest
    from patho_r1.config import LoraSpec
    from patho_r1.embed.model import Embedder
    from patho_r1.launch.cli import main

    homie = Embedder.from_pretrained(tiny_model_dir)  # an untrained adapter: the suite runs, it does not win
    homie.add_adapter(LoraSpec(r=4, alpha=8, dropout=0.0).to_peft())
    homie.save_adapter(tmp_path / "homie")
    write_manifest(tmp_path / "homie", Manifest(phase="embed", step=0, parent=str(tiny_model_dir), complete=True,
                                                extra={"base_model": str(tiny_model_dir)}))
    out = tmp_path / "bench"
    assert main(["embed", "bench", "--suite", "pmeb", "--data", str(pmeb_root), "--model", str(tmp_path / "homie"),
                 "--model", f"pathoclip={tiny_clip}", "--bootstrap", "100", "--batch-size", "64",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {t.name for t in load_suite("pmeb").tasks} and not results["skipped"]
    assert results["models"]["homie"]["kind"] == "homie" and results["models"]["pathoclip"]["kind"] == "clip"
    for name, t in results["tasks"].items():
        rows = set(t["results"])
        if t["meta"] == "composed":  # the baselines; a CLIP's own image+text input is the simple add already
            assert rows == {"homie", "homie (simple add)", "homie (question only)", "pathoclip",
                            "pathoclip (question only)"}, name
        else:
            assert rows == {"homie", "pathoclip"}, name
    m = results["tasks"]["sicap"]["results"]["pathoclip"]["classification"]
    assert set(m) >= {"weighted_f1", "weighted_f1_ci", "weighted_f1_chance", "accuracy", "balanced_accuracy"}
    r = results["tasks"]["arch-book"]["results"]["homie"]
    assert r["i2t"]["R@1_chance"] == pytest.approx(1 / 6) and r["t2i"]["n_gallery"] == 6
    selection = json.loads((out / "selection.json").read_text())["tasks"]
    assert len(selection["skincancer"]) == 16 and selection["arch-book"] == sorted(selection["arch-book"])
    assert (out / "results.png").stat().st_size > 10_000 and (out / "patho_manifest.json").is_file()
    assert "| sicap | pathoclip |" in (out / "results.md").read_text()
    assert "note: arch-book: 1 of 7 rows dropped" in printed and "written to" in printed
    # a second run into its own folder is allowed; another folder's files are not overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main(["embed", "bench", "--data", str(pmeb_root), "--model", f"pathoclip={tiny_clip}",
                 "--tasks", "bach", "--out", str(tmp_path / "other")]) == 2
    assert "keep.txt" in capsys.readouterr().err


def test_the_embed_bench_phase_reports_its_suite(pmeb_root, tiny_clip, tmp_path):
    from patho_r1.launch.phases import PHASES
    from patho_r1.launch.report import collect, embed_bench_result, render_markdown

    phase = PHASES["embed_bench"]
    cfg = phase.config_class().model_validate({"output_dir": str(tmp_path / "run" / "pmeb"), "data": str(pmeb_root),
                                               "models": [f"pathoclip={tiny_clip}"], "tasks": ["bach", "arch-book"],
                                               "bootstrap": 50})
    result = phase.run(cfg)
    assert "bach/pathoclip/classification" in result.metrics
    (tmp_path / "run" / "run_state.json").write_text(json.dumps(
        {"recipe": "r", "phases": {"pmeb": {"type": "embed_bench", "output_dir": "pmeb", "seconds": 1.0}}}))
    report = collect(tmp_path / "run")
    md = render_markdown(report)
    assert "## Embedding suite (pmeb)" in md and "| bach | pathoclip |" in md and "| arch-book | pathoclip |" in md
    assert embed_bench_result(tmp_path / "run" / "pmeb", {}).startswith("pathoclip: mean headline")
