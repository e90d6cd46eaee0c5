"""The data engine: every public format imports with the right counts, bad rows are named or rejected with reasons,
planted duplicates and benchmark items are all found, tagging and clustering are measured on the synthetic world,
and stages resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from patho_r1.curate.config import CuratePhaseConfig, DedupStage, ImportStage, TagStage
from patho_r1.curate.pipeline import run_chain, run_stage
from patho_r1.curate.store import read_stage_manifest
from patho_r1.data import validate_file
from patho_r1.errors import DataError
from patho_r1.fixtures import public_formats

FORMAT_IMAGES = {"pathvqa": None, "quilt-vqa": None}


def _import(fmt: str, src: Path, out: Path, on_error: str = "skip", **source):
    stage = ImportStage(sources=[{"format": fmt, "path": str(src), **source}], on_error=on_error)
    return run_stage(stage, None, out)


@pytest.mark.parametrize("fmt", sorted(public_formats.WRITERS))
def test_each_public_format_imports_with_the_right_counts_and_rejects_with_reasons(fmt, tmp_path):
    src, expected = public_formats.WRITERS[fmt](tmp_path / "src")
    manifest = _import(fmt, src, tmp_path / "out")
    out = tmp_path / "out"
    kinds = {k: v for k, v in expected.items() if k in ("caption", "mcq", "conversation")}
    assert manifest.counts["kinds"] == kinds
    source = manifest.counts["sources"][fmt]
    assert source.get("rejected", 0) == expected["rejected"]
    assert manifest.counts.get("rows.rejects", 0) == expected["rejected"]
    for kind, n in kinds.items():  # every row passes `patho-r1 data validate`
        assert validate_file(out / f"{kind}.jsonl", kind) == n
    if expected["rejected"]:
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        assert all(r["file"] and r["row"] and r["reason"] for r in rejects)
        assert all(r["source"] == fmt for r in rejects)
    if "unique_images" in expected:  # each image stored once under its content hash
        assert len(list((out / "images").rglob("*.*"))) == expected["unique_images"]
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_bad_row_stops_the_import_naming_file_row_and_field(tmp_path):
    src, _ = public_formats.quilt_1m(tmp_path / "src")
    with pytest.raises(DataError) as err:
        _import("quilt-1m", src, tmp_path / "out", on_error="raise")
    assert err.value.path == str(src) and err.value.row == 5 and err.value.field == "image_path"
    assert "image not found" in str(err.value)
    assert not (tmp_path / "out").exists()  # no half-written dataset

    src, _ = public_formats.pathvqa(tmp_path / "pvqa")
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet:2: field 'answer': empty"):
        _import("pathvqa", src, tmp_path / "out2", on_error="raise")


def test_pathmmu_keeps_option_text_with_parentheses_subsets_splits_and_says_why_an_image_is_missing(tmp_path):
    src, _ = public_formats.pathmmu(tmp_path / "src")
    _import("pathmmu", src, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out/mcq.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["options"]["B"] == "Lymphoma (diffuse)"  # PathMMU's own split(')')[1] would give "Lymphoma ("
    assert first["answer"] == "B" and first["category"] == "PubMed" and first["split"] == "val"
    assert [r["answer"] for r in rows] == ["B", "D", "C"]
    assert first["license"] == "CC BY-ND 4.0"
    reject = json.loads((tmp_path / "out/rejects.jsonl").read_text())
    assert reject["file"].endswith("data.json[SocialPath][test]") and reject["field"] == "img"
    assert "SocialPath" in reject["reason"]


def test_vlmeval_tsv_image_references_and_hints_and_pathvqa_closed_questions(tmp_path):
    src, _ = public_formats.vlmeval_tsv(tmp_path / "src")
    _import("vlmeval-tsv", src, tmp_path / "out", license="CC BY-ND 4.0")
    rows = [json.loads(line) for line in (tmp_path / "out/mcq.jsonl").read_text().splitlines()]
    assert rows[0]["images"] == rows[1]["images"]  # row 1 names row 0's image by its index
    assert rows[1]["question"].startswith("Hint: Patient is 60.\n") and rows[1]["options"]["C"] == "Mucin"
    assert rows[0]["license"] == "CC BY-ND 4.0"  # the command line's license

    src, _ = public_formats.pathvqa(tmp_path / "pvqa")
    _import("pathvqa", src, tmp_path / "pv")
    rows = [json.loads(line) for line in (tmp_path / "pv/mcq.jsonl").read_text().splitlines()]
    assert [(r["answer_type"], r["split"]) for r in rows] == [("open", "test"), ("yesno", "train"),
                                                              ("open", "train"), ("yesno", "train")]


def test_generic_csv_with_a_column_map(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.png").write_bytes(public_formats.png(1))
    (tmp_path / "t.csv").write_text("file,text,extra\na.png,A caption.,x\nb.png,Missing image.,y\n")
    manifest = _import("csv", tmp_path / "t.csv", tmp_path / "out", kind="caption",
                       columns={"caption": "text", "images": "file"}, images=str(tmp_path / "img"))
    assert manifest.counts["kinds"] == {"caption": 1} and manifest.counts["rows.rejects"] == 1
    row = json.loads((tmp_path / "out/caption.jsonl").read_text())
    assert row["caption"] == "A caption." and row["extra"] == "x"


def test_minhash_signatures_equal_datasketch_and_lsh_finds_what_datasketch_finds():
    from datasketch import MinHash, MinHashLSH

    from patho_r1.curate.dedup import find_duplicates
    from patho_r1.curate.minhash import band_keys, lsh_params, shingle_hash, shingles, signatures

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)] + ["Caf\u00e9", "\u212aelvin", "\u0130NFILTRATE", "ki-67", "H&E", "10x"]
    texts = [" ".join(rng.choice(vocab, size=int(rng.integers(5, 30)))) for _ in range(200)]
    texts += [t.rsplit(" ", 1)[0] + " changed" for t in texts[:40]]  # near duplicates of the first 40
    texts += ["", "...", "two words", "One", "\u00b5m \u03bcm\nline\tTAB", "a b c", "A\nB c d"]
    sigs = signatures(texts, num_perm=64)
    ours_minhash = []
    for text, sig in zip(texts, sigs, strict=True):
        # datasketch itself, over the Python shingles, with our shingle hash in place of sha1
        m = MinHash(num_perm=64, hashfunc=shingle_hash)
        m.update_batch([s.encode() for s in shingles(text)])
        assert np.array_equal(m.hashvalues, sig), text
        ours_minhash.append(m)
    b, r = lsh_params(0.8, 64)
    lsh = MinHashLSH(threshold=0.8, num_perm=64)
    for i, m in enumerate(ours_minhash):
        lsh.insert(i, m)
    reference = set()
    for i, m in enumerate(ours_minhash):
        for j in lsh.query(m):
            if j != i and m.jaccard(ours_minhash[j]) >= 0.8:
                reference.add((min(i, j), max(i, j)))
    n = len(texts)
    rep, _ = find_duplicates(sigs, band_keys(sigs, b, r), np.zeros(n, np.uint64), np.ones(n, bool), 0.8)
    ours = {(int(rep[i]), i) for i in range(n) if rep[i] != i}
    assert reference and ours == reference


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The synthetic world's raw Quilt-1M export through the whole chain."""
    from patho_r1.fixtures.synth import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("curate_world")
    generate_world(root, seed=3, config=WorldConfig(
        n_train_tiles=12, n_heldout_tiles=6, n_sft=6, n_rl=6, n_rl_heldout=6, n_embed_pairs=6, n_composed_per_task=2,
        n_eval_tiles=24, n_eval_mcq=24, n_raw_export=900))
    cfg = CuratePhaseConfig(output_dir=str(root / "curated"), stages=[
        {"stage": "import", "sources": [{"format": "quilt-1m", "path": str(root / "raw/quilt_1M_lookup.csv")}]},
        {"stage": "dedup"},
        {"stage": "decontaminate", "against": [str(root / "eval/PathoSynth_MCQ.tsv")]},
        {"stage": "tag", "seed": str(root / "raw/subfield_seed.csv"), "review": 20},
        {"stage": "cluster", "truth": str(root / "raw/truth.csv")}])
    run_chain(cfg)
    return root, cfg


def test_every_planted_duplicate_and_benchmark_image_is_found(curated):
    root, cfg = curated
    truth = {r["id"]: r for r in csv.DictReader((root / "raw/truth.csv").open())}
    dedup_dir, decon_dir = cfg.stage_dirs()[1:3]
    removed = {}
    for folder in (dedup_dir, decon_dir):
        for line in (folder / "removed.jsonl").read_text().splitlines():
            entry = json.loads(line)
            removed[entry["id"]] = entry
    planted = {k: v["planted"] for k, v in truth.items() if v["planted"]}
    assert len(planted) == 12 + 12 + 8
    missed = {k: why for k, why in planted.items() if k not in removed}
    assert not missed
    for k, why in planted.items():
        reason = removed[k]["reason"]
        if why.startswith("same image"):
            assert reason == "same image"
        elif why.startswith("near-duplicate"):
            assert reason == "near-duplicate text" and removed[k]["similarity"] >= 0.8
        else:
            assert reason == ("benchmark image (re-encoded)" if "re-encoded" in why else "benchmark image (same bytes)")
            assert removed[k]["benchmark"].endswith("PathoSynth_MCQ.tsv") and removed[k]["benchmark_id"]
    false_positives = [k for k in removed if k not in planted]
    assert len(false_positives) <= 0.02 * len(truth)  # unplanted removals are real near-duplicates, and rare


def test_tagging_and_clustering_recover_the_hidden_labels(curated):
    root, cfg = curated
    tag_dir, cluster_dir = cfg.stage_dirs()[3:]
    tag = read_stage_manifest(tag_dir).counts
    assert tag["holdout"]["n"] >= 18 and tag["holdout"]["accuracy"] >= 0.8
    truth = {r["id"]: r for r in csv.DictReader((root / "raw/truth.csv").open())}
    rows = [json.loads(line) for line in (cluster_dir / "caption.jsonl").read_text().splitlines()]
    tagged_right = np.mean([r["subfield"] == truth[r["id"]]["subfield"] for r in rows])
    assert tagged_right >= 0.85
    review = list(csv.DictReader((tag_dir / "review.csv").open()))
    assert len(review) == 20 and all(float(r["confidence"]) <= 1 for r in review)
    confidences = sorted(r["subfield_confidence"] for r in rows if r["subfield_source"] == "classifier")
    assert float(review[-1]["confidence"]) <= confidences[20]  # the least confident are the ones sent for review
    cluster = read_stage_manifest(cluster_dir).counts
    assert cluster["adjusted_rand_index"] >= 0.25 and cluster["level_agreement"] >= 0.6
    assert set(cluster["levels"]) == {"easy", "medium", "hard"}
    sub = cluster["subfields"]["histopathology"]
    values = [sub["levels"][lv]["term_density"] for lv in ("easy", "medium", "hard")]
    assert values == sorted(values)  # ordered by the criterion


def test_corrections_from_review_come_back_as_hand_labels(curated, tmp_path):
    root, cfg = curated
    parent, tag_dir = cfg.stage_dirs()[2], cfg.stage_dirs()[3]
    review = list(csv.DictReader((tag_dir / "review.csv").open()))
    corrected = tmp_path / "review.csv"
    with corrected.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(review[0]))
        w.writeheader()
        for r in review[:5]:
            w.writerow({**r, "subfield": "other"})  # the reviewer's verdict, whatever the classifier said
    stage = TagStage(seed=str(root / "raw/subfield_seed.csv"), corrections=[str(corrected)], review=5)
    manifest = run_stage(stage, parent, tmp_path / "tag2")
    rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "tag2/caption.jsonl").open()}
    for r in review[:5]:
        assert rows[r["id"]]["subfield"] == "other" and rows[r["id"]]["subfield_source"] == "hand"
    assert manifest.counts["hand_labels"] == read_stage_manifest(tag_dir).counts["hand_labels"] + 5


def test_a_finished_stage_is_skipped_and_a_changed_one_reruns(curated, tmp_path):
    root, cfg = curated
    import_dir, dedup_dir = cfg.stage_dirs()[:2]
    before = read_stage_manifest(dedup_dir)
    again = run_stage(DedupStage(), import_dir, dedup_dir)
    assert again.created == before.created  # skipped: same config, same input
    changed = run_stage(DedupStage(threshold=0.95), import_dir, tmp_path / "dedup")
    assert changed.config_hash != before.config_hash
    assert changed.counts["rows.removed"] <= before.counts["rows.removed"]


def test_a_broken_line_in_a_stage_file_is_named_by_file_and_line(curated, tmp_path, monkeypatch):
    """A truncated or hand-edited stage file: the dedup, which parses its lines a batch at a time (on the pool, too),
    and `iter_jsonl` (the later stages' reader) name the file and the line, not the line's place in a batch."""
    import shutil

    from patho_r1.curate import dedup
    from patho_r1.curate.store import iter_jsonl

    _, cfg = curated
    broken = tmp_path / "import"
    broken.mkdir()
    shutil.copy(cfg.stage_dirs()[0] / "manifest.json", broken)
    lines = (cfg.stage_dirs()[0] / "caption.jsonl").read_text().splitlines(keepends=True)
    lines[136] = lines[136][:40] + "\n"  # line 137: in the third batch of 50
    (broken / "caption.jsonl").write_text("".join(lines))
    monkeypatch.setattr(dedup, "BATCH_ROWS", 50)
    for engine in ("local", "processes"):
        with pytest.raises(DataError, match=r"import/caption.jsonl:137: invalid JSON \(Invalid control character"):
            run_stage(DedupStage(engine=engine), broken, tmp_path / f"dedup-{engine}")
    with pytest.raises(DataError, match=r"caption.jsonl:137: invalid JSON"):
        list(iter_jsonl(broken / "caption.jsonl"))


def test_ray_data_engine_gives_the_same_rows_as_the_local_engine(curated, tmp_path):
    _, cfg = curated
    import_dir = cfg.stage_dirs()[0]
    local = run_stage(DedupStage(engine="local"), import_dir, tmp_path / "local")
    ray = run_stage(DedupStage(engine="ray"), import_dir, tmp_path / "ray")
    assert ray.counts["engine"] == "ray" and local.counts["engine"] == "local"
    assert ray.files == local.files  # byte-identical outputs
    import ray as ray_module

    ray_module.shutdown()


def test_a_process_pool_writes_the_same_files_as_one_process(curated, tmp_path, monkeypatch):
    """The `processes` engine (the default on 2+ cores for large inputs) against `local`: import (with a row whose
    image is missing, rejected in a worker, and three whose ids the first source's rows have, rejected here) and
    dedup, in small chunks so that each worker takes many, in order.
    The pool's dedup also spreads its keys over 256 bucket files, flushed many times (sorted on the pool), where the
    local one has them all in one: the buckets must change nothing."""
    from patho_r1.curate import dedup, importer

    root, _ = curated
    monkeypatch.setattr(importer, "CHUNK_ROWS", 64)  # workers are forked: they see the patched sizes
    monkeypatch.setattr(dedup, "BATCH_ROWS", 50)
    missing, _ = public_formats.quilt_1m(tmp_path / "src")
    sources = [{"format": "quilt-1m", "path": str(root / "raw/quilt_1M_lookup.csv")},
               {"format": "quilt-1m", "path": str(missing), "name": "small"}]
    files = {}
    for engine in ("local", "processes"):
        if engine == "processes":
            monkeypatch.setattr(dedup, "PAIRS_PER_BUCKET", 16)
            monkeypatch.setattr(dedup.KeyBuckets, "FLUSH_PAIRS", 1000)
        imported = run_stage(ImportStage(sources=sources, on_error="skip", engine=engine), None,
                             tmp_path / engine / "import")
        deduped = run_stage(DedupStage(engine=engine), tmp_path / engine / "import", tmp_path / engine / "dedup")
        assert imported.counts["engine"] == deduped.counts["engine"] == engine
        # quilt-1m:0..2 again: the small source's other rows repeat the world's ids, and an id is imported once
        assert imported.counts["sources"]["small"]["rejected"] == 4 and deduped.counts["removed"]
        files[engine] = (imported.files, imported.counts["sources"], deduped.files, deduped.counts["removed"])
    assert files["processes"] == files["local"]  # byte-identical outputs, the same counts
    with pytest.raises(DataError, match=r"quilt_1M_lookup.csv:5: field 'image_path': image not found"):
        run_stage(ImportStage(sources=sources[1:], engine="processes"), None, tmp_path / "raises")


def test_rewriting_image_paths_in_the_text_equals_re_encoding_the_rows(tmp_path):
    from itertools import compress

    from patho_r1.curate.store import ImageRebase, encode_row, images_rewritable, relative_images

    src, dest, beside, quoted = tmp_path / "01-import", tmp_path / "02-dedup", tmp_path / "01-import", tmp_path / 'a"b'
    h = "ab" * 32
    rows = [{"id": "a", "caption": "plain", "images": [f"images/ab/{h}.png"]},
            {"id": "b", "caption": "two", "images": [f"images/ab/{h}.png", f"images/cd/{h}.jpg"]},
            {"id": "c", "caption": 'a caption that quotes "images/ab/x.png" itself', "images": [f"images/ab/{h}.png"]},
            {"id": "d", "caption": "odd paths", "images": ["images/../x.png", "images//y.png", "/abs/z.png"]},
            {"id": "e", "caption": "\u00b5m and a quote \" here", "images": [f'images/ab/{h}".png']},
            {"id": "f", "caption": "no images", "images": []},
            {"id": "g", "question": "q?", "answer": "A", "options": {"A": "images/x", "B": "y"}},
            {"id": "h", "caption": f'no image of its own, but it quotes "images/ab/{h}.png"'}]
    for s, d in ((src, dest), (src, beside), (quoted, dest)):
        rebase = ImageRebase(s, d)
        expected = [encode_row(relative_images(row, s, d)) for row in rows]
        lines = [encode_row(row) for row in rows]
        for line, row, want in zip(lines, rows, expected, strict=True):
            assert rebase.line(line, row) == want, row["id"]
            assert rebase.line(line.rstrip("\n"), row) == want, row["id"]
        # many lines at once, as the dedup copies them: the rewritable ones (a, b and f; not c, d or e, nor g and h,
        # whose texts hold an "images/ that no image path starts)
        ok = [images_rewritable(line, row) for line, row in zip(lines, rows, strict=True)]
        assert ok == [True, True, False, False, False, True, False, False]
        assert rebase.textual == (s != quoted)
        if rebase.textual:
            assert rebase.lines("".join(compress(lines, ok))) == "".join(compress(expected, ok))


def test_ordered_map_keeps_the_order_and_raises_what_a_worker_raised():
    from patho_r1.curate.engine import ordered_map

    assert list(ordered_map(_square_or_fail, range(20, 60), workers=2)) == [i * i for i in range(20, 60)]
    with pytest.raises(DataError, match="item 13"):
        list(ordered_map(_square_or_fail, [1, 2, 13, 4], workers=2))


def _square_or_fail(i: int) -> int:
    if i == 13:
        raise DataError("items", i, None, f"item {i}")
    return i * i


def test_curate_phase_runs_from_a_recipe(tmp_path):
    from patho_r1.launch.recipe import build_plan
    from patho_r1.launch.report import collect
    from patho_r1.launch.runner import run_recipe

    raw = {"name": "c", "output_root": str(tmp_path / "run"), "model": {"base": "tiny"},
           "data": {"synth": {"n_train_tiles": 6, "n_heldout_tiles": 6, "n_sft": 6, "n_rl": 6, "n_rl_heldout": 6,
                              "n_embed_pairs": 6, "n_composed_per_task": 1, "n_eval_tiles": 12, "n_eval_mcq": 12,
                              "n_raw_export": 120}},
           "resources": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}, "wandb": {"mode": "disabled"},
           "phases": [{"name": "curate", "type": "curate", "config": {"stages": [
               {"stage": "import", "sources": [{"format": "quilt-1m", "path": "{data}/raw/quilt_1M_lookup.csv"}]},
               {"stage": "dedup"}, {"stage": "decontaminate", "against": ["{data}/eval/PathoSynth_MCQ.tsv"]}]}}]}
    plan = build_plan(raw)
    assert plan.phases[0].config.model is None  # curate reads no model, so none is built
    run_recipe(plan)
    assert not (tmp_path / "run/base-model").exists()
    report = collect(tmp_path / "run")
    stages = report["curate"]["curate"]
    assert [s["stage"] for s in stages] == ["import", "dedup", "decontaminate"]
    assert stages[2]["counts"]["removed"]  # the planted benchmark images
    assert "What was removed, and why" in (tmp_path / "run/report.md").read_text()


def test_cluster_with_our_embedding_head_through_the_top_floor_factory(tiny_model_dir, tmp_path):
    """`--embedder patho`: the embed/ head, loaded by launch's factory where the stage runs."""
    from patho_r1.curate.config import ClusterStage
    from patho_r1.launch.curate_phase import model_encoder

    src, _ = public_formats.arch(tmp_path / "src")
    _import("arch", src, tmp_path / "import")
    stage = ClusterStage(embedder={"kind": "patho", "model": str(tiny_model_dir), "batch_size": 4},
                         criterion="caption_length")
    manifest = run_stage(stage, tmp_path / "import", tmp_path / "cluster", model_encoder=model_encoder)
    emb = np.load(tmp_path / "cluster/embeddings.npy")
    assert emb.shape[0] == 10 and emb.shape[1] > 36  # the backbone's hidden size, not the features embedder's
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert sum(manifest.counts["levels"].values()) == 10
    with pytest.raises(ValueError, match="needs a model encoder"):
        run_stage(stage, tmp_path / "import", tmp_path / "cluster2")


def test_bad_bytes_in_json_and_csv_sources_are_located_by_line_and_offset(tmp_path):
    src, _ = public_formats.pathmmu(tmp_path / "mmu")
    data = (src / "data.json").read_bytes()
    (src / "data.json").write_bytes(data.replace(b"Adenocarcinoma", b"Adenocarcin\xffma", 1))
    with pytest.raises(DataError, match=r"data.json:1: not UTF-8: byte 0xff at byte offset \d+"):
        _import("pathmmu", src, tmp_path / "o1")
    csv_path, _ = public_formats.quilt_1m(tmp_path / "q")
    lines = csv_path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"caption", b"capt\xe9on", 1)
    csv_path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"quilt_1M_lookup.csv:3: not UTF-8: byte 0xe9"):
        _import("quilt-1m", csv_path, tmp_path / "o2", on_error="skip")  # bad bytes are not a skippable row


@pytest.mark.parametrize("criterion", ["centroid_distance", "caption_length"])
def test_levels_are_ordered_by_each_criterion(curated, criterion, tmp_path):
    from patho_r1.curate.config import ClusterStage

    _, cfg = curated
    manifest = run_stage(ClusterStage(criterion=criterion), cfg.stage_dirs()[3], tmp_path / "c")
    for sub in manifest.counts["subfields"].values():
        values = [sub["levels"][lv][criterion] for lv in ("easy", "medium", "hard")]
        assert values == sorted(values) and values[0] < values[-1]


def test_embeddings_from_a_ray_data_actor_pool_equal_the_local_ones_and_cluster_reuses_them(curated, tmp_path):
    _, cfg = curated
    decon_dir, tag_dir, cluster_dir = cfg.stage_dirs()[2:]
    manifest = run_stage(TagStage(seed=None, review=0, engine="ray"), decon_dir, tmp_path / "tag-ray")
    assert manifest.counts["engine"] == "ray"
    assert np.array_equal(np.load(tmp_path / "tag-ray/embeddings.npy"), np.load(tag_dir / "embeddings.npy"))
    assert (cluster_dir / "embeddings.npy").stat().st_ino == (tag_dir / "embeddings.npy").stat().st_ino  # linked
    import ray

    ray.shutdown()


def test_linked_images_share_the_source_file_and_copies_do_not(tmp_path):
    src, _ = public_formats.quilt_1m(tmp_path / "src")
    source_image = tmp_path / "src/quilt/images/vid0_frame.jpg"
    for mode in ("copy", "link"):
        stage = ImportStage(sources=[{"format": "quilt-1m", "path": str(src)}], on_error="skip", images=mode)
        run_stage(stage, None, tmp_path / mode)
        row = json.loads((tmp_path / mode / "caption.jsonl").read_text().splitlines()[0])
        stored = tmp_path / mode / row["images"][0]
        assert stored.read_bytes() == source_image.read_bytes()
        assert (stored.stat().st_ino == source_image.stat().st_ino) == (mode == "link")


def test_cluster_with_a_hugging_face_image_encoder(tmp_path):
    """`--embedder hf`: any model with `get_image_features`; here a tiny random CLIP built on the spot."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from patho_r1.curate.config import ClusterStage
    from patho_r1.launch.curate_phase import model_encoder

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    src, _ = public_formats.arch(tmp_path / "src")
    _import("arch", src, tmp_path / "import")
    stage = ClusterStage(embedder={"kind": "hf", "model": str(tmp_path / "clip")}, criterion="caption_length")
    manifest = run_stage(stage, tmp_path / "import", tmp_path / "cluster", model_encoder=model_encoder)
    emb = np.load(tmp_path / "cluster/embeddings.npy")
    assert emb.shape == (10, 16)  # CLIP's projection, L2-normalised
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert sum(manifest.counts["levels"].values()) == 10


def test_faiss_kmeans_backend_agrees_with_scikit_learn_on_the_levels(curated, tmp_path):
    from sklearn.metrics import adjusted_rand_score

    from patho_r1.curate.config import ClusterStage

    _, cfg = curated
    tag_dir = cfg.stage_dirs()[3]
    by = {}
    for backend in ("sklearn", "faiss"):
        run_stage(ClusterStage(backend=backend), tag_dir, tmp_path / backend)
        by[backend] = [json.loads(line)["difficulty"] for line in (tmp_path / backend / "caption.jsonl").open()]
    assert adjusted_rand_score(by["sklearn"], by["faiss"]) >= 0.5  # 0.69 measured: K-means on weak clusters


def test_curate_command_line_runs_skips_and_reports_bad_input_in_one_line(tmp_path, capsys):
    from patho_r1.launch.cli import main

    src, _ = public_formats.arch(tmp_path / "src")
    args = ["curate", "import", "--format", "arch", str(src), "--out", str(tmp_path / "out"), "--on-error", "skip"]
    assert main(args) == 0
    assert "import: 10 caption; 1 rejected (rejects.jsonl)" in capsys.readouterr().out
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(args[:-2]) == 2  # without --on-error skip the image-less caption stops it
    err = capsys.readouterr().err
    assert "captions.json:5: field 'uuid': no image named uuid-004" in err and "Traceback" not in err
    assert main(["curate", "dedup", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2
    assert "not a finished curate stage folder" in capsys.readouterr().err
