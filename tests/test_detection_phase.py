"""The `detection` phase: checkpoints scored on referring detection, their intervals, the paired tests, the
controls and the prior, each number equal to what `eval.detection`'s scorer gives on the same answers; the data check
at `run --dry-run`; the run report's section and the console line."""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from PIL import Image

from patho_r1.eval.detection import detection_items, paired_f1_test, prior_items, score_detection
from patho_r1.eval.detection import main as detection_cli
from patho_r1.eval.detection_phase import DetectionPhaseConfig, box_prompts, micro_f1_interval, run_detection
from patho_r1.fixtures.grounding import GroundingConfig, make_scene, rl_row, sft_row

N_HELDOUT, N_TRAIN = 12, 12


def _write_prompts(root: Path, split: str, n: int, cfg: GroundingConfig, row=rl_row) -> Path:
    """The grounding world's RL prompts (its own row writer), each on a flat image of its scene's size: scoring
    needs the rows and images of the right size, not the drawn structures (which take seconds a scene)."""
    rows = []
    for i in range(n):
        scene = make_scene(0, split, i, cfg)
        image = root / "images" / f"{split}-{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (scene.width, scene.height), (230, 180, 200)).save(image)
        rows.append(row(scene, f"../images/{image.name}", cfg))
    path = root / ("rl" if row is rl_row else "sft") / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grounding")
    cfg = GroundingConfig(max_structures=2)
    _write_prompts(root, "heldout", N_HELDOUT, cfg)
    _write_prompts(root, "train", N_TRAIN, cfg)
    _write_prompts(root, "train", 3, cfg, row=sft_row)  # conversations: the wrong kind for this phase
    return root


class ScriptedModel:
    """A checkpoint that answers by the prompt's place in the set: the target boxes on some prompts, a box moved
    off them on others, text that is no box list on the rest; `[]` when it is shown no image."""

    def __init__(self, answers: list[str]):
        self.answers = answers
        self.calls = []

    def generate(self, requests, sampling):
        out = [f"<think>look</think><answer>{a}</answer>" if r.images else "<answer>[]</answer>"
               for r, a in zip(requests, self.answers, strict=True)]
        self.calls.append(out)
        return out


def _moved(answer: str, dx: int) -> str:
    boxes = json.loads(answer)
    return json.dumps([{**b, "bbox_2d": [b["bbox_2d"][0] + dx, b["bbox_2d"][1], b["bbox_2d"][2] + dx,
                                         b["bbox_2d"][3]]} for b in boxes])


def _scripted(records: list, kind: str) -> ScriptedModel:
    answers = []
    for i, r in enumerate(records):
        if kind == "sft":  # right on every third prompt, a near miss (IoU < 0.5) or no box list on the others
            answers.append(r.answer if i % 3 == 0 else _moved(r.answer, 20) if i % 3 == 1 else "the gland")
        else:  # rl: right on two prompts of three, a small shift (IoU > 0.5) on the third
            answers.append(_moved(r.answer, 2) if i % 3 == 2 else r.answer)
    return ScriptedModel(answers)


def _checkpoint(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")  # a model directory to the config check; the model is scripted
    return str(folder)


def test_the_phase_scores_each_checkpoint_as_the_scorer_does(world, tmp_path, monkeypatch):
    from patho_r1.checkpoint import read_manifest
    from patho_r1.eval import detection_phase

    data, train_data = world / "rl/heldout.jsonl", world / "rl/train.jsonl"
    records, train = box_prompts(str(data)), box_prompts(str(train_data))
    models = {}

    def scripted(path, cfg):
        models[Path(path).name] = _scripted(records, Path(path).name)
        return models[Path(path).name]

    monkeypatch.setattr(detection_phase, "_generator", scripted)
    cfg = DetectionPhaseConfig(
        data=str(data), prior_from=str(train_data), blind=True, wrong_image=True, output_dir=str(tmp_path / "out"),
        checkpoints={"sft": _checkpoint(tmp_path / "sft"), "rl": _checkpoint(tmp_path / "rl")},
        wandb={"mode": "disabled"}, n_resamples=2000, use_cpu=True)
    result = run_detection(cfg)

    out = tmp_path / "out/detection"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["prior", "sft", "sft, no image", "sft, wrong image", "rl", "rl, no image",
                             "rl, wrong image"]
    # every number is the scorer's on the answers the models gave (read back from the phase's files)
    expected = {"prior": score_detection(prior_items(train, records))}
    for stem, name in (("sft", "sft"), ("sft.no_image", "sft, no image"), ("sft.wrong_image", "sft, wrong image"),
                       ("rl", "rl"), ("rl.no_image", "rl, no image"), ("rl.wrong_image", "rl, wrong image")):
        saved = json.loads((out / f"{stem}.json").read_text())
        responses = [r["response"] for r in saved["responses"]]
        assert [r["id"] for r in saved["responses"]] == [r.id for r in records]
        expected[name] = score_detection(detection_items(records, responses))
        assert saved["report"]["per_item_f1"] == expected[name]["per_item_f1"]
    assert models["sft"].calls[0] == [r["response"] for r in json.loads((out / "sft.json").read_text())["responses"]]
    for name, report in expected.items():
        row, overall = summary[name], report["overall"]
        for key in ("f1", "precision", "recall", "mean_iou", "AP", "AP50", "AP75"):
            assert row[key] == overall[key], (name, key)
        assert row["n"] == N_HELDOUT and row["malformed"] == report["malformed"]
        for c, numbers in report["per_class"].items():
            assert row["per_class"][c]["f1"] == numbers["f1"] and row["per_class"][c]["AP50"] == numbers["AP50"]
        if row["f1_ci95"] is not None:
            assert 0 <= row["f1_ci95"][0] <= overall["f1"] <= row["f1_ci95"][1] <= 1, name
    # the script, by hand: rl finds every target (a 2-pixel shift keeps IoU >= 0.5), sft a third; no-image answers
    # are [], right only on the prompts whose target is []; sft's "the gland" answers are malformed
    negatives = sum(r.answer == "[]" for r in records)
    assert summary["rl"]["recall"] == 1.0 and summary["rl"]["f1_ci95"] == [1.0, 1.0]
    assert summary["sft"]["malformed"] == N_HELDOUT // 3 and summary["rl"]["malformed"] == 0
    assert expected["rl, no image"]["per_item_f1"] == [1.0 if r.answer == "[]" else 0.0 for r in records]
    assert 0 < negatives < N_HELDOUT
    # the paired tests: consecutive checkpoints, then each against the prior, as `paired_f1_test` computes them
    paired = json.loads((out / "paired.json").read_text())
    assert [(p["from"], p["to"]) for p in paired] == [("sft", "rl"), ("prior", "sft"), ("prior", "rl")]
    for p in paired:
        a, b = expected[p["from"]], expected[p["to"]]
        assert p["f1"] == paired_f1_test(a["per_item_f1"], b["per_item_f1"], n_resamples=2000)
        assert p["mean_iou"] == paired_f1_test(a["per_item_iou"], b["per_item_iou"], n_resamples=2000)
    # the files are the `score` command's: its `compare` reads them
    printed = io.StringIO()
    with redirect_stdout(printed):
        detection_cli(["compare", str(out / "sft.json"), str(out / "rl.json")])
    assert json.loads(printed.getvalue())["diff"] == pytest.approx(paired[0]["f1"]["diff"])
    # sealed: a manifest, no temporary folder left beside it
    manifest = read_manifest(out)
    assert manifest.phase == "detection" and manifest.complete and manifest.parent == str(data)
    assert [p.name for p in out.parent.iterdir()] == ["detection"]
    assert result.metrics["summary"]["rl"]["f1"] == summary["rl"]["f1"]
    assert "| rl | 12 | 1.000 | 1.00 to 1.00 |" in (out / "summary.md").read_text()


def test_the_micro_f1_interval_resamples_items_whole():
    # identical items: every resample's micro F1 is theirs (2 * 1 / (2 + 1))
    assert micro_f1_interval([[1, 2, 1]] * 5, n_resamples=500) == pytest.approx([2 / 3, 2 / 3])
    # a resample of the box-less item alone (one in four) has no micro F1: no interval, not a nan
    assert micro_f1_interval([[3, 4, 4], [0, 0, 0]], seed=1, n_resamples=500) is None
    # items scoring 1 and 0: the interval spans the two and holds the point estimate (2/4 = 0.5)
    lo, hi = micro_f1_interval([[1, 1, 1], [0, 1, 1]] * 10, n_resamples=2000)
    assert 0.2 < lo < 0.5 < hi < 0.8
    assert micro_f1_interval([[1, 1, 1]]) is None  # one item: nothing to resample


def test_a_real_tiny_checkpoint_end_to_end(world, tmp_path, tiny_model_dir):
    cfg = DetectionPhaseConfig(data=str(world / "rl/heldout.jsonl"), model=str(tiny_model_dir), limit=4, blind=True,
                               max_new_tokens=8, batch_size=4, output_dir=str(tmp_path / "out"),
                               wandb={"mode": "disabled"}, n_resamples=200, use_cpu=True)
    run_detection(cfg)
    out = tmp_path / "out/detection"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["model", "model, no image"] and summary["model"]["n"] == 4
    records = box_prompts(str(world / "rl/heldout.jsonl"), limit=4)
    for stem, name in (("model", "model"), ("model.no_image", "model, no image")):
        responses = [r["response"] for r in json.loads((out / f"{stem}.json").read_text())["responses"]]
        report = score_detection(detection_items(records, responses))
        assert summary[name]["f1"] == report["overall"]["f1"] and summary[name]["malformed"] == report["malformed"]
        assert summary[name]["mean_iou"] == report["overall"]["mean_iou"]


def test_a_checkpoint_that_sees_another_pixel_grid_is_refused_in_one_line(world, tmp_path, tiny_model_dir):
    from patho_r1.errors import DataError

    # the prompts' answers are for 56x56..112x112 (the tiny model's own budget); this checkpoint would see more
    cfg = DetectionPhaseConfig(data=str(world / "rl/heldout.jsonl"), model=str(tiny_model_dir), limit=2,
                               max_pixels=28 * 28 * 64, output_dir=str(tmp_path / "out"), wandb={"mode": "disabled"},
                               use_cpu=True)
    with pytest.raises(DataError, match=r"heldout.jsonl:1: field 'pixel_budget': answers written for .*12544.* but "
                       r"the checkpoint's processor resizes to .*50176"):
        run_detection(cfg)
    assert not (tmp_path / "out/detection").exists()


def test_the_config_names_its_checkpoints(world, tmp_path):
    from pydantic import ValidationError

    common = {"data": str(world / "rl/heldout.jsonl"), "output_dir": str(tmp_path)}
    one = _checkpoint(tmp_path / "one")
    assert DetectionPhaseConfig(model=one, **common).checkpoints == {"model": one}
    with pytest.raises(ValidationError, match="name at least one checkpoint"):
        DetectionPhaseConfig(**common)
    for label in ("prior", "v1.5", "a/b"):  # the prior's row, a file's suffix, a folder
        with pytest.raises(ValidationError, match=f"label '{label}' must be letters, digits"):
            DetectionPhaseConfig(checkpoints={label: one}, **common)
    with pytest.raises(ValidationError, match="prior_from: not found"):
        DetectionPhaseConfig(model=one, prior_from=str(tmp_path / "missing.jsonl"), **common)


def test_a_wrong_kind_fails_at_dry_run_in_one_line(world, tmp_path, capsys, monkeypatch):
    from patho_r1.launch import preflight
    from patho_r1.launch.cli import main

    monkeypatch.setattr(preflight, "gpu_here", lambda: False)
    recipe = tmp_path / "recipe.yaml"

    def write(data: str) -> Path:
        recipe.write_text(yaml.safe_dump({
            "name": "t", "output_root": str(tmp_path / "out"), "model": {"base": "tiny"},
            "data": {"root": str(world)}, "resources": {"use_gpu": False},
            "phases": [{"name": "ground", "type": "detection",
                        "config": {"data": data, "checkpoints": ["base"], "prior_from": "{data}/rl/train.jsonl"}}]}))
        return recipe

    assert main(["run", str(write("{data}/sft/train.jsonl")), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {recipe}: phases[0] (ground).config.data: {world / 'sft/train.jsonl'} holds "
                          "conversation rows, but the detection phase reads mcq rows; it reads grounding prompts in "
                          "RL form")  # this phase's own hint, not `curate mcq`'s
    assert main(["run", str(write("{data}/rl/heldout.jsonl")), "--dry-run"]) == 0


def test_a_multiple_choice_row_is_one_line_naming_its_row(world, tmp_path):
    from patho_r1.errors import DataError

    rows = (world / "rl/heldout.jsonl").read_text().splitlines()
    bad = json.loads(rows[1]) | {"answer": "B", "options": {"A": "[1, 2, 3, 4]", "B": "[5, 6, 7, 8]"}}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([rows[0], json.dumps(bad)]) + "\n")
    with pytest.raises(DataError) as caught:
        box_prompts(str(path), check_images=False)
    assert str(caught.value).startswith(f"{path}:2: field 'answer': 'B' is not a box list")
    assert "\n" not in str(caught.value)


def test_the_run_report_and_console_show_the_phase(world, tmp_path, monkeypatch):
    from patho_r1.eval import detection_phase
    from patho_r1.launch.report import STATE_FILE, collect, phase_headline, render_markdown

    records = box_prompts(str(world / "rl/heldout.jsonl"))
    monkeypatch.setattr(detection_phase, "_generator", lambda path, cfg: _scripted(records, "rl"))
    run = tmp_path / "run"
    cfg = DetectionPhaseConfig(data=str(world / "rl/heldout.jsonl"), prior_from=str(world / "rl/train.jsonl"),
                               checkpoints={"rl": _checkpoint(tmp_path / "rl")}, output_dir=str(run / "ground"),
                               wandb={"mode": "disabled"}, n_resamples=200, use_cpu=True)
    run_detection(cfg)
    (run / STATE_FILE).write_text(json.dumps({"recipe": "t", "phases": {"ground": {
        "name": "ground", "type": "detection", "status": "done", "seconds": 1.0, "output_dir": "ground"}}}))
    report = collect(run)
    summary = report["detection"]["ground"]["summary"]
    markdown = render_markdown(report)
    assert "## Referring detection (ground)" in markdown and not report["mcq"]
    prior = summary["prior"]
    assert (f"| prior | 12 | {prior['f1']:.3f} | {prior['f1_ci95'][0]:.2f} to {prior['f1_ci95'][1]:.2f} | "
            in markdown)
    assert "| prior | rl | 12 | " in markdown  # the paired test
    assert any(line.startswith(f"| {c} | rl | ") for c in summary["rl"]["per_class"] for line in markdown.splitlines())
    line = phase_headline(run / "ground", {}, "detection")
    assert line == f"F1@0.5 prior={prior['f1']:.2f} rl=1.00  mean IoU prior={prior['mean_iou']:.2f} " \
                   f"rl={summary['rl']['mean_iou']:.2f}"
